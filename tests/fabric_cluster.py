"""The fabric on the real servers for integration tests: phase services as processes, runs and their events.

Every test gets its own topic prefix and bucket (the `fabric` fixture, registered in tests/conftest.py), so
runs never see each other's events or outputs. Services run the test phases of tests/fabric_phases.py.
"""
from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path

import httpx
import pytest

from shared.fabric.events import decode_envelope, pipeline_spec
from shared.fabric.kafka_bus import KafkaBus
from shared.fabric.launch import ServiceProcess, spawn_phase_service
from shared.fabric.pipeline import start_pipeline
from shared.fabric.s3_store import S3Store
from shared.fabric.topics import Topics
from shared.fabric.tracing import tracer_provider
from shared.settings import Settings
from tests.fabric_phases import FineTune, ScaleWeights, SeedModel, spec_for

REPO = Path(__file__).resolve().parents[1]
SEED, SCALE, FINETUNE = spec_for(SeedModel, ScaleWeights, FineTune)
SERVICE_START_S = 240  # importing torch and transformers takes long on a busy machine


@pytest.fixture
def fabric(infra, tmp_path):
    """Settings isolated to this test: own topic prefix, own bucket; and a way to start services."""
    infra.require("kafka", "s3", "jaeger")
    tag = uuid.uuid4().hex[:10]
    settings = Settings(topic_prefix=f"aftest{tag}", s3_bucket=f"aftest-{tag}")
    env = {"AGENTFORGE_TOPIC_PREFIX": settings.topic_prefix, "AGENTFORGE_S3_BUCKET": settings.s3_bucket,
           "PYTHONPATH": str(REPO)}
    services: list[ServiceProcess] = []

    def start_services(*phase_specs: str, extra_env: dict[str, str] | None = None, **serve_kwargs) -> list[ServiceProcess]:
        """Spawn all, then wait for all: their slow imports overlap."""
        started = [
            spawn_phase_service(spec, env={**env, **(extra_env or {})},
                                log_path=tmp_path / f"service-{len(services) + i}.log", cwd=REPO, **serve_kwargs)
            for i, spec in enumerate(phase_specs)
        ]
        services.extend(started)
        for service in started:
            service.wait_ready(SERVICE_START_S)
            assert httpx.get(f"http://{service.health_addr}/healthz", timeout=5).status_code == 200
        return started

    yield settings, start_services, tmp_path
    for service in services:
        service.stop()


async def run_events(
    settings: Settings, run_ids: set[str], until: set[str], timeout_s: float, linger_s: float = 0.0
) -> list:
    """Events on the runs topic for `run_ids` until each has one of the payload kinds in `until`,
    then whatever else comes for them within linger_s (late duplicates)."""
    topics = Topics.from_settings(settings)
    bus = KafkaBus(settings.kafka_bootstrap)
    consumer = bus.consumer([topics.runs], f"{topics.prefix}-watch-{uuid.uuid4().hex[:6]}")
    await bus.ensure_topics([topics.runs])
    await consumer.start()
    seen, finished = [], set()
    deadline = time.monotonic() + timeout_s
    try:
        while finished != run_ids:
            if time.monotonic() > deadline:
                raise TimeoutError(f"runs {run_ids - finished} did not finish; saw {[kind(e) for e in seen]}")
            record = await consumer.next(1.0)
            if record is None:
                continue
            envelope = decode_envelope(record.value)
            if envelope.run_id in run_ids:
                seen.append(envelope)
                if kind(envelope) in until:
                    finished.add(envelope.run_id)
        while linger_s and (record := await consumer.next(linger_s)) is not None:
            envelope = decode_envelope(record.value)
            if envelope.run_id in run_ids:
                seen.append(envelope)
    finally:
        await consumer.stop()
    return seen


def kind(envelope) -> str:
    return envelope.WhichOneof("payload")


async def start_run(settings: Settings, spec, run_id: str | None = None) -> str:
    bus = KafkaBus(settings.kafka_bootstrap)
    await bus.start()
    provider = tracer_provider("agentforge-test-control", settings)
    try:
        return await start_pipeline(bus, spec, topics=Topics.from_settings(settings), run_id=run_id,
                                    tracer_provider=provider)
    finally:
        provider.shutdown()
        await bus.stop()


def output_objects(settings: Settings) -> list[str]:
    store = S3Store.from_settings(settings)
    return sorted(o.object_name for o in store.client.list_objects(settings.s3_bucket, prefix="outputs/", recursive=True))


def three_step_spec(invocation_log: Path, hold_s: float = 0.0, *, seed: int = 11, hold_first_s: float = 0.0):
    return pipeline_spec(
        [(SEED, {"seed": seed}), (SCALE, {"factor": 0.7}),
         (FINETUNE, {"steps": 2, "hold_s": hold_s, "hold_first_s": hold_first_s, "invocation_log": str(invocation_log)})],
        name="integration",
    )


def jaeger_trace(settings: Settings, trace_id: str, services: set[str], timeout_s: float = 60) -> list[dict]:
    """Spans of the trace from Jaeger's /api/v3, once every service in `services` has reported."""
    url = f"{settings.jaeger_query_url.rstrip('/')}/api/v3/traces/{trace_id}"
    deadline = time.monotonic() + timeout_s
    spans: list[dict] = []
    while time.monotonic() < deadline:
        response = httpx.get(url, timeout=10)
        if response.status_code == 200:
            spans = []
            for resource_spans in response.json()["result"]["resourceSpans"]:
                attributes = {a["key"]: a["value"].get("stringValue") for a in resource_spans["resource"]["attributes"]}
                for scope in resource_spans["scopeSpans"]:
                    for span in scope["spans"]:
                        spans.append({**span, "service": attributes.get("service.name")})
            if services <= {span["service"] for span in spans}:
                return spans
        time.sleep(2)
    raise AssertionError(f"trace {trace_id} lacks services {services - {s['service'] for s in spans}}")


def hex_id(value: str) -> str:
    """OTLP JSON ids are hex; grpc-gateway renderings give base64. Accept both."""
    if value and all(c in "0123456789abcdefABCDEF" for c in value) and len(value) in (16, 32):
        return value.lower()
    return base64.b64decode(value).hex() if value else ""


def chains_to_one_root(spans: list[dict], services: set[str], root_service: str) -> None:
    """The trace has one root span, from root_service, and a span of every service in `services` chains to it."""
    by_id = {hex_id(span["spanId"]): span for span in spans}
    roots = [span for span in spans if not hex_id(span.get("parentSpanId", ""))]
    assert len(roots) == 1 and roots[0]["service"] == root_service, [r["service"] for r in roots]
    for service in services:
        span = next(s for s in spans if s["service"] == service)
        while hex_id(span.get("parentSpanId", "")):
            span = by_id[hex_id(span["parentSpanId"])]
        assert span is roots[0], f"{service}'s span does not chain to the root"
