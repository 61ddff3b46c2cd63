"""The headline benchmark: `make run`'s final model against what it started from, on the final split.

    .venv/bin/python -m bench.headline [--seeds 0 1 2] [--work DIR]    # about 25 minutes a seed on 2 cores
    .venv/bin/python -m bench.headline --seeds 1                       # one seed; the others' figures are kept

Per pipeline seed: `make run`'s pipeline (the `tiny` preset, shared/fabric/presets/tiny.yaml, with every
phase's seed set to it) embedded into its own store under --work, run id `headline-seed-N`, so an
interrupted seed goes on from its last finished phase; then shared.headline on the final split, which only
this benchmark and the pipeline's final report may unseal, for

- the final model (its bytes on disk: its smallest file that rebuilds it, the compressed file),
- the best Cognate specialist (by Cognate's test-split mean task success) and the multitask baseline,
- the compute-matched baseline: that specialist fine-tuned on the multitask model's mix (the union of the
  specialists' data, its learning rate and batch size) for as many training tokens as the pipeline trained
  after that specialist's own training (every curve of every phase report, less the base's and the
  specialist's), then quantized to the final model's bytes with round-to-nearest and, separately, HQQ:
  the largest b of b-bit, group-32 quantization (services/compression/baselines.py) whose bytes by formula
  (b + 1 bits a matrix weight, float16 norms) fit. The issue asks for the pipeline's training *steps*; we
  match tokens, since the phases train with different batch sizes and sequence lengths.

Results go to bench/results/headline.json as each seed finishes; `python -m bench.readme` writes the README's
headline block from it. Once a number on the final split has been read, the design may not change to move it.
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import shared  # noqa: F401  first: it sets the OpenMP wait policy before torch loads
import torch
import typer

from bench.results_file import write_results
from services.cognate.phase import MULTITASK, CognatePhase
from services.compression.baselines import GROUP, baseline_bits_per_weight, hqq, round_to_nearest
from shared.data.skills import skill_rows
from shared.data.splits import FINAL
from shared.fabric.checkpoint_cli import cognate_report, headline_contenders
from shared.fabric.cli import DEFAULT_PRESET, SpecFile, checked_spec, run_here, spec_file
from shared.headline import Contender, measure
from shared.models import get_preset
from shared.phase import print_every_percent
from shared.report import curves_in
from shared.settings import Settings
from shared.training import TrainingConfig, train_causal_lm

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "headline.json"
DEFAULT_WORK = Path.home() / ".cache" / "agentforge" / "bench-headline"
READER = "the headline benchmark (bench/headline.py)"
cli = typer.Typer(add_completion=False)


def seed_spec(seed: int):
    """`make run`'s pipeline (the `tiny` preset) with every phase's seed set."""
    spec = spec_file(None, DEFAULT_PRESET)
    return checked_spec(SpecFile(name=f"{spec.name}-seed-{seed}",
                                 steps=[step.model_copy(update={"config": {**step.config, "seed": seed}})
                                        for step in spec.steps]))


def tokens_after(status, specialist: str) -> int:
    """Training tokens the pipeline spent after `specialist` was trained: every curve of every phase report,
    less the base's and the specialist's own (which the compute-matched baseline already holds)."""
    total = sum(curve["tokens"] for done in status.completed_steps
                for _, curve in curves_in(json.loads(done.report_json)))
    cognate = cognate_report(status)["curves"]
    return total - cognate["base"]["curve"]["tokens"] - cognate[specialist]["curve"]["tokens"]


def quantized_bytes(model: torch.nn.Module, nbits: int) -> int:
    """Bytes by formula: b-bit group-32 codes with a float16 scale and zero per group for every matrix whose
    rows split into groups, float16 for the rest; a tied tensor counted once."""
    total, seen = 0, set()
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        quantized = tensor.dim() == 2 and tensor.shape[-1] % GROUP == 0
        total += math.ceil(tensor.numel() * (baseline_bits_per_weight(nbits, GROUP) if quantized else 16) / 8)
    return total


def quantize(model: torch.nn.Module, nbits: int, method) -> torch.nn.Module:
    """A copy with every matrix quantized by `method` (dequantized back to float for measuring)."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in quantized.parameters():
            if parameter.dim() == 2 and parameter.shape[-1] % GROUP == 0:
                parameter.copy_(method(parameter, nbits, GROUP))
    return quantized.eval()


