"""The checkpoint every phase exchanges: a model folder plus a manifest.

Layout of a checkpoint folder:
    config.json, model.safetensors (or shards), tokenizer files   -- written by save_pretrained
    <extra files>                                                  -- e.g. a packed ternary file
    carried/<files>                                                -- files the model carries on (ForgedModel.carried)
    manifest.json                                                  -- SHA-256 of every other file, lineage, metrics

The checkpoint's digest is the SHA-256 of its file listing (relative path and SHA-256 of each file,
manifest excluded), so it names the content alone: the same weights give the same digest whatever the
timings in the report. Loading verifies every file and refuses anything that could unpickle.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.phase import ForgedModel

MANIFEST = "manifest.json"
CARRIED = "carried"
FORMAT = "agentforge.checkpoint/v1"
# Files that can execute code when loaded; a checkpoint holding any of them is refused.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")


class CheckpointError(ValueError):
    """The checkpoint is corrupt, tampered with, or unsafe to load."""


@dataclass
class Manifest:
    name: str
    phase: str
    code_version: str
    config: dict[str, Any]
    config_hash: str
    parents: list[str]  # digests of the input checkpoints
    files: dict[str, str]  # relative path -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def digest(self) -> str:
        return digest_of_files(self.files)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "digest": self.digest}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        stated = raw.pop("digest", None)
        manifest = cls(**raw)
        if manifest.format != FORMAT:
            raise CheckpointError(f"unknown checkpoint format {manifest.format!r}, expected {FORMAT!r}")
        if stated is not None and stated != manifest.digest:
            raise CheckpointError("manifest digest does not match its file listing")
        return manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_of_files(files: dict[str, str]) -> str:
    listing = "".join(f"{path}\0{sha}\n" for path, sha in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def _refuse_unsafe(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.suffix.lower() in UNSAFE_SUFFIXES:
            raise CheckpointError(f"refusing {path.name}: only safetensors weights are accepted")


def save_checkpoint(
    forged: ForgedModel,
    directory: Path,
    *,
    phase: str,
    code_version: str,
    config: dict[str, Any],
    config_hash: str,
    parents: list[str],
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Manifest:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    forged.model.save_pretrained(directory, safe_serialization=True)
    forged.tokenizer.save_pretrained(directory)
    for name, payload in (extra_files or {}).items():
        (directory / name).write_bytes(payload)
    for name, payload in forged.carried.items():
        (directory / CARRIED).mkdir(exist_ok=True)
        (directory / CARRIED / name).write_bytes(payload)
    _refuse_unsafe(directory)
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = Manifest(
        name=forged.name,
        phase=phase,
        code_version=code_version,
        config=config,
        config_hash=config_hash,
        parents=list(parents),
        files=files,
        metrics=metrics or {},
    )
    (directory / MANIFEST).write_text(manifest.to_json())
    return manifest


def verify_checkpoint(directory: Path) -> Manifest:
    """Check every file against the manifest; raise CheckpointError on any difference."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}")
    manifest = Manifest.from_json(manifest_path.read_text())
    _refuse_unsafe(directory)
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    if present != set(manifest.files):
        extra, missing = present - set(manifest.files), set(manifest.files) - present
        raise CheckpointError(f"file listing differs from manifest: extra {sorted(extra)}, missing {sorted(missing)}")
    for rel, expected in manifest.files.items():
        actual = sha256_file(directory / rel)
        if actual != expected:
            raise CheckpointError(f"{rel}: SHA-256 {actual[:12]}… does not match manifest {expected[:12]}…")
    return manifest


def load_checkpoint(directory: Path) -> tuple[ForgedModel, Manifest]:
    """Verify, then load the model and tokenizer from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = verify_checkpoint(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    carried = {Path(rel).name: (directory / rel).read_bytes() for rel in manifest.files
               if Path(rel).parent == Path(CARRIED)}
    return ForgedModel(model=model, tokenizer=tokenizer, name=manifest.name, carried=carried), manifest
