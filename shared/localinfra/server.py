"""What every local server provides to the stack: install, the command that runs it, a health check and
the AGENTFORGE_* variables that point the services at it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from shared.localinfra.layout import InfraLayout


class NotHealthy(Exception):
    """The server does not answer as it should (yet); the message says what failed."""


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


class LocalServer(ABC):
    name: ClassVar[str]
    port_names: ClassVar[tuple[str, ...]]  # one free loopback port is picked for each
    start_timeout_s: ClassVar[float] = 60.0

    def __init__(self, layout: InfraLayout):
        self.layout = layout

    @property
    def data_dir(self) -> Path:
        return self.layout.data_dir(self.name)

    @property
    def log_file(self) -> Path:
        return self.layout.log_file(self.name)

    @property
    def pid_file(self) -> Path:
        return self.layout.pid_file(self.name)

    @abstractmethod
    def installed(self) -> bool: ...

    @abstractmethod
    def install(self) -> None:
        """Obtain what the server needs to run; returns at once when it is cached."""

    def prepare(self, ports: dict[str, int]) -> None:
        """Get storage and configuration ready before each start."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @abstractmethod
    def launch(self, ports: dict[str, int]) -> Launch: ...

    @abstractmethod
    def check_health(self, ports: dict[str, int]) -> None:
        """Raise NotHealthy unless the server serves real requests."""

    def after_healthy(self, ports: dict[str, int]) -> None:
        """One-off set-up that needs the server running (for example the default bucket)."""

    @abstractmethod
    def settings_env(self, ports: dict[str, int]) -> dict[str, str]: ...
