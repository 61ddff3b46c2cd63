"""GET /healthz (the process is up) and /readyz (it is consuming) for a phase service's probes.

Liveness never depends on Kafka or S3 being up: a dead dependency should not restart every pod.
Binds Settings.health_addr, 127.0.0.1 by default; container manifests set 0.0.0.0 explicitly.
"""
from __future__ import annotations

import asyncio

from aiohttp import web


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {addr!r} is not host:port")
    return host.strip("[]"), int(port)


async def start_health_server(addr: str, ready: asyncio.Event) -> web.AppRunner:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if ready.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_addr(addr)
    await web.TCPSite(runner, host, port).start()
    return runner
