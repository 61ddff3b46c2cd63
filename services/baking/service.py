"""Tool and persona baking as a service: consume agentforge.baking.in, run BakingPhase, publish the baked ternary model.

The output checkpoint is BitNet's layout (latent weights with the BitNet quantization config, the packed
file, what the input carried). Kafka, the S3 store, traces, health and retries are the shared phase worker's; deployments run
the same thing as `agentforge serve baking`.
"""
from __future__ import annotations

from shared.fabric.service import serve_phase


def main() -> None:
    serve_phase("baking")


if __name__ == "__main__":
    main()
