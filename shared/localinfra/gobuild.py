"""Build a Go server from a pinned tool module under infra/local/<name>/, once per version.

Each module there was made with `go get -tool <package>@<version>`; its go.sum pins every dependency, so
a fresh machine fetches exactly those through the Go module proxy. A cold build takes minutes on two
cores, so the binary is kept under the cache folder as <name>-<version> and reused.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shared.localinfra.layout import asset


@dataclass(frozen=True)
class GoTool:
    name: str  # folder under infra/local/ and binary name
    module: str  # the Go module that provides the command, as required in go.mod
    package: str  # the command's import path

    @property
    def module_dir(self) -> Path:
        return asset(self.name)

    def version(self) -> str:
        go_mod = (self.module_dir / "go.mod").read_text()
        match = re.search(rf"^\s*(?:require\s+)?{re.escape(self.module)} (v\S+)", go_mod, re.MULTILINE)
        if match is None:
            raise ValueError(f"{self.module_dir}/go.mod does not require {self.module}")
        return match.group(1)

    def binary(self, bin_dir: Path) -> Path:
        return bin_dir / f"{self.name}-{self.version()}"

    def build(self, bin_dir: Path) -> Path:
        target = self.binary(bin_dir)
        if target.exists():
            return target
        go = shutil.which("go")
        if go is None:
            raise RuntimeError(f"building {self.name} needs the Go toolchain (`go` on PATH, 1.24 or newer)")
        bin_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        # -mod=readonly: go.sum must already pin everything, a build never edits the committed module.
        env = {**os.environ, "GOFLAGS": "-mod=readonly -buildvcs=false"}
        subprocess.run([go, "build", "-trimpath", "-o", str(partial), self.package],
                       cwd=self.module_dir, env=env, check=True)
        partial.rename(target)
        return target
