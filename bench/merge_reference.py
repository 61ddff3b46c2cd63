"""mergekit as a reference: installed in its own venv (its pins clash with ours), driven by subprocess.

`ensure_mergekit()` creates ~/.cache/agentforge/mergekit-venv with uv on first use; `run_mergekit(jobs)`
runs a list of merges there on safetensors checkpoints and returns each merge's wall time in seconds;
`run_mergekit_multi` runs a multi-stage file with its mergekit-multi command.
Used by tests/integration/test_mergekit_parity.py and bench/merge.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from shared.localinfra.uv import UvUnavailable, uv_binary, uv_env
from shared.settings import default_cache_dir

MERGEKIT_VERSION = "0.1.5"
VENV = default_cache_dir() / "mergekit-venv"

# Runs inside the mergekit venv: one import of mergekit for all merges, timing each merge alone.
DRIVER = """
import json, sys, time
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

for job in json.load(open(sys.argv[1])):
    config = MergeConfiguration.model_validate(job["config"])
    options = MergeOptions(random_seed=job["seed"], copy_tokenizer=False, write_model_card=False, quiet=True)
    start = time.perf_counter()
    run_merge(config, job["out"], options=options)
    print(json.dumps({"out": job["out"], "seconds": time.perf_counter() - start}), flush=True)
"""


class MergekitUnavailable(RuntimeError):
    pass


def ensure_mergekit() -> Path:
    """The mergekit venv's python, installing it if missing; MergekitUnavailable says why it cannot be."""
    python = VENV / "bin" / "python"
    if python.exists() and _has_mergekit(python):
        return python
    try:
        uv = uv_binary()
    except UvUnavailable as error:
        raise MergekitUnavailable(f"{error}: cannot create the mergekit venv") from None
    env = uv_env()
    steps = [
        [uv, "venv", "-q", "--allow-existing", "-p", f"{sys.version_info.major}.{sys.version_info.minor}", str(VENV)],
        [uv, "pip", "install", "-q", "-p", str(python), f"mergekit=={MERGEKIT_VERSION}"],
    ]
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise MergekitUnavailable(f"{' '.join(step[:3])} failed: {done.stderr.strip()[-500:]}")
    if not _has_mergekit(python):
        raise MergekitUnavailable(f"mergekit {MERGEKIT_VERSION} installed but does not import")
    return python


def _has_mergekit(python: Path) -> bool:
    return subprocess.run([str(python), "-c", "import mergekit.merge"], capture_output=True).returncode == 0


# Offline: the checkpoints are local folders, nothing may be fetched from the Hub.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_mergekit(jobs: list[dict]) -> dict[str, float]:
    """jobs: [{"config": mergekit config dict, "out": folder, "seed": int}] -> {out folder: seconds}."""
    python = ensure_mergekit()
    with tempfile.TemporaryDirectory() as scratch:
        driver, job_file = Path(scratch) / "driver.py", Path(scratch) / "jobs.json"
        driver.write_text(DRIVER)
        job_file.write_text(json.dumps([{**job, "out": str(job["out"])} for job in jobs]))
        done = subprocess.run([str(python), str(driver), str(job_file)], env={**os.environ, **OFFLINE},
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{done.stderr[-3000:]}")
    timings = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {t["out"]: t["seconds"] for t in timings}


def run_mergekit_multi(documents: list[dict], out: Path, seed: int) -> None:
    """mergekit-multi on the documents of one file (named stages, then the unnamed final merge) into out."""
    command = ensure_mergekit().parent / "mergekit-multi"
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "multi.yml"
        config.write_text(yaml.safe_dump_all(documents))
        done = subprocess.run([str(command), str(config), "--out-path", str(out), "-I", str(Path(scratch) / "stages"),
                               "--random-seed", str(seed), "--no-lazy", "--quiet"],
                              env={**os.environ, **OFFLINE}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mergekit-multi failed:\n{done.stderr[-3000:]}")
