"""Where packed checkpoints live: an object store interface with S3 and local-folder backends.

Keys are paths like "outputs/cognate/<hash>/00-model-<sha256 prefix>.tar". Every object carries the SHA-256 of its bytes
(S3: object metadata, since a multipart ETag is not a digest of the object), so a reader can verify it.
Calls block (the minio client is synchronous); the async runtime calls them in a thread.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path


class MissingObject(LookupError):
    """No object under that key (or version)."""


@dataclass(frozen=True)
class StoredObject:
    uri: str
    sha256: str
    size: int
    version_id: str = ""


class ObjectStore(ABC):
    @abstractmethod
    def put_file(self, key: str, path: Path, sha256: str) -> StoredObject:
        """Upload `path` under `key`, recording `sha256` (the caller computed it while packing)."""

    @abstractmethod
    def get_file(self, uri: str, dest: Path, version_id: str = "") -> None:
        """Download the object named by `uri` to `dest`; MissingObject if it is not there."""

    @abstractmethod
    def stat(self, key: str) -> StoredObject | None:
        """The object under `key`, or None."""

    @abstractmethod
    def stat_uri(self, uri: str, version_id: str = "") -> StoredObject | None:
        """The object named by `uri` (an event's reference), or None."""

    @abstractmethod
    def put_bytes(self, key: str, payload: bytes) -> StoredObject: ...

    @abstractmethod
    def put_bytes_if_absent(self, key: str, payload: bytes) -> bool:
        """Write `payload` under `key` unless an object is there, atomically: True if this call wrote it.
        Of two writers of one completion marker, the first wins and the second adopts its outputs."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """Small objects (completion markers); None if absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object under `key` (nothing if absent)."""
