"""The local admin API: read-only status for ``tidegate status`` (and later the dashboard).

It binds to loopback by default. It reads the gateway's in-memory state; it never opens
the buffer file, so there is exactly one writer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

__all__ = ["AdminServer"]

StatusProvider = Callable[[], dict[str, Any]]
DevicesProvider = Callable[[], Awaitable[list[dict[str, Any]]]]


class AdminServer:
    """aiohttp app serving ``/healthz``, ``/status`` and ``/devices`` (JSON)."""

    def __init__(
        self, host: str, port: int, status: StatusProvider, devices: DevicesProvider
    ) -> None:
        self._host = host
        self._port = port
        self._status = status
        self._devices = devices
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    async def __aenter__(self) -> AdminServer:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._status_handler)
        app.router.add_get("/devices", self._devices_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        server = site._server  # aiohttp keeps the asyncio server private; port 0 needs it
        assert server is not None
        sockname = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        self.bound = (str(sockname[0]), int(sockname[1]))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _status_handler(self, _request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def _devices_handler(self, _request: web.Request) -> web.Response:
        return web.json_response({"devices": await self._devices()})
