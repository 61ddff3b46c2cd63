"""Moving a checkpoint folder (shared/checkpoint.py) through an object store.

A checkpoint travels as one uncompressed tar packed deterministically (sorted entries, zeroed mtimes and
owners, fixed modes), so the same folder always gives the same bytes and the same SHA-256. Safetensors
weights barely compress, so compression would cost time for nothing. Downloads are checked twice: the
tar's SHA-256 against the event, then every file against the manifest (verify_checkpoint). Extraction
uses tarfile's "data" filter: no absolute paths, no links out of the folder, no devices.
"""
from __future__ import annotations

import tarfile
from collections.abc import Callable
import tempfile
from pathlib import Path

from shared.checkpoint import CheckpointError, Manifest, sha256_file, verify_checkpoint
from shared.contracts.agentforge.v1 import checkpoint_pb2
from shared.fabric.storage import ObjectStore

PACKED_FORMAT = "agentforge.checkpoint/v1+tar"


class ChecksumMismatch(CheckpointError):
    """The downloaded bytes are not the ones the event names."""


def pack_checkpoint(directory: Path, tar_path: Path) -> str:
    """Write `directory` as a deterministic tar at `tar_path`; return the tar's SHA-256."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.relative_to(directory).as_posix())
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return sha256_file(tar_path)


def unpack_checkpoint(tar_path: Path, directory: Path) -> Manifest:
    """Extract safely into `directory` (which must be empty or absent) and verify against the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise ValueError(f"{directory} is not empty")
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    raise CheckpointError(f"checkpoint archive holds {member.name!r}, which is not a regular file")
            tar.extractall(directory, filter="data")
    except tarfile.TarError as error:
        raise CheckpointError(f"not a checkpoint archive: {error}") from error
    return verify_checkpoint(directory)


def upload_checkpoint(
    store: ObjectStore, directory: Path, key: str | Callable[[str], str]
) -> checkpoint_pb2.CheckpointRef:
    """Pack, upload under `key` (or key(tar SHA-256), for names that carry their content), and describe
    it for an event (with the manifest's lineage)."""
    manifest = verify_checkpoint(directory)
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = Path(tmp) / "checkpoint.tar"
        sha256 = pack_checkpoint(directory, tar_path)
        stored = store.put_file(key(sha256) if callable(key) else key, tar_path, sha256)
    return checkpoint_pb2.CheckpointRef(
        uri=stored.uri,
        sha256=stored.sha256,
        size=stored.size,
        version_id=stored.version_id,
        format=PACKED_FORMAT,
        digest=manifest.digest,
        name=manifest.name,
        lineage=checkpoint_pb2.Lineage(
            parent_digests=manifest.parents,
            phase=manifest.phase,
            code_version=manifest.code_version,
            config_hash=manifest.config_hash,
        ),
    )


def download_checkpoint(store: ObjectStore, ref: checkpoint_pb2.CheckpointRef, directory: Path) -> Manifest:
    """Download, check the SHA-256 the event states, extract and verify. Raises MissingObject,
    ChecksumMismatch or CheckpointError."""
    if ref.format != PACKED_FORMAT:
        raise CheckpointError(f"{ref.uri}: unknown packing {ref.format!r}, expected {PACKED_FORMAT!r}")
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = Path(tmp) / "checkpoint.tar"
        store.get_file(ref.uri, tar_path, ref.version_id)
        actual = sha256_file(tar_path)
        if actual != ref.sha256:
            raise ChecksumMismatch(f"{ref.uri}: SHA-256 {actual} but the event says {ref.sha256}")
        manifest = unpack_checkpoint(tar_path, directory)
    if ref.digest and manifest.digest != ref.digest:
        raise ChecksumMismatch(f"{ref.uri}: checkpoint digest {manifest.digest} but the event says {ref.digest}")
    return manifest
