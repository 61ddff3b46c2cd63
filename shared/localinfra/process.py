"""Start a server detached from the caller, find it again by its PID file, stop it by that PID.

The PID file records the process's start time too, so a recycled PID never makes us signal a stranger.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil

STOP_GRACE_S = 20.0  # Kafka flushes its logs on SIGTERM; give it time before SIGKILL

# Servers outlive the Popen that started them: holding on to it (by PID) keeps Python from warning that
# the subprocess is still running when the object is collected, and lets stop() settle its state.
_started: dict[int, subprocess.Popen] = {}


def start(argv: list[str], *, log_file: Path, pid_file: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> psutil.Process:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log, open(os.devnull, "rb") as devnull:
        # A new session: the server outlives `agentforge infra up` and ignores the terminal's Ctrl-C.
        popen = subprocess.Popen(argv, stdin=devnull, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
    _started[popen.pid] = popen
    process = psutil.Process(popen.pid)
    pid_file.write_text(json.dumps({"pid": process.pid, "create_time": process.create_time(), "argv": argv}))
    return process


def running(pid_file: Path) -> psutil.Process | None:
    """The live process recorded in pid_file, or None (a stale file is removed)."""
    try:
        recorded = json.loads(pid_file.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        recorded = {}
    pid = recorded.get("pid")
    try:
        process = psutil.Process(pid) if isinstance(pid, int) else None
        alive = (process is not None and process.create_time() == recorded.get("create_time")
                 and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        alive = False
    if not alive:
        _forget(pid)
        pid_file.unlink(missing_ok=True)
        return None
    return process


def stop(pid_file: Path) -> bool:
    """Stop the recorded process (SIGTERM, then SIGKILL after STOP_GRACE_S); True if one was running."""
    process = running(pid_file)
    if process is None:
        return False
    process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(STOP_GRACE_S)
    _forget(process.pid)
    pid_file.unlink(missing_ok=True)
    return True


def _forget(pid: int | None) -> None:
    if pid in _started:
        _started.pop(pid).poll()  # reaps a zombie child, or learns that psutil already did


def listening_addresses(process: psutil.Process) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket the process listens on."""
    return sorted((conn.laddr.ip, conn.laddr.port) for conn in process.net_connections(kind="tcp")
                  if conn.status == psutil.CONN_LISTEN)
