"""The health endpoint: liveness always, readiness only once the phase consumes; loopback by default."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from shared.fabric.health import split_addr, start_health_server
from shared.localinfra.ports import free_port
from shared.settings import Settings

pytestmark = pytest.mark.unit


def test_default_health_address_is_loopback():
    assert split_addr(Settings().health_addr)[0] == "127.0.0.1"


@pytest.mark.parametrize("bad", ["8080", "localhost", "host:port"])
def test_malformed_address_is_refused(bad):
    with pytest.raises(ValueError):
        split_addr(bad)


def test_readiness_follows_the_consumer_and_liveness_does_not():
    async def scenario():
        ready = asyncio.Event()
        addr = f"127.0.0.1:{free_port()}"
        runner = await start_health_server(addr, ready)
        try:
            async with httpx.AsyncClient(base_url=f"http://{addr}") as client:
                before = [(await client.get(path)).status_code for path in ("/healthz", "/readyz")]
                ready.set()
                after = [(await client.get(path)).status_code for path in ("/healthz", "/readyz")]
        finally:
            await runner.cleanup()
        return before, after

    assert asyncio.run(scenario()) == ([200, 503], [200, 200])
