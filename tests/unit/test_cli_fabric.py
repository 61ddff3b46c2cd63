"""The run commands through typer's CliRunner, embedded: real tiny pipelines (tests/fabric_phases), a real
control service in a thread on 127.0.0.1, the local archive. No Kafka, S3 or Jaeger."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from typer.testing import CliRunner

import shared.fabric.cli as fabric_cli
from shared.cli import app
from shared.fabric.control import serve_control_async
from shared.localinfra.ports import free_port
from shared.fabric.status_view import RunArchive
from shared.phase import get_phase
from shared.settings import Settings
from tests.fabric_phases import ScaleWeights, SeedModel, spec_for

pytestmark = pytest.mark.unit

SEED, SCALE = spec_for(SeedModel, ScaleWeights)
runner = CliRunner()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Embedded settings in a temporary store, and a control address nothing listens on."""
    monkeypatch.setenv("AGENTFORGE_MODE", "embedded")
    monkeypatch.setenv("AGENTFORGE_LOCAL_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("AGENTFORGE_GRPC_ADDR", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("AGENTFORGE_HEALTH_ADDR", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("AGENTFORGE_OTLP_ENDPOINT", "")
    monkeypatch.setenv("AGENTFORGE_JAEGER_QUERY_URL", "")
    monkeypatch.setattr(fabric_cli, "CONTROL_TIMEOUT_S", 0.3)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: tiny\nsteps:\n  - phase: {SEED}\n    config: {{seed: 5}}\n  - phase: {SCALE}\n    config: {{factor: 0.25}}\n")
    return spec


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_run_then_status_watch_and_replay_embedded(env):
    code, out = invoke("run", "--spec", str(env), "--run-id", "first")
    assert code == 0, out
    assert "run first completed" in out and "norm_after" in out

    archive = RunArchive.from_settings(Settings())
    status = archive.load("first")
    assert [c.phase for c in status.completed_steps] == ["fabric_seed", "fabric_scale"]
    report = json.loads(status.completed_steps[1].report_json)
    assert report["norm_after"] == pytest.approx(report["norm_before"] * 0.25, rel=1e-4)  # measured, not stated
    assert len(archive.load_traceparent("first").split("-")) == 4

    code, out = invoke("status")
    assert code == 0 and "first" in out and "completed" in out
    code, out = invoke("status", "first")
    assert code == 0 and out.count("done") == 2 and "norm_after" in out  # the reports' scalars
    code, out = invoke("watch", "first")  # a finished run: the bars fill and it returns
    assert code == 0 and "completed" in out

    code, out = invoke("replay", "--run", "first", "--from", "fabric_scale")
    assert code == 0, out
    assert "reused" in out  # same input, code and config: the stored output is found, not recomputed

    code, out = invoke("status", "missing")
    assert code == 1 and "no run 'missing'" in out


def test_bad_specs_are_refused_with_the_reason(env, tmp_path):
    cases = {
        "steps:\n  - phase: no_such_phase\n": "no phase named 'no_such_phase'",
        f"steps:\n  - phase: {SCALE}\n    config: {{factor: many}}\n": "invalid config",
        f"steps:\n  - phase: {SCALE}\n    config: {{fctor: 2}}\n": "fctor",
        "name: x\nsteps: []\n": "no steps",
        f"stages:\n  - phase: {SCALE}\n": "stages",
        "steps: [\n": "cannot read spec",
    }
    for index, (text, reason) in enumerate(cases.items()):
        bad = tmp_path / f"bad{index}.yaml"
        bad.write_text(text)
        code, out = invoke("run", "--spec", str(bad))
        assert code == 2 and reason in " ".join(out.split()), (text, out)


def test_default_spec_is_every_registered_phase_in_pipeline_order_with_default_configs():
    spec = fabric_cli.default_spec()
    names = [step.phase for step in spec.steps]
    order = [name for name in fabric_cli.PIPELINE_ORDER if name in names]
    assert names[: len(order)] == order and set(names) == set(fabric_cli.available_phases())
    for step in spec.steps:
        assert json.loads(step.config_json) == get_phase(step.phase).Config().model_dump(mode="json")


def test_make_runs_preset_is_the_eight_phases_and_the_headline_bench_seeds_every_step():
    from bench.headline import seed_spec

    tiny = fabric_cli.load_spec(None)
    assert tiny.name == "tiny" and [step.phase for step in tiny.steps] == list(fabric_cli.PIPELINE_ORDER)
    assert fabric_cli.load_spec(None, "full") == fabric_cli.default_spec()
    seeded = seed_spec(3)
    for step, plain in zip(seeded.steps, tiny.steps, strict=True):
        assert json.loads(step.config_json) == {**json.loads(plain.config_json), "seed": 3}


def test_start_without_a_control_service_in_embedded_mode_says_what_to_do(env):
    code, out = invoke("start", "--spec", str(env))
    assert code == 1 and "agentforge run" in out
    code, out = invoke("dlq", "list")
    assert code == 1 and "AGENTFORGE_MODE=distributed" in out
    code, out = invoke("trace", "first")
    assert code == 1 and "AGENTFORGE_JAEGER_QUERY_URL" in out


def test_start_status_and_replay_through_a_control_service(env):
    settings = Settings()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    server = threading.Thread(target=lambda: loop.run_until_complete(serve_control_async(settings, stop)), daemon=True)
    server.start()
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://{settings.health_addr}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            threading.Event().wait(0.1)
        assert httpx.get(f"http://{settings.health_addr}/healthz", timeout=1).status_code == 200

        code, out = invoke("start", "--spec", str(env), "--run-id", "via-control", "--watch")
        assert code == 0, out
        assert "started run via-control" in out and "norm_after" in out
        code, out = invoke("status")
        assert code == 0 and "via-control" in out and "completed" in out
        code, out = invoke("start", "--spec", str(env), "--run-id", "via-control")
        assert code == 1 and "ALREADY_EXISTS" in out
        code, out = invoke("replay", "--run", "via-control", "--from", "nope")
        assert code == 1 and "FAILED_PRECONDITION" in out
    finally:
        loop.call_soon_threadsafe(stop.set)
        server.join(timeout=30)
    assert not server.is_alive()


def test_span_summary_reads_jaeger_otlp_json():
    def span(span_id, parent, name, start, end, code=0):
        return {"traceId": "ab" * 16, "spanId": span_id, "parentSpanId": parent, "name": name,
                "startTimeUnixNano": str(start), "endTimeUnixNano": str(end), "status": {"code": code}}

    def resource(service, *spans):
        return {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                "scopeSpans": [{"scope": {"name": "agentforge.fabric"}, "spans": list(spans)}]}

    answer = {"result": {"resourceSpans": [
        resource("agentforge-scale", span("02", "01", "fabric_scale", 3_000_000, 9_000_000, code=2)),
        resource("agentforge-control", span("01", "", "pipeline tiny", 1_000_000, 2_500_000)),
    ]}}
    summary = fabric_cli.span_summary(answer)
    assert [(s["service"], s["name"], s["parent_id"], s["error"]) for s in summary] == [
        ("agentforge-control", "pipeline tiny", "", False),
        ("agentforge-scale", "fabric_scale", "01", True),
    ]
    assert [s["duration_ms"] for s in summary] == [1.5, 6.0]


def test_a_report_shows_its_summary_or_else_its_top_level_scalars():
    report = {"summary": {"qat.test_bpb": 2.57, "packed_file_bytes": 1255028}, "curve": [1.0, 0.5], "sizes": {}}
    assert fabric_cli.report_summary(json.dumps(report)) == "qat.test_bpb: 2.57\npacked_file_bytes: 1255028"
    assert fabric_cli.report_summary(json.dumps({"steps": 3, "curve": [1.0], "tag": "x"})) == "steps: 3\ntag: x"
    assert fabric_cli.report_summary("") == ""
