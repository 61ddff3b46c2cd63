"""Jaeger v2: receives OTLP traces (gRPC and HTTP), keeps them in memory, serves the query UI and /api/v3.

Built from infra/local/jaeger/ (a pinned `go get -tool` module: tag v1.76.0 of the module, the same code
as Jaeger v2.13.0, carries a replace directive that a plain `go install` refuses). The configuration,
infra/local/jaeger/config.yaml, reads its ports from the environment and binds every endpoint to loopback.
"""
from __future__ import annotations

from pathlib import Path

import httpx

from shared.localinfra.gobuild import GoTool
from shared.localinfra.layout import asset
from shared.localinfra.ports import LOOPBACK
from shared.localinfra.server import Launch, LocalServer, NotHealthy

JAEGER = GoTool(name="jaeger", module="github.com/jaegertracing/jaeger",
                package="github.com/jaegertracing/jaeger/cmd/jaeger")


class JaegerServer(LocalServer):
    name = "jaeger"
    port_names = ("otlp_grpc", "otlp_http", "query_http", "query_grpc", "health")

    @property
    def binary(self) -> Path:
        return JAEGER.binary(self.layout.bin_dir)

    def installed(self) -> bool:
        return self.binary.exists()

    def install(self) -> None:
        JAEGER.build(self.layout.bin_dir)

    def launch(self, ports: dict[str, int]) -> Launch:
        return Launch([str(self.binary), f"--config=file:{asset('jaeger', 'config.yaml')}"],
                      env={f"JAEGER_{name.upper()}_PORT": str(port) for name, port in ports.items()})

    def check_health(self, ports: dict[str, int]) -> None:
        try:
            status = httpx.get(f"http://{LOOPBACK}:{ports['health']}/status", timeout=2).json()
            services = httpx.get(f"{self.query_url(ports)}/api/v3/services", timeout=2)
        except (httpx.HTTPError, ValueError) as error:
            raise NotHealthy(f"Jaeger does not answer: {error!r}") from error
        if not status.get("healthy"):
            raise NotHealthy(f"Jaeger reports itself unhealthy: {status}")
        if services.status_code != 200:
            raise NotHealthy(f"Jaeger's /api/v3/services answered {services.status_code}: {services.text[:200]}")

    @staticmethod
    def query_url(ports: dict[str, int]) -> str:
        return f"http://{LOOPBACK}:{ports['query_http']}"

    def settings_env(self, ports: dict[str, int]) -> dict[str, str]:
        otlp_http = f"http://{LOOPBACK}:{ports['otlp_http']}"
        return {"AGENTFORGE_OTLP_ENDPOINT": otlp_http,
                "AGENTFORGE_JAEGER_QUERY_URL": self.query_url(ports),
                # For any OpenTelemetry SDK in the process: the same collector, over OTLP/HTTP.
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_http,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
