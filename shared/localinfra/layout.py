"""Where the local servers keep binaries, data, logs and PIDs: all under one cache folder.

Settings.cache_dir (AGENTFORGE_CACHE_DIR, default ~/.cache/agentforge) holds an `infra/` folder:

    infra/bin/<tool>-<version>      built Go binaries and resolved jar folders, keyed by version
    infra/<server>/data/            the server's storage
    infra/<server>/<server>.log     its stdout and stderr
    infra/<server>/<server>.pid     its PID while it runs
    infra/state.json                ports chosen at the last `up` (reused while free)
    infra/s3-credentials.json       keys generated once per install (never committed)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings

# Static assets (pom, Go tool modules with pinned go.sum, config files) live in the repository.
ASSETS_DIR = Path(__file__).resolve().parents[2] / "infra" / "local"


def asset(*parts: str) -> Path:
    path = ASSETS_DIR.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: `agentforge infra` needs the repository's infra/local/ folder")
    return path


@dataclass(frozen=True)
class InfraLayout:
    root: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> InfraLayout:
        return cls(settings.cache_dir.expanduser() / "infra")

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def s3_credentials_file(self) -> Path:
        return self.root / "s3-credentials.json"

    def server_dir(self, name: str) -> Path:
        return self.root / name

    def data_dir(self, name: str) -> Path:
        return self.server_dir(name) / "data"

    def log_file(self, name: str) -> Path:
        return self.server_dir(name) / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.server_dir(name) / f"{name}.pid"
