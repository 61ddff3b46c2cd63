"""The three local servers together: install, up, down, status and env, all idempotent.

State (ports and who started each server) lives in the cache folder's state.json; a file lock makes
concurrent commands (two test sessions, say) take turns instead of starting a server twice.
"""
from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from shared.localinfra import process
from shared.localinfra.jaeger import JaegerServer
from shared.localinfra.kafka import KafkaServer
from shared.localinfra.layout import InfraLayout
from shared.localinfra.ports import free_port, is_free
from shared.localinfra.s3 import S3Server
from shared.localinfra.server import LocalServer, NotHealthy
from shared.settings import Settings

LOG_TAIL_LINES = 30
MANUAL = "cli"  # the owner of servers started with `agentforge infra up`


class ServerExited(RuntimeError):
    """The server's process ended while it was starting; the message holds the end of its log."""


@dataclass
class ServerStatus:
    name: str
    installed: bool
    pid: int | None = None
    owner: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    healthy: bool = False
    detail: str = ""
    listening: list[tuple[str, int]] = field(default_factory=list)


class LocalStack:
    def __init__(self, settings: Settings | None = None):
        settings = settings or Settings()
        self.layout = InfraLayout.from_settings(settings)
        self.servers: dict[str, LocalServer] = {server.name: server for server in (
            KafkaServer(self.layout), S3Server(self.layout, bucket=settings.s3_bucket), JaegerServer(self.layout))}
        self._lock_depth = 0

    def select(self, names: list[str] | None = None) -> list[LocalServer]:
        unknown = set(names or ()) - self.servers.keys()
        if unknown:
            raise ValueError(f"unknown server(s) {sorted(unknown)}; known: {sorted(self.servers)}")
        return [server for name, server in self.servers.items() if not names or name in names]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache folder's lock; re-entrant, so a caller can wrap several commands in one turn."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.layout.root.mkdir(parents=True, exist_ok=True)
        with open(self.layout.root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_state(self) -> dict[str, dict]:
        try:
            return json.loads(self.layout.state_file.read_text())
        except FileNotFoundError:
            return {}

    def _write_state(self, state: dict[str, dict]) -> None:
        self.layout.state_file.write_text(json.dumps(state, indent=2))

    def install(self, names: list[str] | None = None) -> dict[str, float | str]:
        """Obtain every selected server: per server, the seconds it took (near zero when cached) or why it failed.

        One server failing does not stop the others: tests that need only those can still run.
        """
        results: dict[str, float | str] = {}
        with self.locked():
            for server in self.select(names):
                started = time.perf_counter()
                try:
                    server.install()
                except Exception as error:  # a missing tool, a network error, a failed build: report, go on
                    results[server.name] = f"installing {server.name} failed: {error}"
                    continue
                results[server.name] = time.perf_counter() - started
        return results

    def up(self, names: list[str] | None = None, owner: str = MANUAL) -> dict[str, str | None]:
        """Start what is not running and healthy; returns, per server, None when it is up or why it is not.

        owner is recorded with each server this call starts, so a test session can later stop only those.
        A manual `up` also claims servers a test session started, so they outlive that session.
        """
        results: dict[str, str | None] = {}
        with self.locked():
            state = self._read_state()
            launched = []
            for server in self.select(names):
                previous = state.get(server.name, {})
                running = process.running(server.pid_file)
                if running is not None and _health_error(server, previous.get("ports", {})) is None:
                    if owner == MANUAL:
                        previous["owner"] = MANUAL
                    results[server.name] = None
                    continue
                if running is not None:  # up but not answering: replace it
                    process.stop(server.pid_file)
                if not server.installed():
                    results[server.name] = f"{server.name} is not installed: run `agentforge infra install`"
                    continue
                ports = _reuse_or_pick_ports(server, previous.get("ports", {}))
                try:
                    server.prepare(ports)
                    launch = server.launch(ports)
                    process.start(launch.argv, log_file=server.log_file, pid_file=server.pid_file, env=launch.env)
                except Exception as error:
                    results[server.name] = f"{server.name} did not start: {error}; log: {server.log_file}"
                    continue
                state[server.name] = {"ports": ports, "owner": owner}
                launched.append(server)
            self._write_state(state)
            for server in launched:
                results[server.name] = self._wait_until_healthy(server, state[server.name]["ports"])
        return results

    def _wait_until_healthy(self, server: LocalServer, ports: dict[str, int]) -> str | None:
        def attempt() -> None:
            if process.running(server.pid_file) is None:
                raise ServerExited(f"{server.name} exited while starting; last lines of {server.log_file}:\n"
                                   + _tail(server))
            server.check_health(ports)

        try:
            for tried in Retrying(stop=stop_after_delay(server.start_timeout_s), wait=wait_fixed(0.25),
                                  retry=retry_if_exception_type(NotHealthy), reraise=True):
                with tried:
                    attempt()
            server.after_healthy(ports)
        except ServerExited as error:
            return str(error)
        except Exception as error:
            process.stop(server.pid_file)
            return f"{server.name} did not become healthy ({error}); log: {server.log_file}"
        return None

    def down(self, names: list[str] | None = None, owner: str | None = None) -> list[str]:
        """Stop the selected servers (only those `owner` started, when given); returns the ones stopped."""
        stopped = []
        with self.locked():
            state = self._read_state()
            for server in self.select(names):
                if owner is not None and state.get(server.name, {}).get("owner") != owner:
                    continue
                if process.stop(server.pid_file):
                    stopped.append(server.name)
                state.get(server.name, {}).pop("owner", None)  # keep the ports for the next `up`
            self._write_state(state)
        return stopped

    def status(self) -> list[ServerStatus]:
        state = self._read_state()
        statuses = []
        for server in self.select():
            recorded = state.get(server.name, {})
            status = ServerStatus(server.name, installed=server.installed(), ports=recorded.get("ports", {}))
            running = process.running(server.pid_file)
            if running is None:
                status.detail = "stopped"
            else:
                status.pid, status.owner = running.pid, recorded.get("owner")
                status.listening = process.listening_addresses(running)
                error = _health_error(server, status.ports)
                status.healthy, status.detail = error is None, error or "healthy"
            statuses.append(status)
        return statuses

    def running(self) -> dict[str, psutil.Process]:
        """The live process of each running server."""
        found = {server.name: process.running(server.pid_file) for server in self.select()}
        return {name: proc for name, proc in found.items() if proc is not None}

    def env(self) -> dict[str, str]:
        """AGENTFORGE_* (and OTEL_*) variables for every running server."""
        state = self._read_state()
        variables = {}
        for name in self.running():
            if name in state:
                variables.update(self.servers[name].settings_env(state[name]["ports"]))
        return variables


def _health_error(server: LocalServer, ports: dict[str, int]) -> str | None:
    if set(ports) != set(server.port_names):
        return "no ports recorded"
    try:
        server.check_health(ports)
    except NotHealthy as error:
        return str(error)
    return None


def _reuse_or_pick_ports(server: LocalServer, previous: dict[str, int]) -> dict[str, int]:
    # Stable ports across restarts keep exported variables valid; new ones only when the old are taken.
    if set(previous) == set(server.port_names) and all(is_free(port) for port in previous.values()):
        return dict(previous)
    ports: dict[str, int] = {}
    while len(ports) < len(server.port_names):
        port = free_port()
        if port not in ports.values():
            ports[server.port_names[len(ports)]] = port
    return ports


def _tail(server: LocalServer) -> str:
    try:
        return "\n".join(server.log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    except FileNotFoundError:
        return "(no log)"
