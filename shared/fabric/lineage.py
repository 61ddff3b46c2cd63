"""Which checkpoint a user means, and where it came from: the chain of checkpoints, phases, configs and
digests behind it, read from the manifests themselves (each archive is downloaded and its SHA-256 checked).

A checkpoint of a run is named `RUN_ID` (the run's final output), `RUN_ID:STEP` (a step's output, by index
or phase name) or `RUN_ID:STEP:NAME` (one model of a step with several, as Cognate's). A manifest names its
parents by content digest; the run's completed steps map each digest back to the step that made it.
"""
from __future__ import annotations

import io
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.checkpoint import MANIFEST, CheckpointError, Manifest, sha256_file
from shared.contracts.agentforge.v1 import checkpoint_pb2, control_pb2
from shared.fabric.local_store import LocalStore
from shared.fabric.storage import ObjectStore
from shared.fabric.transport import ChecksumMismatch
from shared.settings import Settings

CheckpointRef = checkpoint_pb2.CheckpointRef


@dataclass(frozen=True)
class Produced:
    """A checkpoint a run made: the step, its phase, and the reference the step's event carried."""

    step: int
    phase: str
    ref: CheckpointRef


@dataclass(frozen=True)
class Link:
    """One checkpoint in a lineage, `depth` hand-offs before the one asked about."""

    depth: int
    produced: Produced | None  # None: a parent digest no step of the run made
    digest: str
    manifest: Manifest | None


def store_for(settings: Settings, uri: str) -> ObjectStore:
    if uri.startswith("s3://"):
        from shared.fabric.s3_store import S3Store

        return S3Store.from_settings(settings)
    return LocalStore(settings.local_store)


def produced_by_run(status: control_pb2.RunStatus) -> list[Produced]:
    return [Produced(done.step, done.phase, ref) for done in status.completed_steps for ref in done.outputs]


def parse_reference(reference: str) -> tuple[str, str, str]:
    """`RUN_ID[:STEP[:NAME]]` as (run id, step, name), the missing parts empty."""
    run_id, step, name = [*reference.split(":", 2), "", ""][:3]
    if not run_id:
        raise ValueError(f"{reference!r} names no run: give RUN_ID, RUN_ID:STEP or RUN_ID:STEP:NAME")
    return run_id, step, name


def pick(status: control_pb2.RunStatus, step: str = "", name: str = "") -> Produced:
    """The checkpoint of the run that `step` (index or phase name; empty: the last step) and `name` select."""
    produced = produced_by_run(status)
    if not produced:
        raise LookupError(f"run {status.run_id} has no completed step yet")
    if not step:
        chosen = [p for p in produced if p.step == max(p.step for p in produced)]
    elif step.isdigit():
        chosen = [p for p in produced if p.step == int(step)]
    else:
        chosen = [p for p in produced if p.phase == step]
    if not chosen:
        steps = sorted({f"{p.step} ({p.phase})" for p in produced})
        raise LookupError(f"run {status.run_id} has no completed step {step!r}; completed: {', '.join(steps)}")
    names = sorted(p.ref.name for p in chosen)
    if name:
        chosen = [p for p in chosen if p.ref.name == name]
    if len(chosen) != 1:
        what = f"no model named {name!r}" if name else f"{len(names)} models"
        raise LookupError(f"step {step or 'last'} of run {status.run_id} made {what}: choose one of "
                          f"{', '.join(names)} with RUN_ID:STEP:NAME")
    return chosen[0]


@dataclass(frozen=True)
class Archive:
    """What a stored checkpoint archive holds, read without unpacking it: its manifest and each file's bytes."""

    manifest: Manifest
    sizes: dict[str, int]


def read_archive(store: ObjectStore, ref: CheckpointRef) -> Archive:
    """The manifest and file sizes of a stored checkpoint archive, after the archive's SHA-256 is checked."""
    with tempfile.TemporaryDirectory() as folder:
        tar_path = Path(folder) / "checkpoint.tar"
        store.get_file(ref.uri, tar_path, ref.version_id)
        if (actual := sha256_file(tar_path)) != ref.sha256:
            raise ChecksumMismatch(f"{ref.uri}: SHA-256 {actual} but the run's event says {ref.sha256}")
        try:
            with tarfile.open(tar_path, "r:") as tar:
                sizes = {member.name: member.size for member in tar.getmembers() if member.isfile()}
                member = tar.extractfile(MANIFEST)
                text = io.TextIOWrapper(member, encoding="utf-8").read() if member else None
        except (tarfile.TarError, KeyError) as error:
            raise CheckpointError(f"{ref.uri}: no readable {MANIFEST}: {error}") from error
    if text is None:
        raise CheckpointError(f"{ref.uri}: {MANIFEST} is not a file")
    manifest = Manifest.from_json(text)
    if ref.digest and manifest.digest != ref.digest:
        raise CheckpointError(f"{ref.uri}: the manifest's digest {manifest.digest[:12]}… is not the run's {ref.digest[:12]}…")
    return Archive(manifest, sizes)


def read_manifest(store: ObjectStore, ref: CheckpointRef) -> Manifest:
    return read_archive(store, ref).manifest


def lineage(status: control_pb2.RunStatus, store_of, start: Produced) -> Iterator[Link]:
    """The checkpoint `start` and, depth first, every checkpoint it descends from (each once).
    `store_of(uri)` gives the store holding an archive."""
    made = {p.ref.digest: p for p in produced_by_run(status)}
    seen: set[str] = set()
    stack = [(0, start.ref.digest)]
    while stack:
        depth, digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        produced = made.get(digest)
        manifest = read_manifest(store_of(produced.ref.uri), produced.ref) if produced else None
        yield Link(depth, produced, digest, manifest)
        if manifest is not None:
            stack.extend((depth + 1, parent) for parent in reversed(manifest.parents))
