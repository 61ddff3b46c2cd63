"""ADAS as a service: consume agentforge.adas.in, run AdasPhase, publish the adapted ternary model.

The output checkpoint is BitNet's layout (latent weights with the BitNet quantization config, the packed
file, what the input carried) with the experts file (phase.EXPERTS_FILE) beside it. Kafka, the S3 store,
traces, health and retries are the shared phase worker's; deployments run the same thing as
`agentforge serve adas`.
"""
from __future__ import annotations

from shared.fabric.service import serve_phase


def main() -> None:
    serve_phase("adas")


if __name__ == "__main__":
    main()
