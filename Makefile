# The two commands a newcomer needs: `make run` and `make test`. Everything else is set-up they call.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export UV_CACHE_DIR ?= $(HOME)/.cache/agentforge/uv
export UV_LINK_MODE ?= hardlink

.PHONY: venv run test browser test-unit infra-install infra-up infra-down bench bench-pipeline bench-seeds bench-quietstar bench-forge bench-grokfast bench-baking bench-adas bench-compression bench-headline clean

$(UV):
	$(PYTHON) -m pip install --user --quiet uv

$(BIN)/agentforge: pyproject.toml | $(UV)
	$(UV) venv --quiet --allow-existing -p $(PYTHON) $(VENV)
	$(UV) pip install --quiet -p $(BIN)/python -e '.[test]'
	touch $@

venv: $(BIN)/agentforge

## Run the whole pipeline embedded (one process, local store) on the defaults.
run: venv
	$(BIN)/agentforge run

## Install the real Kafka, S3 server and Jaeger (cached), then run every test; the session starts the servers.
## A server that cannot be installed fails `infra install` loudly, but the tests still run and those that
## need it skip, naming the reason.
test: venv
	-$(BIN)/agentforge infra install
	-$(MAKE) --no-print-directory browser
	$(BIN)/python -m pytest

## Headless Chromium, for the run report's browser test: Debian's package, installed where apt may (root).
## Without it that one test skips, saying why.
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { $(APT_CHROMIUM) >/dev/null || { apt-get update -qq && $(APT_CHROMIUM) >/dev/null; }; }; } || \
	  echo "chromium is not installed and cannot be here: the report's browser test will skip"

test-unit: venv
	$(BIN)/python -m pytest -m "unit and not slow"

infra-install: venv
	$(BIN)/agentforge infra install
infra-up: venv
	$(BIN)/agentforge infra up
infra-down: venv
	$(BIN)/agentforge infra down

## Benchmarks, printing measured figures; the fabric's needs the local servers.
bench: venv
	$(BIN)/python -m bench.merge
	$(BIN)/python -m bench.bitnet
	$(BIN)/agentforge infra up
	eval "$$($(BIN)/agentforge infra env)" && $(BIN)/python -m bench.fabric

## The whole pipeline timed embedded: the smoke preset and tiny (`make run`'s, 20 min); bench/results/pipeline.json.
bench-pipeline: venv
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.readme

## Cognate -> EvoMerge -> BitNet on three seeds (about an hour); the README's results are generated from its file.
bench-seeds: venv
	$(BIN)/python -m bench.seeds
	$(BIN)/python -m bench.readme

## Quiet-STaR on a stand-in champion: its table, a thought-length ablation and the cost of thinking (about half an hour).
bench-quietstar: venv
	$(BIN)/python -m bench.quietstar
	$(BIN)/python -m bench.readme

## Grokfast against an LR-tuned AdamW baseline on modular addition, three seeds (about 6 minutes); bench/results/grokfast.json.
bench-grokfast: venv
	$(BIN)/python -m bench.grokfast
	$(BIN)/python -m bench.readme

## Forge training on a stand-in BitNet model with its ablation runs (about half an hour); bench/results/forge.json.
bench-forge: venv
	$(BIN)/python -m bench.forge
	$(BIN)/python -m bench.readme

## Prompt baking on a stand-in: the defaults, without the anchor, with peft's student (about an hour); bench/results/baking.json.
bench-baking: venv
	$(BIN)/python -m bench.baking
	$(BIN)/python -m bench.readme

## ADAS on a stand-in: the defaults with two seeds of the phase and a picture of the front; bench/results/adas.json.
bench-adas: venv
	$(BIN)/python -m bench.adas
	$(BIN)/python -m bench.readme

## Final compression on the stand-in: both SeedLM settings, llama.cpp's speed (about 20 minutes); bench/results/compression.json.
bench-compression: venv
	$(BIN)/python -m bench.compression
	$(BIN)/python -m bench.readme

## The headline on the final split: `make run`'s pipeline on three seeds against its baselines (about 25 min a seed,
## resumable; `python -m bench.headline --seeds N` runs one); bench/results/headline.json.
bench-headline: venv
	$(BIN)/python -m bench.headline
	$(BIN)/python -m bench.readme

clean:
	rm -rf $(VENV) .pytest_cache
