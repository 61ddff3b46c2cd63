"""The `smoke` preset: all eight phases embedded through `agentforge run`, in a few minutes; and the commands
on its run: lineage (from the manifests), generate (streamed, thinking on and off, tools on) and report
(rendered in headless Chromium, every image loaded, the screenshot kept under .test-artifacts/)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.checkpoint import load_checkpoint
from shared.fabric.cli import PIPELINE_ORDER, load_spec
from shared.fabric.lineage import lineage, pick, store_for
from shared.fabric.local_store import LocalStore
from shared.fabric.status_view import RunArchive
from shared.fabric.transport import download_checkpoint
from shared.localinfra.ports import free_port
from shared.settings import Settings
from shared.tool_runtime import greedy_with_tools

pytestmark = [pytest.mark.unit, pytest.mark.slow]

runner = CliRunner()
RUN = "smoke-run"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset run once (about 3 minutes) into a temporary store: its environment, output and status."""
    store = tmp_path_factory.mktemp("smoke") / "store"
    env = {"AGENTFORGE_MODE": "embedded", "AGENTFORGE_LOCAL_STORE": str(store),
           "AGENTFORGE_GRPC_ADDR": f"127.0.0.1:{free_port()}", "AGENTFORGE_OTLP_ENDPOINT": ""}
    # The headline (the final split) is left out here: test_headline_* measures it on the test split.
    result = runner.invoke(_app(), ["run", "--preset", "smoke", "--run-id", RUN, "--no-headline"], env=env)
    assert result.exit_code == 0, result.output
    settings = Settings(local_store=store)
    return env, result.output, RunArchive.from_settings(settings).load(RUN), settings


def _app():
    from shared.cli import app

    return app


def invoke(env, *args: str):
    result = runner.invoke(_app(), list(args), env=env)
    return result.exit_code, result.output


def test_smoke_runs_the_eight_phases_in_order_with_plain_progress_lines(smoke):
    env, output, status, _ = smoke
    assert [step.phase for step in load_spec(None, "smoke").steps] == list(PIPELINE_ORDER)
    assert [c.phase for c in status.completed_steps] == list(PIPELINE_ORDER)
    assert all(c.outputs and not c.reused for c in status.completed_steps)
    assert f"run {RUN} completed" in output
    # CliRunner's output is no terminal: each step's progress comes as plain lines, not bars.
    assert "1/8 cognate [" in output and "8/8 compression done" in output
    # The final model unpacked where people can use it: a transformers folder with the GGUF beside it.
    (ref,) = status.outputs
    folder = Path(env["AGENTFORGE_LOCAL_STORE"]) / "final" / RUN / ref.name
    assert f"Hugging Face folder {folder}" in output
    assert (folder / "config.json").is_file() and (folder / "model.gguf").is_file()
    assert f"llama.cpp: {folder / 'model.gguf'}" in output


def test_unknown_preset_and_preset_with_spec_are_refused(smoke, tmp_path):
    env = smoke[0]
    code, out = invoke(env, "run", "--preset", "huge")
    assert code != 0 and "unknown preset 'huge'" in out and "smoke" in out
    spec = tmp_path / "spec.yaml"
    spec.write_text("steps: [{phase: cognate}]\n")
    code, out = invoke(env, "run", "--preset", "smoke", "--spec", str(spec))
    assert code != 0 and "not both" in out


def test_lineage_walks_from_the_final_model_back_to_cognate_through_the_manifests(smoke):
    env, _, status, settings = smoke
    links = list(lineage(status, lambda uri: store_for(settings, uri), pick(status)))
    phases = [link.manifest.phase for link in links]
    assert phases == [*reversed(PIPELINE_ORDER[1:]), *["cognate"] * 5]
    by_step = {c.step: {ref.digest for ref in c.outputs} for c in status.completed_steps}
    for link in links:
        assert link.digest in by_step[link.produced.step]
        # The config each phase ran with is the spec's, defaults written out, as the manifest recorded it.
        assert link.manifest.config == json.loads(status.spec.steps[link.produced.step].config_json)
    for child, parent in zip(links[:6], links[1:7], strict=True):
        assert child.manifest.parents == [parent.digest]
    assert sorted(links[6].manifest.parents) == sorted(link.digest for link in links[7:])

    code, out = invoke(env, "lineage", RUN)
    assert code == 0, out
    assert all(phase in out for phase in PIPELINE_ORDER) and links[0].digest[:12] in out
    code, out = invoke(env, "lineage", f"{RUN}:cognate")
    assert code != 0 and "choose one of base, multitask" in out


def test_generate_streams_what_the_tool_runtime_writes(smoke, tmp_path):
    env, _, status, settings = smoke
    prompt = "Q: What is 12 + 5?\nA: "
    code, out = invoke(env, "generate", f"{RUN}:forge", "--prompt", prompt, "--no-think")
    assert code == 0, out
    assert "thinking off, tools on" in out

    chosen = pick(status, "forge")
    download_checkpoint(LocalStore(settings.local_store), chosen.ref, tmp_path / "forge")
    forged, _ = load_checkpoint(tmp_path / "forge")
    from shared.ternary.bitlinear import trainable_ternary

    expected = greedy_with_tools(trainable_ternary(forged.model).eval(), forged.tokenizer, [prompt], 48, 2)[0]
    assert (prompt + expected.text).strip() in out

    # A checkpoint folder works as well as a run's reference.
    code, again = invoke(env, "generate", str(tmp_path / "forge"), "--prompt", prompt, "--no-think")
    assert code == 0 and (prompt + expected.text).strip() in again


