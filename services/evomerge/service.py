"""EvoMerge as a service: consume agentforge.evomerge.in, run EvoMergePhase, publish the champion.

Everything else (Kafka, the S3 store, traces, health, retries) is the shared phase worker's; deployments
run the same thing as `agentforge serve evomerge`.
"""
from __future__ import annotations

from shared.fabric.service import serve_phase


def main() -> None:
    serve_phase("evomerge")


if __name__ == "__main__":
    main()
