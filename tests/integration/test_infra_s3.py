"""A 50 MB object round-trips through the local S3 server unchanged."""
import hashlib
import io
import random
import uuid

import pytest
from minio import Minio

pytestmark = pytest.mark.integration

SIZE = 50 * 1024 * 1024
CHUNK = 1024 * 1024
PART = 8 * 1024 * 1024  # so the upload is multipart, as checkpoints of real models are: 7 parts


def test_50_mb_object_round_trips_with_the_same_sha256(infra):
    infra.require("s3")
    payload = random.Random(20261125).randbytes(SIZE)
    expected = hashlib.sha256(payload).hexdigest()
    settings = infra.settings
    client = Minio(settings.s3_endpoint, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                   secure=settings.s3_secure)
    name = f"infra-test/{uuid.uuid4().hex}.bin"

    written = client.put_object(settings.s3_bucket, name, io.BytesIO(payload), length=SIZE, part_size=PART)
    try:
        assert written.etag.endswith("-7")  # S3's ETag of an object assembled from 7 parts
        assert client.stat_object(settings.s3_bucket, name).size == SIZE
        response = client.get_object(settings.s3_bucket, name)
        try:
            digest = hashlib.sha256()
            for chunk in response.stream(CHUNK):
                digest.update(chunk)
        finally:
            response.close()
            response.release_conn()
    finally:
        client.remove_object(settings.s3_bucket, name)
    assert digest.hexdigest() == expected


def test_a_conditional_write_keeps_the_first_writers_object(infra):
    from shared.fabric.s3_store import S3Store

    infra.require("s3")
    store = S3Store.from_settings(infra.settings)
    key = f"infra-test/{uuid.uuid4().hex}/completed.pb"
    try:
        assert store.put_bytes_if_absent(key, b"first")
        assert not store.put_bytes_if_absent(key, b"second")
        assert store.get_bytes(key) == b"first"
        assert store.stat(key).sha256 == hashlib.sha256(b"first").hexdigest()
    finally:
        store.delete(key)
    assert store.get_bytes(key) is None
