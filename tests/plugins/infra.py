"""Session fixture `infra`: the real Kafka, S3 server and Jaeger for integration tests.

By default it uses the servers of `agentforge infra` (see shared/localinfra): those already running are
reused, the others are started for the session. Several test sessions may share the servers (they take
turns through the cache folder's lock and each leaves a lease there); the last session to finish stops
the servers that test sessions started, never ones started by hand with `agentforge infra up`.

With AGENTFORGE_INFRA=testcontainers (and a Docker engine) the same fixture runs the three servers as
containers instead. That path has not been run on our machines, which have no Docker engine.

A server that cannot be obtained makes the tests that need it skip, with the reason (never a mock).
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import psutil
import pytest
from minio import Minio
from tenacity import retry, stop_after_delay, wait_fixed

from shared.localinfra.stack import LocalStack
from shared.settings import Settings

TESTCONTAINERS = "testcontainers"
TEST_OWNER = "pytest"
PREFIX = Settings.model_config["env_prefix"]


@dataclass(frozen=True)
class InfraEndpoints:
    env: dict[str, str]  # the exported AGENTFORGE_* / OTEL_* variables
    unavailable: dict[str, str] = field(default_factory=dict)  # server name -> why it is not there
    pids: dict[str, int] = field(default_factory=dict)  # local server processes (empty for containers)

    @property
    def settings(self) -> Settings:
        """What a service would read from the exported variables."""
        return Settings(**{name.removeprefix(PREFIX).lower(): value for name, value in self.env.items()
                           if name.startswith(PREFIX)})

    def require(self, *names: str) -> None:
        missing = {name: self.unavailable[name] for name in names if name in self.unavailable}
        if missing:
            pytest.skip("; ".join(f"{name} unavailable: {reason}" for name, reason in missing.items()))


@pytest.fixture(scope="session")
def infra() -> Iterator[InfraEndpoints]:
    servers = _containers if os.environ.get("AGENTFORGE_INFRA") == TESTCONTAINERS else _local_servers
    with servers() as endpoints, pytest.MonkeyPatch.context() as patch:
        for name, value in endpoints.env.items():
            patch.setenv(name, value)
        yield endpoints


@contextmanager
def _local_servers() -> Iterator[InfraEndpoints]:
    stack = LocalStack()
    leases = stack.layout.root / "test-sessions"
    lease = leases / str(os.getpid())
    with stack.locked():
        leases.mkdir(parents=True, exist_ok=True)
        lease.touch()
        results = stack.up(owner=TEST_OWNER)
        running = stack.running()
        env = stack.env()
    try:
        yield InfraEndpoints(env=env, unavailable={name: error for name, error in results.items() if error},
                             pids={name: proc.pid for name, proc in running.items()})
    finally:
        with stack.locked():
            lease.unlink(missing_ok=True)
            for stale in [path for path in leases.iterdir() if not psutil.pid_exists(int(path.name))]:
                stale.unlink()  # a session that crashed
            if not any(leases.iterdir()):
                stack.down(owner=TEST_OWNER)


@contextmanager
def _containers() -> Iterator[InfraEndpoints]:
    # Imported here: only this path needs the Docker client.
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    access_key, secret_key, bucket = secrets.token_hex(10), secrets.token_urlsafe(30), Settings().s3_bucket
    # Factories: building a container already asks the Docker engine for its version.
    factories = {
        "kafka": lambda: KafkaContainer("confluentinc/cp-kafka:8.0.0").with_kraft(),  # Apache Kafka 4.0
        "s3": lambda: DockerContainer("versity/versitygw:v1.8.0").with_exposed_ports(7070)
        .with_env("ROOT_ACCESS_KEY_ID", access_key).with_env("ROOT_SECRET_ACCESS_KEY", secret_key)
        .with_command("--port :7070 posix /tmp"),
        "jaeger": lambda: DockerContainer("jaegertracing/jaeger:2.13.0").with_exposed_ports(4318, 16686),
    }
    with ExitStack() as running:
        containers, env, unavailable = {}, {}, {}
        for name, factory in factories.items():
            try:
                containers[name] = running.enter_context(factory())
            except Exception as error:  # no Docker engine, no image: the tests needing it skip
                unavailable[name] = f"its container did not start: {error!r}"
        if "kafka" not in unavailable:
            env["AGENTFORGE_KAFKA_BOOTSTRAP"] = containers["kafka"].get_bootstrap_server()
        if "s3" not in unavailable:
            s3 = containers["s3"]
            endpoint = f"{s3.get_container_host_ip()}:{s3.get_exposed_port(7070)}"
            _make_bucket(endpoint, access_key, secret_key, bucket)
            env.update({"AGENTFORGE_S3_ENDPOINT": endpoint, "AGENTFORGE_S3_ACCESS_KEY": access_key,
                        "AGENTFORGE_S3_SECRET_KEY": secret_key, "AGENTFORGE_S3_BUCKET": bucket})
        if "jaeger" not in unavailable:
            jaeger = containers["jaeger"]
            wait_for_logs(jaeger, "Everything is ready")
            host = jaeger.get_container_host_ip()
            otlp = f"http://{host}:{jaeger.get_exposed_port(4318)}"
            env.update({"AGENTFORGE_OTLP_ENDPOINT": otlp, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
                        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                        "AGENTFORGE_JAEGER_QUERY_URL": f"http://{host}:{jaeger.get_exposed_port(16686)}"})
        yield InfraEndpoints(env=env, unavailable=unavailable)


def _make_bucket(endpoint: str, access_key: str, secret_key: str, bucket: str) -> None:
    client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False)
    # The gateway's port opens a moment after the container starts.
    retry(stop=stop_after_delay(30), wait=wait_fixed(0.5), reraise=True)(client.make_bucket)(bucket)
