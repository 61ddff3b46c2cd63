"""Session fixtures for the real Kafka, S3 server and Jaeger (filled in by the infra work)."""
