"""Quality gates: the verdict on real scored models, and a gated-out step in an embedded run (it fails with
the reason in the status, the trace and the dead-letter topic; nothing downstream runs; a replay with a
corrected spec goes on). The distributed run of the same is in tests/integration/test_fabric_distributed.py."""
from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError
from typer.testing import CliRunner

from shared.fabric.control import replay_spec
from shared.fabric.dlq import DeadLetter
from shared.fabric.embedded import PipelineFailed, run_embedded_async
from shared.fabric.events import FailureReason, decode_envelope, pipeline_spec
from shared.fabric.local_store import LocalStore
from shared.fabric.memory_bus import InMemoryBus
from shared.fabric.status_view import fold
from shared.fabric.topics import Topics
from shared.fabric.tracing import tracer_provider
from shared.gate import Gate, GateError, beyond, input_values, verdict
from shared.localinfra.ports import free_port
from shared.scorecard import MEAN_METRIC, TEXT_METRIC, ScorecardSpec, score
from shared.settings import Settings
from tests.fabric_phases import FineTune, ScaleWeights, SeedModel, spec_for

pytestmark = pytest.mark.unit

SEED, SCALE, FINETUNE = spec_for(SeedModel, ScaleWeights, FineTune)
CARD = ScorecardSpec(split="validation", tasks=(("arithmetic", 1, 4),), max_new_tokens=3, max_length=32)
GATE_CARD = CARD.model_dump(mode="json")


@pytest.fixture(scope="module")
def seeded():
    """A real (random) tiny model and its measured values on the gate's scorecard."""
    (forged,) = SeedModel().transform([], SeedModel.Config(seed=3)).models
    card = score(forged.model, forged.tokenizer, CARD)
    return forged, card["metrics"][MEAN_METRIC]["value"], card["metrics"][TEXT_METRIC]["value"]


def test_a_gate_needs_a_bound_and_a_metric_its_scorecard_has(seeded):
    forged, _, _ = seeded
    with pytest.raises(ValidationError, match="max_drop, floor or both"):
        Gate()
    with pytest.raises(GateError, match="not on its scorecard"):
        verdict(Gate(metric="sequence.1.task_success", floor=0.1, scorecard=CARD), {}, [forged])
    with pytest.raises(GateError, match="has none"):
        input_values(Gate(max_drop=0.1, scorecard=CARD), [])


def test_a_drop_exactly_at_the_limit_passes_despite_float_rounding():
    drop = 15 / 300 - 9 / 300  # six problems in 300: 0.020000000000000004 in floats
    assert drop > 0.02 and not beyond(drop, 0.02)
    assert beyond(16 / 300 - 9 / 300, 0.02)  # seven problems are beyond it


def test_drops_follow_the_metrics_direction_against_the_best_input(seeded):
    forged, success, bpb = seeded
    # Task success: higher is better, so an input 0.3 above the output is a drop of 0.3.
    inputs = {"weak": success - 0.5, "strong": success + 0.3}
    failed = verdict(Gate(max_drop=0.1, scorecard=CARD), inputs, [forged])
    assert not failed["passed"] and failed["best_input"] == pytest.approx(success + 0.3)
    assert failed["outputs"][forged.name]["drop"] == pytest.approx(0.3) and "dropped 0.3000" in failed["reason"]
    assert verdict(Gate(max_drop=0.5, scorecard=CARD), inputs, [forged])["passed"]
    # Bits per byte: lower is better, so an input 0.2 below the output is a drop of 0.2.
    lower = {"input": bpb - 0.2}
    assert not verdict(Gate(metric=TEXT_METRIC, max_drop=0.1, scorecard=CARD), lower, [forged])["passed"]
    assert verdict(Gate(metric=TEXT_METRIC, max_drop=0.3, scorecard=CARD), lower, [forged])["passed"]
    # Floors: the worst value allowed, a minimum success and a maximum bits per byte.
    assert not verdict(Gate(floor=success + 0.1, scorecard=CARD), {}, [forged])["passed"]
    assert verdict(Gate(floor=success, scorecard=CARD), {}, [forged])["passed"]
    below = verdict(Gate(metric=TEXT_METRIC, floor=bpb - 0.01, scorecard=CARD), {}, [forged])
    assert not below["passed"] and "above the gate's floor" in below["reason"]


