"""Writing a benchmark's results file: its figures, the machine it ran on and its wall time."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import typer


def write_results(out: Path, results: dict[str, Any], started: float) -> None:
    """Write results (plus the machine and the seconds since `started`, a perf_counter reading) to out as JSON."""
    results = {**results, "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
               "seconds": round(time.perf_counter() - started, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    typer.echo(f"wrote {out}")
