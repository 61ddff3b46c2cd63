"""The fault matrix on the real servers: what happens to runs when parts of the system fail.

Each test runs the three-step test pipeline (tests/fabric_phases.py) through phase services on Kafka, the
S3 server and Jaeger, breaks something mid-run, and asserts the run completes with exactly one output per
phase and one completion event per step. The SIGKILLed service and the poison inputs with their redrive
are in test_fabric_distributed.py. Stopping a server needs the local servers of `agentforge infra`.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2

from shared.fabric.dlq import list_dead_letters
from shared.fabric.kafka_bus import DEFAULT_PARTITIONS, KafkaBus
from shared.fabric.topics import Topics
from shared.localinfra.stack import LocalStack
from tests.fabric_cluster import FINETUNE, SCALE, SEED, kind, output_objects, run_events, start_run, three_step_spec
from tests.plugins.infra import TEST_OWNER

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PHASES = ("fabric_seed", "fabric_scale", "fabric_finetune")


def wait_for_invocations(log: Path, count: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (log.exists() and log.read_text().count("\n") >= count):
        assert time.monotonic() < deadline, f"fine-tune did not start {count} time(s)"
        time.sleep(0.2)


def outage(infra, server: str, seconds: float) -> None:
    """Stop one of the local servers for `seconds`, then start it again on the same ports."""
    if not infra.pids:
        pytest.skip(f"stopping {server} needs the local servers of `agentforge infra` (not containers)")
    stack = LocalStack()
    assert stack.down([server]) == [server]
    time.sleep(seconds)
    assert stack.up([server], owner=TEST_OWNER) == {server: None}


def assert_exactly_once(settings, events, run_ids) -> None:
    """One PhaseCompleted per step and one PipelineCompleted per run; one output (archive + marker) per phase."""
    completions = Counter((e.run_id, e.phase_completed.phase) for e in events if kind(e) == "phase_completed")
    assert completions == Counter({(run_id, phase): 1 for run_id in run_ids for phase in PHASES}), completions
    finished = Counter(e.run_id for e in events if kind(e) == "pipeline_completed")
    assert finished == Counter({run_id: 1 for run_id in run_ids}), finished
    assert not [e for e in events if kind(e) == "phase_failed"]
    objects = output_objects(settings)
    for phase in PHASES:
        mine = [name for name in objects if name.startswith(f"outputs/{phase}/")]
        assert len(mine) == 2 * len(run_ids), mine


def dead_letters(settings) -> list:
    return asyncio.run(list_dead_letters(KafkaBus(settings.kafka_bootstrap), Topics.from_settings(settings), idle_s=8))


def run_through_outage(fabric, infra, server: str, seconds: float, hold_s: float) -> Path:
    """A run whose fine-tune is under way when `server` stops for `seconds`; asserts it completes once
    with no dead letter, and returns the fine-tune's invocation log."""
    settings, start_services, tmp = fabric
    start_services(SEED, SCALE, FINETUNE)
    log = tmp / "invocations.log"
    run_id = asyncio.run(start_run(settings, three_step_spec(log, hold_s=hold_s)))
    wait_for_invocations(log, 1)
    outage(infra, server, seconds)  # the fine-tune finishes meanwhile and can neither upload nor publish
    events = asyncio.run(run_events(settings, {run_id}, {"pipeline_completed", "phase_failed"}, timeout_s=300,
                                    linger_s=10))
    assert_exactly_once(settings, events, [run_id])
    assert dead_letters(settings) == []
    return log


def test_s3_outage_of_30_s_mid_phase_is_waited_out_without_a_dead_letter(fabric, infra):
    log = run_through_outage(fabric, infra, "s3", 30, hold_s=3.0)
    assert log.read_text().count("\n") == 1  # the upload was retried, not the phase


def test_broker_stopped_and_restarted_mid_run_completes_the_run_once(fabric, infra):
    run_through_outage(fabric, infra, "kafka", 15, hold_s=5.0)


def run_id_on_partition(partitions: set[int], prefix: str) -> str:
    """A run id that Kafka's default partitioner puts on one of `partitions` (records are keyed by run id)."""
    for index in range(1000):
        run_id = f"{prefix}-{index}"
        if (murmur2(run_id.encode()) & 0x7FFFFFFF) % DEFAULT_PARTITIONS in partitions:
            return run_id
    raise AssertionError("no run id found")


def test_a_second_replica_joining_mid_phase_takes_the_record_over_and_the_step_runs_once(fabric):
    settings, start_services, tmp = fabric
    # The round-robin assignor deals sorted partitions to members sorted by id (client id + a UUID):
    # the replica with client id "...-a" that joins gets partitions 0 and 2, so a run there moves to it.
    start_services(SEED, SCALE)
    (first,) = start_services(FINETUNE, extra_env={"AGENTFORGE_KAFKA_CLIENT_ID": "agentforge-fabric_finetune-z"})
    log = tmp / "invocations.log"
    run_id = run_id_on_partition({0, 2}, "rebalance")
    asyncio.run(start_run(settings, three_step_spec(log, hold_first_s=240.0), run_id=run_id))
    wait_for_invocations(log, 1)
    start_services(FINETUNE, extra_env={"AGENTFORGE_KAFKA_CLIENT_ID": "agentforge-fabric_finetune-a"})
    events = asyncio.run(run_events(settings, {run_id}, {"pipeline_completed", "phase_failed"}, timeout_s=200,
                                    linger_s=10))
    assert_exactly_once(settings, events, [run_id])
    assert "abandoning" in first.log_path.read_text()
    assert log.read_text().count("\n") == 2  # abandoned by the first replica, redone by the second


def test_five_concurrent_pipelines_each_complete_once(fabric):
    settings, start_services, tmp = fabric
    start_services(SEED, SCALE, FINETUNE)
    run_ids = set()
    for seed in range(21, 26):
        run_ids.add(asyncio.run(start_run(settings, three_step_spec(tmp / f"invocations-{seed}.log", seed=seed))))
    events = asyncio.run(run_events(settings, run_ids, {"pipeline_completed", "phase_failed"}, timeout_s=400,
                                    linger_s=5))
    assert_exactly_once(settings, events, run_ids)
