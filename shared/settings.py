"""Where the services find Kafka, the S3 server and Jaeger.

Every value comes from an environment variable prefixed AGENTFORGE_ (`agentforge infra env` prints them
for the local servers), so tests and manifests configure services the same way. Defaults are the
embedded mode: no server at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "agentforge"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTFORGE_", extra="ignore", frozen=True)

    mode: Literal["embedded", "distributed"] = "embedded"
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # Embedded mode keeps checkpoints and events under this folder.
    local_store: Path = Field(default_factory=lambda: default_cache_dir() / "store")

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_client_id: str = ""  # a service's Kafka client id (broker logs, member ids); "" is agentforge-<phase>
    topic_prefix: str = "agentforge"

    s3_endpoint: str = "127.0.0.1:9000"  # host:port, as the minio client takes it
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "agentforge"
    s3_secure: bool = False

    # OTLP/HTTP traces endpoint of the collector (Jaeger v2), e.g. http://127.0.0.1:4318
    otlp_endpoint: str = ""
    jaeger_query_url: str = ""  # e.g. http://127.0.0.1:16686, for /api/v3 and trace links

    grpc_addr: str = "127.0.0.1:50051"  # control service
    health_addr: str = "127.0.0.1:8080"  # each phase service's health endpoint
    # How long a phase service waits out S3 or Kafka being unreachable before it dead-letters the event.
    retry_window_s: float = Field(default=300.0, ge=0)

    # Whether a pipeline step may name its phase as "module:Class" instead of a registered name. Off by default:
    # steps arrive in events and gRPC requests, and importing a module they name runs that module's code.
    allow_module_phases: bool = False


def load_settings(**overrides) -> Settings:
    return Settings(**overrides)