def compute_matched(status, specialist: Contender, final_bytes: int, progress) -> tuple[list[Contender], dict]:
    """The specialist fine-tuned on the multitask mix for the pipeline's tokens, then RTN and HQQ at the
    largest b that fits final_bytes; and what was done, for the results file."""
    cognate_step = next(step for step in status.spec.steps if step.phase == "cognate")
    config = CognatePhase().parse_config(json.loads(cognate_step.config_json or "{}"))
    multitask = cognate_report(status)["curves"][MULTITASK]
    budget = tokens_after(status, specialist.name)
    seq_len = get_preset(config.preset).max_positions
    batch_size = multitask["training"]["batch_size"]
    # The multitask model's own tokens per step (its mix, batch and rows: the same as here) set the steps.
    tokens_per_step = multitask["curve"]["tokens"] / multitask["training"]["steps"]
    steps = max(1, round(budget / tokens_per_step))
    rows = skill_rows(specialist.tokenizer, "train", config.task_examples, seq_len, config.seed, config.text_chars)
    model = copy.deepcopy(specialist.model).train()
    training = TrainingConfig(steps=steps, batch_size=batch_size, learning_rate=multitask["training"]["learning_rate"],
                              warmup_steps=config.warmup_steps, eval_every=steps, seed=config.seed * 100 + 99,
                              threads=config.threads)
    curve = train_causal_lm(model, rows, multitask["mix"], training, pad_id=specialist.tokenizer.pad_token_id,
                            progress=progress)
    model.eval()
    fitting = [b for b in range(8, 0, -1) if quantized_bytes(model, b) <= final_bytes]
    if not fitting:
        raise ValueError(f"no b-bit quantization of {specialist.name} fits the final model's {final_bytes} bytes")
    nbits = fitting[0]
    how = f"formula, {nbits}-bit group {GROUP}"
    contenders = [Contender(f"compute-matched {label}", quantize(model, nbits, method), specialist.tokenizer,
                            quantized_bytes(model, nbits), how)
                  for label, method in (("RTN", round_to_nearest), ("HQQ", hqq))]
    return contenders, {"from": specialist.name, "pipeline_tokens": budget, "trained_tokens": curve.tokens,
                        "steps": steps, "mix": multitask["mix"], "nbits": nbits, "group": GROUP}


def run_seed(seed: int, work: Path) -> dict[str, Any]:
    """One seed: the pipeline (resumed where it stopped), the compute-matched baseline, the headline."""
    settings = Settings(local_store=work / f"seed-{seed}")
    started = time.perf_counter()
    status = run_here(settings, seed_spec(seed), f"headline-seed-{seed}")
    pipeline_seconds = time.perf_counter() - started
    progress = print_every_percent(typer.echo)
    with tempfile.TemporaryDirectory() as folder:
        contenders = headline_contenders(settings, status, Path(folder))
    forged, best = contenders[0], contenders[1]
    typer.echo(f"seed {seed}: the compute-matched baseline from {best.name}")
    matched, matched_report = compute_matched(status, best, forged.bytes, progress)
    typer.echo(f"seed {seed}: the headline on the final split")
    headline = measure([*contenders, *matched], FINAL, READER, progress)
    return {"seed": seed, "preset": DEFAULT_PRESET, "run_id": status.run_id,
            "pipeline_seconds": round(pipeline_seconds, 1),
            "compute_matched": matched_report, "headline": headline}


@cli.command()
def main(
    seeds: Annotated[list[int] | None, typer.Option("--seeds", help="Pipeline seeds (default 0 1 2).")] = None,
    work: Annotated[Path, typer.Option(help="Where each seed's run store lives (resumable).")] = DEFAULT_WORK,
    out: Path = DEFAULT_OUT,
) -> None:
    started = time.perf_counter()
    for seed in seeds or [0, 1, 2]:
        record = run_seed(seed, work)
        results = json.loads(out.read_text()) if out.exists() else {"seeds": {}}
        results["seeds"][str(seed)] = record
        results["command"] = "python -m bench.headline"
        write_results(out, {key: value for key, value in results.items() if key not in ("machine", "seconds")},
                      started)


if __name__ == "__main__":
    cli()
