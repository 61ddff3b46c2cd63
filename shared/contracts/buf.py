"""buf, for the breaking-change check of proto/ against the last released schema.

buf comes from the Go module proxy (`go install github.com/bufbuild/buf/cmd/buf@VERSION`), built once
and cached under Settings().cache_dir/tools/buf-VERSION, so a warm check needs no network or compiler.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from shared.settings import Settings

BUF_VERSION = "v1.75.0"
BUF_MODULE = "github.com/bufbuild/buf/cmd/buf"
PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
BASELINE_IMAGE = PROTO_ROOT / "baseline" / "agentforge-v1.binpb"


class BufUnavailable(RuntimeError):
    pass


def ensure_buf(settings: Settings | None = None, build_timeout_s: float = 1800) -> Path:
    """Path of the cached buf binary, building it with `go install` first if needed."""
    tool_dir = (settings or Settings()).cache_dir / "tools" / f"buf-{BUF_VERSION}"
    binary = tool_dir / "buf"
    if binary.is_file():
        return binary
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None)
    if go is None:
        raise BufUnavailable("no Go toolchain to build buf with")
    tool_dir.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [go, "install", f"{BUF_MODULE}@{BUF_VERSION}"],
            env={**os.environ, "GOBIN": str(tool_dir)},
            check=True,
            capture_output=True,
            text=True,
            timeout=build_timeout_s,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise BufUnavailable(f"building buf {BUF_VERSION} failed: {getattr(error, 'stderr', '') or error}") from error
    return binary


def breaking_changes(buf: Path, proto_root: Path = PROTO_ROOT, against: Path = BASELINE_IMAGE) -> str:
    """buf's list of breaking changes of proto_root against the baseline image; empty when none."""
    result = subprocess.run(
        [str(buf), "breaking", str(proto_root), "--against", str(against)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode not in (0, 100):  # 100: breaking changes found
        raise RuntimeError(f"buf breaking failed ({result.returncode}): {result.stderr or result.stdout}")
    return result.stdout.strip()