def test_generate_thinks_where_the_model_carries_quiet_stars_head(smoke):
    env = smoke[0]
    code, out = invoke(env, "generate", f"{RUN}:quietstar", "--prompt", "3 + 4 = ", "--max-new-tokens", "4")
    assert code == 0, out
    assert "thinking on" in out
    code, out = invoke(env, "generate", f"{RUN}:cognate:base", "--prompt", "3 + 4 = ", "--think")
    assert code != 0 and "carries no thinking" in out


ARTIFACTS = Path(__file__).resolve().parents[2] / ".test-artifacts"


def test_report_renders_in_chromium_with_every_image_loaded(smoke, tmp_path):
    env = smoke[0]
    page = tmp_path / "report.html"
    code, out = invoke(env, "report", RUN, "--out", str(page))
    assert code == 0, out
    text = page.read_text()
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", text)
    for wanted in ("EvoMerge fitness by generation", "Quiet-STaR reward by step", "Forge training: difficulty by step",
                   "Forge training: ablations", "ADAS Pareto front", "training curve: qat_curve"):
        assert wanted in captions, captions
    assert "alt='staircase'" in text
    images = text.count("<img ")

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian's package; `make test` installs it where it may)")
    browse = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]
    dom = subprocess.run([*browse, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f'data-images-loaded="{images}/{images}"' in dom, re.findall(r"<body[^>]*>", dom)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-screenshot.png"
    subprocess.run([*browse, "--window-size=1000,3000", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    assert shot.stat().st_size > 10_000


@pytest.fixture(scope="module")
def smoke_headline(smoke):
    """`agentforge headline` on the smoke run, on the test split: its output and the JSON it kept."""
    env, _, status, settings = smoke
    code, out = invoke(env, "headline", RUN, "--split", "test")
    assert code == 0, out
    return out, json.loads((settings.local_store / "reports" / f"{RUN}-headline-test.json").read_text())


def test_headline_compares_the_final_model_with_the_best_specialist_and_the_multitask_model(smoke, smoke_headline):
    env, _, status, settings = smoke
    out, headline = smoke_headline
    report = json.loads(status.completed_steps[0].report_json)
    cards = report["scorecard"]["cards"]
    best = max(report["speciality"], key=lambda name: cards[name]["metrics"]["tasks.mean_task_success"]["value"])
    (final,) = status.outputs
    names = [model["name"] for model in headline["models"]]
    assert names == [f"{final.name} (forged)", best, "multitask"]
    assert headline["split"] == "test" and headline["reader"] is None
    forged, specialist = headline["models"][0], headline["models"][1]
    # The compressed ternary model is smaller on disk than the float specialist it started from.
    assert forged["bytes"] < specialist["bytes"] and specialist["bytes_over_forged"] > 1
    assert all(model["speed"]["tokens_per_second"] > 0 for model in headline["models"])
    for name in names[1:]:
        comparison = headline["comparisons"][name]
        assert comparison["relation"] in ("dominates", "dominated", "incomparable", "indistinguishable")
        difference = comparison["metrics"]["tasks.mean_task_success"]["difference"]
        expected = forged["metrics"]["tasks.mean_task_success"]["value"] - next(
            m for m in headline["models"] if m["name"] == name)["metrics"]["tasks.mean_task_success"]["value"]
        assert difference == pytest.approx(expected)
    assert "| model | bytes on disk |" in out and f"| {best} |" in out and "Pareto relation" in out

    code, refused = invoke(env, "headline", RUN, "--split", "validation")
    assert code != 0 and "not 'validation'" in " ".join(refused.split())


def test_compute_matched_baseline_trains_the_pipelines_tokens_and_fits_the_final_bytes(smoke, smoke_headline, tmp_path):
    from bench.headline import compute_matched, tokens_after
    from bench.readme import render_headline
    from shared.fabric.checkpoint_cli import headline_contenders
    from shared.phase import no_progress

    _, _, status, settings = smoke
    forged, best, _ = headline_contenders(settings, status, tmp_path)
    matched, record = compute_matched(status, best, forged.bytes, no_progress)
    assert record["pipeline_tokens"] == tokens_after(status, best.name) > 0
    # Steps sized by the multitask model's tokens per step: the tokens trained match the pipeline's closely.
    assert record["trained_tokens"] == pytest.approx(record["pipeline_tokens"], rel=0.1)
    assert [m.name for m in matched] == ["compute-matched RTN", "compute-matched HQQ"]
    for contender in matched:
        assert contender.bytes <= forged.bytes and contender.bytes_how == f"formula, {record['nbits']}-bit group 32"
        # Every matrix holds at most 2^b distinct values per group of 32 after quantization.
        weight = contender.model.model.layers[0].mlp.down_proj.weight.detach().reshape(-1, 32)
        assert max(len(set(row.tolist())) for row in weight) <= 2 ** record["nbits"]
    # The README renderer takes a seed's record as the benchmark writes it.
    block = render_headline({"command": "python -m bench.headline",
                             "seeds": {"0": {"seed": 0, "preset": "smoke", "headline": smoke_headline[1],
                                                   "compute_matched": record, "pipeline_seconds": 90.0}}})
    assert "| model | bytes |" in block and "better in" in block and f"{record['trained_tokens']:,} tokens" in block
    headline = smoke_headline[1]
    met = (headline["models"][1]["bytes_over_forged"] > 1
           and headline["comparisons"][best.name]["metrics"]["tasks.mean_task_success"]["verdict"] == "better")
    assert f"the best specialist, {best.name}, and better" in block and f"is met in {int(met)} of 1 seed." in block
