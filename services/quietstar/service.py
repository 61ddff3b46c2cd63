"""Quiet-STaR as a service: consume agentforge.quietstar.in, run QuietStarPhase, publish the thinking model.

The output checkpoint carries the mixing head (carried/quietstar-mixing-head.safetensors) beside the
weights. Kafka, the S3 store, traces, health and retries are the shared phase worker's; deployments run
the same thing as `agentforge serve quietstar`.
"""
from __future__ import annotations

from shared.fabric.service import serve_phase


def main() -> None:
    serve_phase("quietstar")


if __name__ == "__main__":
    main()
