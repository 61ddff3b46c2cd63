"""The S3 server: Versity's S3 gateway (versitygw, Apache-2.0) serving a folder of the cache over S3.

Built from infra/local/versitygw/ (a pinned `go get -tool` module). Its posix backend keeps object
metadata in user extended attributes; where the cache's file system has none, it is started with
`--sidecar <dir>` instead, versitygw's own way of keeping metadata in files.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import S3Error

from shared.localinfra.gobuild import GoTool
from shared.localinfra.layout import InfraLayout
from shared.localinfra.ports import LOOPBACK
from shared.localinfra.server import Launch, LocalServer, NotHealthy

VERSITYGW = GoTool(name="versitygw", module="github.com/versity/versitygw",
                   package="github.com/versity/versitygw/cmd/versitygw")


def supports_user_xattrs(folder: Path) -> bool:
    probe = folder / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.agentforge", b"1")
        return os.getxattr(probe, "user.agentforge") == b"1"
    except OSError:
        return False
    finally:
        probe.unlink()


class S3Server(LocalServer):
    name = "s3"
    port_names = ("s3",)

    def __init__(self, layout: InfraLayout, bucket: str):
        super().__init__(layout)
        self.bucket = bucket

    @property
    def binary(self) -> Path:
        return VERSITYGW.binary(self.layout.bin_dir)

    def installed(self) -> bool:
        return self.binary.exists() and self.layout.s3_credentials_file.exists()

    def install(self) -> None:
        VERSITYGW.build(self.layout.bin_dir)
        self.ensure_credentials()

    def ensure_credentials(self) -> None:
        # Random root keys, made once per cache folder; the file is readable by its owner only.
        path = self.layout.s3_credentials_file
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = {"access_key": secrets.token_hex(10), "secret_key": secrets.token_urlsafe(30)}
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(keys, file)

    def credentials(self) -> dict[str, str]:
        return json.loads(self.layout.s3_credentials_file.read_text())

    @property
    def sidecar_dir(self) -> Path:
        return self.layout.server_dir(self.name) / "sidecar"

    def launch(self, ports: dict[str, int]) -> Launch:
        backend = ["posix"]
        if not supports_user_xattrs(self.data_dir):
            self.sidecar_dir.mkdir(parents=True, exist_ok=True)
            backend += ["--sidecar", str(self.sidecar_dir)]
        keys = self.credentials()
        # The keys travel in the environment (versitygw reads ROOT_ACCESS_KEY_ID / ROOT_SECRET_ACCESS_KEY),
        # not on the command line where `ps` would show them.
        return Launch([str(self.binary), "--port", f"{LOOPBACK}:{ports['s3']}", *backend, str(self.data_dir)],
                      env={"ROOT_ACCESS_KEY_ID": keys["access_key"], "ROOT_SECRET_ACCESS_KEY": keys["secret_key"]})

    def client(self, ports: dict[str, int]) -> Minio:
        keys = self.credentials()
        # No retries: a health probe must answer now, not after urllib3's back-off.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=5), retries=False)
        return Minio(f"{LOOPBACK}:{ports['s3']}", access_key=keys["access_key"], secret_key=keys["secret_key"],
                     secure=False, http_client=http)

    def check_health(self, ports: dict[str, int]) -> None:
        try:
            self.client(ports).list_buckets()  # a signed request: checks the keys as well as the socket
        except (S3Error, urllib3.exceptions.HTTPError) as error:
            raise NotHealthy(f"S3 server at {LOOPBACK}:{ports['s3']} does not answer: {error!r}") from error

    def after_healthy(self, ports: dict[str, int]) -> None:
        client = self.client(ports)
        if not client.bucket_exists(self.bucket):
            client.make_bucket(self.bucket)

    def settings_env(self, ports: dict[str, int]) -> dict[str, str]:
        keys = self.credentials()
        return {"AGENTFORGE_S3_ENDPOINT": f"{LOOPBACK}:{ports['s3']}",
                "AGENTFORGE_S3_ACCESS_KEY": keys["access_key"],
                "AGENTFORGE_S3_SECRET_KEY": keys["secret_key"],
                "AGENTFORGE_S3_BUCKET": self.bucket}
