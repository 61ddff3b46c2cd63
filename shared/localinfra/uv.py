"""The `uv` installer that side installs (SmolLM2's weights package, mergekit's venv) run with.

uv is a dependency of the project, so the venv always has it; a `uv` on PATH is used only when the
project runs outside its venv. Its cache sits in ours so repeated installs cost nothing.
"""

from __future__ import annotations

import os
import shutil

from shared.settings import Settings


class UvUnavailable(RuntimeError):
    pass


def uv_binary() -> str:
    try:
        from uv import find_uv_bin
        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise UvUnavailable("uv is neither installed in this Python environment nor on PATH") from None
        return found


def uv_env() -> dict[str, str]:
    return {**os.environ, "UV_CACHE_DIR": str(Settings().cache_dir / "uv")}
