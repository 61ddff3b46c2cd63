"""Object store on any S3-compatible server through the `minio` client.

Uploads above PART_SIZE go multipart; the SHA-256 goes into the object's metadata because a multipart
ETag is not a digest of the object. The bucket gets versioning (version ids travel in events) and a rule
that aborts incomplete multipart uploads, where the server supports them; where not, we go on without.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from urllib.parse import urlparse

from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import S3Error
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, LifecycleConfig, Rule
from minio.versioningconfig import VersioningConfig

from shared.fabric.storage import MissingObject, ObjectStore, StoredObject
from shared.settings import Settings

log = logging.getLogger(__name__)

PART_SIZE = 16 * 1024 * 1024  # S3 needs >= 5 MiB parts and <= 10,000 of them: 16 MiB parts reach 160 GB
SHA256_META = "sha256"  # stored as x-amz-meta-sha256
_MISSING_CODES = {"NoSuchKey", "NoSuchVersion", "NoSuchObject"}
_EXISTS_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


class S3Store(ObjectStore):
    def __init__(self, client: Minio, bucket: str) -> None:
        self.client, self.bucket = client, bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key or None,
            secret_key=settings.s3_secret_key or None,
            secure=settings.s3_secure,
        )
        store = cls(client, settings.s3_bucket)
        store.prepare_bucket()
        return store

    def prepare_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as error:
                if error.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise
        try:
            self.client.set_bucket_versioning(self.bucket, VersioningConfig(ENABLED))
        except S3Error as error:
            log.warning("bucket %s: versioning not available (%s); version ids stay empty", self.bucket, error.code)
        rule = Rule(
            ENABLED,
            rule_filter=Filter(prefix=""),
            rule_id="abort-incomplete-multipart-uploads",
            abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(days_after_initiation=1),
        )
        try:
            self.client.set_bucket_lifecycle(self.bucket, LifecycleConfig([rule]))
        except S3Error as error:
            log.warning("bucket %s: lifecycle rules not available (%s)", self.bucket, error.code)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _key(self, uri: str) -> str:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or parsed.netloc != self.bucket:
            raise ValueError(f"{uri!r} is not an object of s3://{self.bucket}")
        return parsed.path.lstrip("/")

    def put_file(self, key: str, path: Path, sha256: str) -> StoredObject:
        result = self.client.fput_object(
            self.bucket, key, str(path), metadata={SHA256_META: sha256}, part_size=PART_SIZE
        )
        return StoredObject(self.uri(key), sha256, Path(path).stat().st_size, result.version_id or "")

    def get_file(self, uri: str, dest: Path, version_id: str = "") -> None:
        try:
            self.client.fget_object(self.bucket, self._key(uri), str(dest), version_id=version_id or None)
        except S3Error as error:
            if error.code in _MISSING_CODES:
                raise MissingObject(f"no object at {uri} (version {version_id or 'latest'})") from error
            raise

    def stat(self, key: str, version_id: str = "") -> StoredObject | None:
        try:
            info = self.client.stat_object(self.bucket, key, version_id=version_id or None)
        except S3Error as error:
            if error.code in _MISSING_CODES:
                return None
            raise
        sha256 = (info.metadata or {}).get(f"x-amz-meta-{SHA256_META}", "")
        return StoredObject(self.uri(key), sha256, info.size or 0, info.version_id or "")

    def stat_uri(self, uri: str, version_id: str = "") -> StoredObject | None:
        return self.stat(self._key(uri), version_id)

    def put_bytes(self, key: str, payload: bytes) -> StoredObject:
        sha256 = hashlib.sha256(payload).hexdigest()
        result = self.client.put_object(
            self.bucket, key, io.BytesIO(payload), len(payload), metadata={SHA256_META: sha256}
        )
        return StoredObject(self.uri(key), sha256, len(payload), result.version_id or "")

    def put_bytes_if_absent(self, key: str, payload: bytes) -> bool:
        # S3's conditional write (If-None-Match: *), checked by the server under its publish lock. The
        # minio client's public put_object takes no request headers, so this uses the PutObject call
        # beneath it; tests/integration/test_infra_s3.py checks it against the real server.
        headers = {"If-None-Match": "*", "Content-Type": "application/octet-stream",
                   f"x-amz-meta-{SHA256_META}": hashlib.sha256(payload).hexdigest()}
        try:
            self.client._put_object(self.bucket, key, payload, headers)
        except S3Error as error:
            if error.code in _EXISTS_CODES:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as error:
            if error.code in _MISSING_CODES:
                return None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()
