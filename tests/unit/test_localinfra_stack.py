"""The stack's bookkeeping, on a stand-in server (Python's http.server): idempotent up, ports kept across
restarts, stopped by PID, owners respected, a server that dies reported with its log."""
import sys

import httpx
import pytest

from shared.localinfra import process
from shared.localinfra.server import Launch, LocalServer, NotHealthy
from shared.localinfra.stack import LocalStack
from shared.settings import Settings

pytestmark = pytest.mark.unit


class WebServer(LocalServer):
    name = "web"
    port_names = ("http",)
    start_timeout_s = 10.0

    def installed(self) -> bool:
        return True

    def install(self) -> None:
        pass

    def launch(self, ports):
        return Launch([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(ports["http"]),
                       "--directory", str(self.data_dir)])

    def check_health(self, ports):
        try:
            httpx.get(f"http://127.0.0.1:{ports['http']}/", timeout=1).raise_for_status()
        except httpx.HTTPError as error:
            raise NotHealthy(str(error)) from error

    def settings_env(self, ports):
        return {"AGENTFORGE_WEB": f"127.0.0.1:{ports['http']}"}


class CrashingServer(WebServer):
    name = "crash"

    def launch(self, ports):
        return Launch([sys.executable, "-c", "import sys; print('cannot bind: port taken'); sys.exit(3)"])


@pytest.fixture
def stack(tmp_path):
    stack = LocalStack(Settings(cache_dir=tmp_path))
    stack.servers = {"web": WebServer(stack.layout)}
    yield stack
    stack.down()


def test_up_is_idempotent_and_down_stops_by_pid(stack):
    assert stack.up() == {"web": None}
    pid = stack.running()["web"].pid
    assert stack.up() == {"web": None}
    assert stack.running()["web"].pid == pid  # not started twice
    address = stack.env()["AGENTFORGE_WEB"]

    assert stack.down() == ["web"]
    assert stack.running() == {} and stack.env() == {}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{address}/", timeout=1)

    stack.up()
    assert stack.env()["AGENTFORGE_WEB"] == address  # the freed port is taken again


def test_a_test_session_stops_only_what_it_started(stack):
    stack.up(owner="pytest")
    assert stack.down(owner="someone-else") == []
    stack.up()  # a manual `up` claims the running server
    assert stack.down(owner="pytest") == []
    assert stack.down() == ["web"]


def test_a_server_that_exits_is_reported_with_its_log(stack):
    stack.servers["crash"] = CrashingServer(stack.layout)
    results = stack.up()
    assert results["web"] is None
    assert "exited while starting" in results["crash"] and "cannot bind: port taken" in results["crash"]
    assert not process.running(stack.servers["crash"].pid_file)
