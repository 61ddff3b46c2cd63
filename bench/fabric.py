"""Fabric benchmarks, printing measured figures:

  1. hand-off latency: a ModelReady published -> the next phase started (its "started" progress event),
     embedded (in-process bus) and distributed (Kafka, separate service processes);
  2. object-store throughput: upload/download through the S3 server vs a local disk copy;
  3. wall time of the same pipeline distributed vs embedded (goal: < 10% overhead).

Needs the local servers:  eval "$(.venv/bin/agentforge infra env)" && .venv/bin/python -m bench.fabric
On a machine with more runnable processes than cores, set OMP_NUM_THREADS=1 (the services inherit it):
torch's two-thread OpenMP barriers then dominate and make either mode vary by seconds from run to run.
Each distributed run uses a fresh topic prefix and bucket, and each pipeline a fresh seed, so no output
is reused from an earlier run. Embedded and distributed runs alternate, so drifting machine load hits both.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from shared.checkpoint import sha256_file
from shared.fabric.embedded import run_embedded_async
from shared.fabric.events import decode_envelope, pipeline_spec
from shared.fabric.kafka_bus import KafkaBus
from shared.fabric.launch import spawn_phase_service
from shared.fabric.local_store import LocalStore
from shared.fabric.memory_bus import InMemoryBus
from shared.fabric.pipeline import start_pipeline
from shared.fabric.s3_store import S3Store
from shared.fabric.topics import Topics
from shared.settings import Settings
from tests.fabric_phases import FineTune, ScaleWeights, SeedModel, spec_for

REPO = Path(__file__).resolve().parents[1]
PHASES = spec_for(SeedModel, ScaleWeights, FineTune)
MB = 1024 * 1024


def spec(seed: int, finetune_steps: int):
    return pipeline_spec([(PHASES[0], {"seed": seed}), (PHASES[1], {"factor": 0.9}),
                          (PHASES[2], {"steps": finetune_steps, "seed": seed})], name="bench")


def handoffs(ready_envelopes, run_envelopes) -> list[float]:
    """Seconds from each ModelReady's creation to the 'started' progress of the step it feeds."""
    started = {(e.run_id, e.phase_progress.step): e.created_at.ToNanoseconds() for e in run_envelopes
               if e.WhichOneof("payload") == "phase_progress" and e.phase_progress.message == "started"}
    return [(started[(e.run_id, e.model_ready.step)] - e.created_at.ToNanoseconds()) / 1e9
            for e in ready_envelopes if (e.run_id, e.model_ready.step) in started and e.model_ready.step > 0]


def phase_seconds(run_envelopes) -> dict[str, float]:
    """Per phase: 'started' progress -> PhaseCompleted, i.e. download, transform and upload. Raises if
    any step reused an earlier output (the comparison would be meaningless)."""
    started = {e.phase_progress.step: e.created_at.ToNanoseconds() for e in run_envelopes
               if e.WhichOneof("payload") == "phase_progress" and e.phase_progress.message == "started"}
    times = {}
    for e in run_envelopes:
        if e.WhichOneof("payload") == "phase_completed":
            done = e.phase_completed
            if done.reused:
                raise RuntimeError(f"step {done.step} reused an earlier output")
            times[done.phase] = (e.created_at.ToNanoseconds() - started[done.step]) / 1e9
    return times


def throughput(settings: Settings, size_mb: int, repeats: int) -> None:
    store = S3Store.from_settings(settings.model_copy(update={"s3_bucket": f"afbench-{uuid.uuid4().hex[:8]}"}))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "blob"
        with open(source, "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(MB))
        timings: dict[str, list[float]] = {"sha256": [], "local copy": [], "s3 upload": [], "s3 download": []}
        for i in range(repeats):
            t = time.perf_counter()
            digest = sha256_file(source)
            timings["sha256"].append(time.perf_counter() - t)
            t = time.perf_counter()
            shutil.copyfile(source, Path(tmp) / "copy")
            os.sync()
            timings["local copy"].append(time.perf_counter() - t)
            t = time.perf_counter()
            stored = store.put_file(f"bench/blob-{i}", source, digest)
            timings["s3 upload"].append(time.perf_counter() - t)
            t = time.perf_counter()
            store.get_file(stored.uri, Path(tmp) / "down", stored.version_id)
            timings["s3 download"].append(time.perf_counter() - t)
            assert sha256_file(Path(tmp) / "down") == digest
            (Path(tmp) / "copy").unlink()
            (Path(tmp) / "down").unlink()
    print(f"\n== object store: {size_mb} MiB random bytes, median of {repeats} (multipart: 16 MiB parts)")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"  {name:12s} {median:7.3f} s   {size_mb / median:8.1f} MiB/s")


