"""Naming a run's checkpoints (RUN_ID[:STEP[:NAME]]) and reading a stored archive's manifest, on a real
run of the fabric's test phases; the whole eight-phase lineage is in test_smoke_pipeline.py."""
from __future__ import annotations

import pytest

from shared.checkpoint import CheckpointError
from shared.contracts.agentforge.v1 import control_pb2
from shared.fabric.embedded import run_embedded
from shared.fabric.events import pipeline_spec
from shared.fabric.lineage import lineage, parse_reference, pick, read_manifest
from shared.fabric.local_store import LocalStore
from shared.fabric.transport import ChecksumMismatch
from shared.settings import Settings
from tests.fabric_phases import ScaleWeights, SeedModel, altered, spec_for

pytestmark = pytest.mark.unit

SEED, SCALE = spec_for(SeedModel, ScaleWeights)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    store = LocalStore(tmp_path_factory.mktemp("store"))
    spec = pipeline_spec([(SEED, {"seed": 2, "count": 2}), (SCALE, {"factor": 0.5})], name="two")
    result = run_embedded(spec, store=store, settings=Settings())
    status = control_pb2.RunStatus(run_id=result.run_id, spec=spec, completed_steps=result.steps)
    for index, step in enumerate(status.completed_steps):
        step.step = index
    return status, store


def test_references_parse_into_run_step_and_name():
    assert parse_reference("abc") == ("abc", "", "")
    assert parse_reference("abc:2") == ("abc", "2", "")
    assert parse_reference("abc:cognate:base") == ("abc", "cognate", "base")
    with pytest.raises(ValueError, match="names no run"):
        parse_reference(":2")


def test_pick_selects_by_index_phase_and_name_and_says_what_there_is(run):
    status, _ = run
    names = [ref.name for ref in status.completed_steps[0].outputs]
    with pytest.raises(LookupError, match="made 2 models: choose one of"):
        pick(status)  # the last step, which made two
    assert pick(status, "1", names[1]).ref == status.completed_steps[1].outputs[1]
    assert pick(status, "fabric_seed", names[0]).ref == status.completed_steps[0].outputs[0]
    with pytest.raises(LookupError, match="no model named 'nope'"):
        pick(status, "fabric_seed", "nope")
    with pytest.raises(LookupError, match="no completed step '7'; completed: 0 \\(fabric_seed\\), 1"):
        pick(status, "7")


def test_lineage_follows_the_manifests_parents_and_refuses_a_wrong_archive(run):
    status, store = run
    seeds = status.completed_steps[0].outputs
    chosen = pick(status, "fabric_scale", seeds[0].name)
    links = list(lineage(status, lambda uri: store, chosen))
    assert [link.manifest.phase for link in links] == ["fabric_scale", "fabric_seed", "fabric_seed"]
    assert links[0].manifest.parents == [ref.digest for ref in seeds]  # every input of the step, in order
    assert [link.digest for link in links[1:]] == [ref.digest for ref in seeds] and links[1].depth == 1
    with pytest.raises(ChecksumMismatch):
        read_manifest(store, altered(chosen.ref, sha256="0" * 64))
    with pytest.raises(CheckpointError, match="not the run's"):
        read_manifest(store, altered(seeds[0], digest=chosen.ref.digest))
