"""Cognate as a service: consume agentforge.cognate.in, run CognatePhase, publish the base and specialists.

Kafka, the S3 store, traces, health and retries are the shared phase worker's; deployments run the same
thing as `agentforge serve cognate`.
"""
from __future__ import annotations

from shared.fabric.service import serve_phase


def main() -> None:
    serve_phase("cognate")


if __name__ == "__main__":
    main()