async def distributed_run(settings: Settings, seed: int, steps: int) -> tuple[float, list[float], dict]:
    topics = Topics.from_settings(settings)
    bus = KafkaBus(settings.kafka_bootstrap)
    await bus.start()
    watcher = bus.consumer([topics.runs], f"{topics.prefix}-bench-{uuid.uuid4().hex[:6]}")
    await watcher.start()
    try:
        t = time.perf_counter()
        run_id = await start_pipeline(bus, spec(seed, steps), topics=topics)
        runs = []
        while True:
            record = await watcher.next(1.0)
            if record is None:
                continue
            envelope = decode_envelope(record.value)
            if envelope.run_id != run_id:
                continue
            runs.append(envelope)
            if envelope.WhichOneof("payload") == "phase_failed":
                raise RuntimeError(f"run failed: {envelope.phase_failed}")
            if envelope.WhichOneof("payload") == "pipeline_completed":
                break
        wall = time.perf_counter() - t
    finally:
        await watcher.stop()
        await bus.stop()
    readies = await read_model_ready(settings, run_id)
    return wall, handoffs(readies, runs), phase_seconds(runs)


async def read_model_ready(settings: Settings, run_id: str) -> list:
    topics = Topics.from_settings(settings)
    consumer = KafkaBus(settings.kafka_bootstrap).consumer(
        [topics.phase_input(p) for p in ("fabric_seed", "fabric_scale", "fabric_finetune")],
        f"{topics.prefix}-bench-ready-{uuid.uuid4().hex[:6]}",
    )
    await consumer.start()
    found = []
    try:
        while len(found) < 3 and (record := await consumer.next(10.0)) is not None:
            envelope = decode_envelope(record.value)
            if envelope.run_id == run_id:
                found.append(envelope)
    finally:
        await consumer.stop()
    return found


async def embedded_run(seed: int, steps: int) -> tuple[float, list[float], dict]:
    bus = InMemoryBus()
    with tempfile.TemporaryDirectory() as store_dir:
        t = time.perf_counter()
        result = await run_embedded_async(spec(seed, steps), store=LocalStore(Path(store_dir)), bus=bus)
        wall = time.perf_counter() - t
    readies = [decode_envelope(r.value) for topic, records in bus.records.items() if topic.endswith(".in")
               for r in records]
    return wall, handoffs(readies, result.events), phase_seconds(result.events)


def compare(settings: Settings, runs: int, steps: int, log_dir: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    isolated = settings.model_copy(update={"topic_prefix": f"afbench{tag}", "s3_bucket": f"afbench-{tag}"})
    env = {"AGENTFORGE_TOPIC_PREFIX": isolated.topic_prefix, "AGENTFORGE_S3_BUCKET": isolated.s3_bucket,
           "PYTHONPATH": str(REPO)}
    services = [spawn_phase_service(p, env=env, log_path=log_dir / f"service-{i}.log", cwd=REPO)
                for i, p in enumerate(PHASES)]
    try:
        for service in services:
            service.wait_ready(600)
        asyncio.run(embedded_run(1000, steps))  # warm-up: first-call costs in this process
        asyncio.run(distributed_run(isolated, 1001, steps))  # warm-up: topics, group joins, first imports
        walls = {"embedded": [], "distributed": []}
        hops = {"embedded": [], "distributed": []}
        per_phase = {"embedded": [], "distributed": []}
        for i in range(runs):
            for mode in ("embedded", "distributed"):
                run = embedded_run(i, steps) if mode == "embedded" else distributed_run(isolated, i, steps)
                wall, run_hops, times = asyncio.run(run)
                walls[mode].append(wall)
                hops[mode] += run_hops
                per_phase[mode].append(times)
    finally:
        for service in services:
            service.stop()
    print(f"\n== pipeline seed -> scale -> fine-tune ({steps} steps), {runs} runs each, tiny Llama; medians")
    for mode in ("embedded", "distributed"):
        phases = {name: statistics.median(t[name] for t in per_phase[mode]) for name in per_phase[mode][0]}
        print(f"  {mode:12s} wall {statistics.median(walls[mode]):7.3f} s  (runs: "
              f"{', '.join(f'{x:.2f}' for x in walls[mode])}); per phase: "
              + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in phases.items()))
    e, d = statistics.median(walls["embedded"]), statistics.median(walls["distributed"])
    print(f"  overhead     {100 * (d - e) / e:+.1f} %  (goal < 10 %)")
    print("\n== hand-off latency: ModelReady published -> next phase started")
    for mode, values in hops.items():
        print(f"  {mode:12s} median {1000 * statistics.median(values):7.1f} ms   max {1000 * max(values):7.1f} ms"
              f"   ({len(values)} hand-offs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--finetune-steps", type=int, default=20)
    args = parser.parse_args()
    settings = Settings()
    if not settings.s3_access_key:
        raise SystemExit('no S3 server configured: eval "$(.venv/bin/agentforge infra env)" first')
    throughput(settings, args.size_mb, args.repeats)
    with tempfile.TemporaryDirectory() as log_dir:
        compare(settings, args.runs, args.finetune_steps, Path(log_dir))


if __name__ == "__main__":
    main()
