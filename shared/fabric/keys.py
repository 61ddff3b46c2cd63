"""Deterministic object keys: the same inputs, phase code and config always name the same output.

A redelivered or replayed event therefore finds its output already stored and skips the work. The
completion marker is written after every output is uploaded, so its presence means the outputs are whole.
"""
from __future__ import annotations

import hashlib
import json
import re


def output_key(input_sha256s: list[str], phase: str, code_version: str, config_hash: str) -> str:
    identity = json.dumps(
        {"inputs": list(input_sha256s), "phase": phase, "code_version": code_version, "config_hash": config_hash},
        sort_keys=True,
        separators=(",", ":"),
    )
    return f"outputs/{phase}/{hashlib.sha256(identity.encode()).hexdigest()}"


def model_key(output: str, index: int, model_name: str) -> str:
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)
    return f"{output}/{index:02d}-{safe_name}.tar"


def completion_key(output: str) -> str:
    return f"{output}/completed.pb"
