"""Run a phase service as a child process and wait until its /readyz answers (tests, benchmarks, dev).

The child is `serve_phase(phase_spec, **serve_kwargs)` with the parent's environment plus overrides
(AGENTFORGE_* settings), its health endpoint on a free loopback port.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from shared.localinfra.ports import free_port


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    health_addr: str
    log_path: Path

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"http://{self.health_addr}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"service on {self.health_addr} not ready after {timeout_s}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as when a node dies."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, grace_s: float = 30) -> int:
        """SIGTERM (finish the event in hand, commit, leave the group), then SIGKILL after grace_s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


def spawn_phase_service(
    phase_spec: str,
    *,
    env: dict[str, str],
    log_path: Path,
    cwd: Path | None = None,
    **serve_kwargs,
) -> ServiceProcess:
    health_addr = f"127.0.0.1:{free_port()}"
    child_env = {**os.environ, **env, "AGENTFORGE_HEALTH_ADDR": health_addr}
    arguments = "".join(f", {name}={value!r}" for name, value in serve_kwargs.items())
    code = f"from shared.fabric.service import serve_phase; serve_phase({phase_spec!r}{arguments})"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", code], env=child_env, cwd=cwd, stdout=log,
                                   stderr=subprocess.STDOUT)
    return ServiceProcess(process, health_addr, Path(log_path))
