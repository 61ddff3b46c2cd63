"""Ports are picked free on loopback and kept across restarts while nobody else holds them."""
import socket

import pytest

from shared.localinfra.jaeger import JaegerServer
from shared.localinfra.layout import InfraLayout
from shared.localinfra.ports import free_port, is_free
from shared.localinfra.stack import _reuse_or_pick_ports

pytestmark = pytest.mark.unit


def test_a_listening_port_is_not_free():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not is_free(listener.getsockname()[1])
    assert is_free(free_port())


def test_previous_ports_are_reused_when_free_and_replaced_when_taken(tmp_path):
    server = JaegerServer(InfraLayout(root=tmp_path))
    picked = _reuse_or_pick_ports(server, {})
    assert set(picked) == set(server.port_names) and len(set(picked.values())) == len(picked)
    assert _reuse_or_pick_ports(server, picked) == picked
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", picked["otlp_http"]))
        listener.listen()
        replaced = _reuse_or_pick_ports(server, picked)
    assert replaced["otlp_http"] != picked["otlp_http"]
