"""Final compression as a service: consume agentforge.compression.in, run CompressionPhase, publish the result.

The output checkpoint is BitNet's layout (latent ternary weights, the decoded float matrices, the packed
file) with the compressed file (compressed_file.COMPRESSED_FILE) beside it. Kafka, the S3 store, traces,
health and retries are the shared phase worker's; deployments run the same thing as
`agentforge serve compression`.
"""
from __future__ import annotations

from shared.fabric.service import serve_phase


def main() -> None:
    serve_phase("compression")


if __name__ == "__main__":
    main()
