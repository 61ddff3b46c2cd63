"""A phase as a service: `serve_phase("cognate")` is the whole of a phase's service.py.

It consumes agentforge.<phase>.in from Kafka (consumer group agentforge-<phase>), keeps checkpoints in
the S3 store, exports traces over OTLP, serves /healthz and /readyz, and on SIGTERM or SIGINT stops
fetching, finishes the event in hand, commits it and leaves the group.
"""
from __future__ import annotations

import asyncio
import logging
import signal

from shared.fabric.health import start_health_server
from shared.fabric.kafka_bus import KafkaBus
from shared.fabric.phases import load_phase
from shared.fabric.s3_store import S3Store
from shared.fabric.topics import Topics
from shared.fabric.tracing import tracer_provider
from shared.fabric.retry import RetryPolicy
from shared.fabric.worker import PhaseWorker
from shared.settings import Settings

log = logging.getLogger(__name__)


def serve_phase(
    phase_spec: str,
    settings: Settings | None = None,
    *,
    max_poll_interval_ms: int = 300_000,
    retry: RetryPolicy | None = None,
) -> None:
    """Run the service for `phase_spec` (a registered name or "module:Class") until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve_phase_async(phase_spec, settings or Settings(), max_poll_interval_ms=max_poll_interval_ms,
                                  retry=retry))


async def serve_phase_async(
    phase_spec: str, settings: Settings, *, max_poll_interval_ms: int = 300_000, retry: RetryPolicy | None = None
) -> None:
    name = load_phase(phase_spec).name
    retry = retry or RetryPolicy(transient_window_s=settings.retry_window_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    provider = tracer_provider(f"agentforge-{name}", settings)
    bus = KafkaBus(settings.kafka_bootstrap, client_id=settings.kafka_client_id or f"agentforge-{name}",
                   max_poll_interval_ms=max_poll_interval_ms)
    store = await asyncio.to_thread(S3Store.from_settings, settings)
    worker = PhaseWorker(phase_spec, bus, store, topics=Topics.from_settings(settings), tracer_provider=provider,
                         retry=retry)
    health = await start_health_server(settings.health_addr, worker.serving)
    await bus.start()
    log.info("serving phase %s (health on %s)", name, settings.health_addr)
    try:
        await worker.serve(stop)
    finally:
        await bus.stop()
        await health.cleanup()
        provider.shutdown()  # flushes the spans still queued
        log.info("phase %s stopped", name)
