"""Object store in a local folder, for embedded mode: <root>/<key>, with <root>/<key>.sha256 beside it.

Writes go to a temporary name first and are renamed into place, so a reader never sees half an object.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared.checkpoint import sha256_file
from shared.fabric.storage import MissingObject, ObjectStore, StoredObject


class LocalStore(ObjectStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"object key {key!r} escapes the store")
        return path

    def _write(self, path: Path, fill) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            fill(Path(tmp))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _stored(self, path: Path, sha256: str) -> StoredObject:
        return StoredObject(uri=path.as_uri(), sha256=sha256, size=path.stat().st_size)

    def put_file(self, key: str, path: Path, sha256: str) -> StoredObject:
        target = self._path(key)
        self._write(target, lambda tmp: shutil.copyfile(path, tmp))
        self._write(target.with_name(target.name + ".sha256"), lambda tmp: tmp.write_text(sha256))
        return self._stored(target, sha256)

    def _source(self, uri: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ValueError(f"the local store reads file:// URIs, not {uri!r}")
        source = Path(unquote(parsed.path)).resolve()
        if not source.is_relative_to(self.root):
            raise ValueError(f"{uri} is outside the store at {self.root}")
        return source

    def get_file(self, uri: str, dest: Path, version_id: str = "") -> None:
        source = self._source(uri)
        if not source.is_file():
            raise MissingObject(f"no object at {uri}")
        shutil.copyfile(source, dest)

    def stat(self, key: str) -> StoredObject | None:
        return self._stat(self._path(key))

    def stat_uri(self, uri: str, version_id: str = "") -> StoredObject | None:
        return self._stat(self._source(uri))

    def _stat(self, path: Path) -> StoredObject | None:
        checksum = path.with_name(path.name + ".sha256")
        if not path.is_file() or not checksum.is_file():
            return None
        return self._stored(path, checksum.read_text())

    def put_bytes(self, key: str, payload: bytes) -> StoredObject:
        target = self._path(key)
        self._write(target, lambda tmp: tmp.write_bytes(payload))
        digest = sha256_file(target)
        self._write(target.with_name(target.name + ".sha256"), lambda tmp: tmp.write_text(digest))
        return self._stored(target, digest)

    def put_bytes_if_absent(self, key: str, payload: bytes) -> bool:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(payload)
            os.link(tmp, target)  # atomic, and fails if the name exists: the first writer wins
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._write(target.with_name(target.name + ".sha256"), lambda t: t.write_text(sha256_file(target)))
        return True

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None
