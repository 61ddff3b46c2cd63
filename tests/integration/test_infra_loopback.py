"""Every server the project starts listens on loopback only, on the ports it exports."""
import ipaddress
import socket
from urllib.parse import urlsplit

import psutil
import pytest

from shared.localinfra.stack import LocalStack

pytestmark = pytest.mark.integration


# The variables through which each server is reached.
EXPORTED = {"kafka": ["AGENTFORGE_KAFKA_BOOTSTRAP"], "s3": ["AGENTFORGE_S3_ENDPOINT"],
            "jaeger": ["AGENTFORGE_OTLP_ENDPOINT", "AGENTFORGE_JAEGER_QUERY_URL"]}


def _port(address: str) -> int:
    return urlsplit(address if "://" in address else f"//{address}").port


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _listening(pid: int) -> set[tuple[str, int]]:
    """Listening TCP sockets and bound, unconnected UDP sockets of the process and its children."""
    root = psutil.Process(pid)
    return {(conn.laddr.ip, conn.laddr.port) for proc in [root, *root.children(recursive=True)]
            for conn in proc.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr)}


def test_servers_listen_on_loopback_only(infra):
    if not infra.pids:
        pytest.skip("no local server processes (containers, or nothing could be started)")
    # Read now, not from the session's start: the fault tests restart servers (new pids, same ports).
    running = {name: process.pid for name, process in LocalStack().running().items()}
    assert running.keys() == infra.pids.keys()
    for name, pid in running.items():
        listening = _listening(pid)
        assert listening, f"{name} (pid {pid}) listens on nothing"
        assert all(_is_loopback(ip) for ip, _ in listening), f"{name} listens beyond loopback: {listening}"
        exported = {_port(infra.env[variable]) for variable in EXPORTED[name]}
        assert exported <= {port for _, port in listening}, f"{name} does not serve its exported ports {exported}"
