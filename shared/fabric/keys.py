"""Deterministic object keys: the same inputs, phase code and config always name the same output.

A redelivered or replayed event therefore finds its output already stored and skips the work. Inputs
are named by their checkpoint digests (the weights and files, not the tar, whose manifest embeds timings),
so an upstream step redone after a crash still names the same downstream output. Model archives carry
their own SHA-256 in the name: two writers of one output never overwrite each other's bytes. The
completion marker is written after every output is uploaded, so its presence means the outputs are whole.
The hand-off marker records that a run's step published its events, so a redelivery publishes nothing twice.
"""
from __future__ import annotations

import hashlib
import json
import re


def output_key(input_digests: list[str], phase: str, code_version: str, config_hash: str) -> str:
    identity = json.dumps(
        {"inputs": list(input_digests), "phase": phase, "code_version": code_version, "config_hash": config_hash},
        sort_keys=True,
        separators=(",", ":"),
    )
    return f"outputs/{phase}/{hashlib.sha256(identity.encode()).hexdigest()}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def model_key(output: str, index: int, model_name: str, sha256: str) -> str:
    return f"{output}/{index:02d}-{_safe(model_name)}-{sha256[:16]}.tar"


def completion_key(output: str) -> str:
    return f"{output}/completed.pb"


def handoff_key(run_id: str, step: int) -> str:
    return f"runs/{_safe(run_id)}/{step:03d}.handed-on.pb"
