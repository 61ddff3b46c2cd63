"""BitNet as a service: consume agentforge.bitnet.in, run BitNetPhase, publish the ternary model.

The output checkpoint carries the packed file (bitnet-packed.safetensors) beside the weights. Kafka, the S3
store, traces, health and retries are the shared phase worker's; deployments run the same thing as
`agentforge serve bitnet`.
"""
from __future__ import annotations

from shared.fabric.service import serve_phase


def main() -> None:
    serve_phase("bitnet")


if __name__ == "__main__":
    main()
