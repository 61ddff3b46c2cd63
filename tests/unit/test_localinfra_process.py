"""Servers are found again and stopped through their PID files, never by name."""
import json
import sys

import psutil
import pytest

from shared.localinfra import process

pytestmark = pytest.mark.unit

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_started_process_is_found_and_stopped_by_its_pid_file(tmp_path):
    pid_file, log_file = tmp_path / "sleeper.pid", tmp_path / "sleeper.log"
    started = process.start(SLEEPER, log_file=log_file, pid_file=pid_file)
    try:
        assert process.running(pid_file).pid == started.pid
        assert started.pid != psutil.Process().pid and started.ppid() == psutil.Process().pid
        assert process.stop(pid_file) is True
        assert not pid_file.exists()
        assert not started.is_running() or started.status() == psutil.STATUS_ZOMBIE
        assert process.stop(pid_file) is False  # stopping twice is harmless
    finally:
        if started.is_running():
            started.kill()


def test_a_recycled_pid_is_not_taken_for_the_server(tmp_path):
    # Our own PID with another start time: a file left by a server whose PID now belongs to someone else.
    pid_file = tmp_path / "stale.pid"
    me = psutil.Process()
    pid_file.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time() - 100, "argv": ["x"]}))
    assert process.running(pid_file) is None
    assert not pid_file.exists()
    assert process.stop(pid_file) is False


@pytest.mark.parametrize("content", ["not json", '{"pid": null}', "{}"])
def test_garbled_pid_file_counts_as_not_running(tmp_path, content):
    pid_file = tmp_path / "garbled.pid"
    pid_file.write_text(content)
    assert process.running(pid_file) is None  # and never "this very process", which psutil gives for None
