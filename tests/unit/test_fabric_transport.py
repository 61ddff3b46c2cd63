"""Checkpoints through the local store: deterministic packing, safe extraction, verification."""
from __future__ import annotations

import io
import tarfile

import pytest

from shared.checkpoint import CheckpointError, verify_checkpoint
from shared.fabric.keys import output_key
from shared.fabric.local_store import LocalStore
from shared.fabric.storage import MissingObject
from shared.fabric.transport import (
    ChecksumMismatch,
    download_checkpoint,
    pack_checkpoint,
    unpack_checkpoint,
    upload_checkpoint,
)
from tests.fabric_phases import seed_checkpoint

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return seed_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", seed=1)


def test_packing_is_deterministic_and_round_trips(checkpoint, tmp_path):
    first = pack_checkpoint(checkpoint, tmp_path / "a.tar")
    for path in checkpoint.iterdir():  # new mtimes must not change the bytes
        path.touch()
    second = pack_checkpoint(checkpoint, tmp_path / "b.tar")
    assert first == second
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
        assert names == sorted(names)
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
    manifest = unpack_checkpoint(tmp_path / "a.tar", tmp_path / "out")
    assert manifest.digest == verify_checkpoint(checkpoint).digest


def test_upload_download_verifies_and_carries_lineage(checkpoint, tmp_path):
    store = LocalStore(tmp_path / "store")
    ref = upload_checkpoint(store, checkpoint, "outputs/x/00-model.tar")
    manifest = verify_checkpoint(checkpoint)
    assert ref.digest == manifest.digest and ref.lineage.phase == manifest.phase
    assert ref.lineage.config_hash == manifest.config_hash
    assert store.stat("outputs/x/00-model.tar").sha256 == ref.sha256
    assert download_checkpoint(store, ref, tmp_path / "got").digest == manifest.digest


def test_sha256_mismatch_and_missing_object_are_refused(checkpoint, tmp_path):
    store = LocalStore(tmp_path / "store")
    ref = upload_checkpoint(store, checkpoint, "k/00-model.tar")
    wrong = type(ref)()
    wrong.CopyFrom(ref)
    wrong.sha256 = "0" * 64
    with pytest.raises(ChecksumMismatch):
        download_checkpoint(store, wrong, tmp_path / "a")
    wrong.CopyFrom(ref)
    wrong.uri = ref.uri.replace("k/00", "k/99")
    with pytest.raises(MissingObject):
        download_checkpoint(store, wrong, tmp_path / "b")


def test_tampered_file_fails_manifest_verification(checkpoint, tmp_path):
    tar_path = tmp_path / "c.tar"
    pack_checkpoint(checkpoint, tar_path)
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    tampered_path = tmp_path / "tampered.tar"
    with tarfile.open(tampered_path, "w") as tar:
        for member, data in members:
            if member.name == "config.json":
                data = data.replace(b"32", b"33", 1)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(CheckpointError, match="config.json"):
        unpack_checkpoint(tampered_path, tmp_path / "t")


@pytest.mark.parametrize("kind", ["escape", "symlink"])
def test_unsafe_archives_are_refused(tmp_path, kind):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        if kind == "escape":
            info = tarfile.TarInfo("../outside.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        else:
            info = tarfile.TarInfo("link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    with pytest.raises(CheckpointError):
        unpack_checkpoint(evil, tmp_path / "x")
    assert not (tmp_path / "outside.txt").exists()


def test_store_keys_cannot_escape_the_root(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")


def test_output_key_is_deterministic_and_depends_on_every_part():
    base = (["a" * 64, "b" * 64], "scale", "1", "c" * 64)
    key = output_key(*base)
    assert key == output_key(*base)
    assert key.startswith("outputs/scale/")
    variants = [
        (["b" * 64, "a" * 64], "scale", "1", "c" * 64),  # input order matters (merges are not symmetric)
        (["a" * 64], "scale", "1", "c" * 64),
        (["a" * 64, "b" * 64], "noise", "1", "c" * 64),
        (["a" * 64, "b" * 64], "scale", "2", "c" * 64),
        (["a" * 64, "b" * 64], "scale", "1", "d" * 64),
    ]
    assert len({output_key(*v) for v in variants} | {key}) == len(variants) + 1
