"""Real local servers for development and tests: Apache Kafka, an S3 server (Versity's gateway) and Jaeger.

`agentforge infra install|up|down|status|env` drives them (cli.py). Everything they need and write lives
under one cache folder (layout.py); each server listens on 127.0.0.1 only, on ports picked free, and is
stopped by the PID recorded when it started (process.py).
"""