def _three_steps(log, gate):
    return pipeline_spec([(SEED, {"seed": 5}), (SCALE, {"factor": 0.8}), (FINETUNE, {"steps": 2, "invocation_log": str(log)})],
                         name="gated", gates={1: gate})


def test_a_gated_out_step_fails_the_run_and_a_replay_with_the_gate_fixed_goes_on(tmp_path):
    store, bus, exporter = LocalStore(tmp_path / "store"), InMemoryBus(), InMemorySpanExporter()
    provider = tracer_provider("unit", Settings(), exporter=exporter)
    log = tmp_path / "invocations.log"
    impossible = {"metric": MEAN_METRIC, "floor": 1.01, "scorecard": GATE_CARD}
    with pytest.raises(PipelineFailed) as failed:
        asyncio.run(run_embedded_async(_three_steps(log, impossible), store=store, bus=bus, tracer_provider=provider))
    failure = failed.value.failure
    assert (failure.step, failure.phase, failure.reason) == (1, "fabric_scale", FailureReason.GATE_FAILED)
    assert "below the gate's floor 1.01" in failure.error
    assert not log.exists()  # nothing downstream ran
    assert not list((tmp_path / "store" / "outputs").glob("fabric_scale/*"))  # nor was the gated-out output stored

    status = None
    for record in bus.records[Topics().runs]:
        status = fold(status, decode_envelope(record.value))
    assert status.failure.reason == FailureReason.GATE_FAILED and "floor" in status.failure.error
    (letter,) = [DeadLetter.from_record(r) for r in bus.records[Topics().dlq]]
    assert letter.reason == FailureReason.GATE_FAILED and letter.run_id == failed.value.run_id
    provider.force_flush()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "fabric_scale"]
    assert not span.status.is_ok and "floor" in span.status.description

    # The spec fixed (a gate the output meets), the run goes on from the gated step; the seed is reused.
    fixed = _three_steps(log, {"metric": MEAN_METRIC, "floor": 0.0, "scorecard": GATE_CARD})
    replay = replay_spec(status, "fabric_scale", fixed)
    result = asyncio.run(run_embedded_async(replay, store=store, tracer_provider=provider))
    assert [s.phase for s in result.steps] == ["fabric_scale", "fabric_finetune"]
    assert result.steps[0].report_json and '"passed": true' in result.steps[0].report_json
    assert log.read_text().count("\n") == 1


def test_gates_in_a_spec_file_are_validated_and_replay_takes_a_corrected_spec(tmp_path, monkeypatch):
    from shared.cli import app

    monkeypatch.setenv("AGENTFORGE_MODE", "embedded")
    monkeypatch.setenv("AGENTFORGE_LOCAL_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("AGENTFORGE_GRPC_ADDR", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("AGENTFORGE_OTLP_ENDPOINT", "")
    runner = CliRunner()
    card = "{split: validation, tasks: [[arithmetic, 1, 4]], max_new_tokens: 3, max_length: 32}"

    def spec(gate: str) -> str:
        path = tmp_path / f"spec-{abs(hash(gate))}.yaml"
        path.write_text(f"name: gated\nsteps:\n  - phase: {SEED}\n    config: {{seed: 5}}\n"
                        f"  - phase: {SCALE}\n    config: {{factor: 0.8}}\n    gate: {gate}\n")
        return str(path)

    result = runner.invoke(app, ["run", "--spec", spec("{metric: tasks.mean_task_success}")])
    assert result.exit_code != 0 and "max_drop, floor or both" in result.output
    result = runner.invoke(app, ["run", "--spec", spec(f"{{floor: 1.01, scorecard: {card}}}"), "--run-id", "gated"])
    assert result.exit_code == 1 and "gate_failed" in result.output
    result = runner.invoke(app, ["replay", "--run", "gated", "--from", SCALE,
                                 "--spec", spec(f"{{max_drop: 1.0, scorecard: {card}}}")])
    assert result.exit_code == 0, result.output
    assert "replay of gated" in result.output and "completed" in result.output
