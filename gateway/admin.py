"""The local admin API: status for ``tidegate status``, and the operations that change the
buffer (dead-letter replay and purge) for ``tidegate dlq``.

It binds to loopback by default; bound elsewhere (``admin.token_file`` set, see
gateway/config.py) every endpoint except the probes ``/healthz`` and ``/readyz`` needs the
token. It never opens the buffer file itself: every operation goes
through the running gateway's single writer. Operations on data (dead letters, the drop
ledger) need the token the gateway writes to ``<data_dir>/admin.token`` (mode 0600) at start,
sent as ``Authorization: Bearer <token>``: whoever may read the data directory may operate the
gateway, nobody else on the host.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from gateway.config import is_loopback_host
from gateway.dashboard import add_dashboard_routes
from gateway.metrics import CONTENT_TYPE

__all__ = ["TOKEN_FILE", "AdminApi", "AdminServer", "read_token", "write_token"]

TOKEN_FILE = "admin.token"

_MAX_LIST = 10_000


class AdminApi(Protocol):
    """What the admin server asks the gateway. Implementations never block the loop long."""

    def status(self) -> dict[str, Any]: ...
    def readiness(self) -> dict[str, Any]: ...
    async def metrics(self) -> bytes: ...
    async def devices(self) -> list[dict[str, Any]]: ...
    async def dead_letters(self, limit: int, after_id: int) -> list[dict[str, Any]]: ...
    async def replay_dead_letters(self, ids: Sequence[int] | None) -> int: ...
    async def purge_dead_letters(self, ids: Sequence[int] | None) -> int: ...
    async def drops(self, after_id: int, limit: int) -> list[dict[str, Any]]: ...


def write_token(data_dir: Path, token: str | None = None) -> str:
    """``token`` (default: a fresh random one) in ``data_dir/admin.token`` (0600), returned."""
    token = token or secrets.token_urlsafe(24)
    path = data_dir / TOKEN_FILE
    tmp = data_dir / (TOKEN_FILE + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    tmp.write_text(token)
    tmp.replace(path)
    return token


def read_token(data_dir: Path) -> str | None:
    """The running gateway's admin token, or None if unreadable."""
    try:
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def encode_payload(payload: bytes) -> str:
    """Payloads are opaque bytes: JSON carries them as base64."""
    return base64.b64encode(payload).decode("ascii")


class AdminServer:
    """aiohttp app serving the admin endpoints (JSON)."""

    def __init__(self, host: str, port: int, api: AdminApi, token: str | None = None) -> None:
        self._host = host
        # Beyond loopback, whoever reaches the port is not necessarily on this host.
        self._remote = not is_loopback_host(host)
        self._port = port
        self._api = api
        self.token = token or secrets.token_urlsafe(24)
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    async def __aenter__(self) -> AdminServer:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._remote_guard(self._status_handler))
        app.router.add_get("/devices", self._remote_guard(self._devices_handler))
        app.router.add_get("/metrics", self._remote_guard(self._metrics))
        app.router.add_get("/dead-letters", self._guard(self._dead_letters))
        app.router.add_post("/dead-letters/replay", self._guard(self._replay))
        app.router.add_post("/dead-letters/purge", self._guard(self._purge))
        app.router.add_get("/drops", self._guard(self._drops))
        add_dashboard_routes(app)  # /dashboard/: static page polling the endpoints above
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

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except _BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)

    def _guard(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return web.json_response(
                    {"error": f"missing or wrong admin token (see {TOKEN_FILE})"}, status=401
                )
            return await handler(request)

        return guarded

    def _remote_guard(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Read-only endpoints: open on loopback, token-guarded when bound elsewhere."""
        return self._guard(handler) if self._remote else handler

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, _request: web.Request) -> web.Response:
        """200 when the broker listens and the buffer takes commits, even with Kafka down
        (an outage must not get a healthy gateway restarted); 503 otherwise."""
        ready = self._api.readiness()
        return web.json_response(ready, status=200 if ready["ready"] else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=await self._api.metrics(), headers={"Content-Type": CONTENT_TYPE})

    async def _status_handler(self, _request: web.Request) -> web.Response:
        return web.json_response(self._api.status())

    async def _devices_handler(self, request: web.Request) -> web.Response:
        devices = await self._api.devices()
        if "limit" not in request.query:
            return web.json_response({"devices": devices})
        # ?limit=N (the dashboard): the N most recently seen, and the totals.
        limit = _int_param(request, "limit", 50, 1, _MAX_LIST)
        devices.sort(key=lambda d: d.get("last_seen_ms") or 0, reverse=True)
        return web.json_response(
            {
                "devices": devices[:limit],
                "total": len(devices),
                "connected": sum(1 for d in devices if d.get("connected")),
            }
        )

    async def _dead_letters(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", 100, 1, _MAX_LIST)
        after = _int_param(request, "after", 0, 0, None)
        items = await self._api.dead_letters(limit, after)
        return web.json_response({"dead_letters": items})

    async def _replay(self, request: web.Request) -> web.Response:
        ids = await _ids_body(request)
        return web.json_response({"replayed": await self._api.replay_dead_letters(ids)})

    async def _purge(self, request: web.Request) -> web.Response:
        ids = await _ids_body(request)
        return web.json_response({"purged": await self._api.purge_dead_letters(ids)})

    async def _drops(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", 1000, 1, _MAX_LIST)
        after = _int_param(request, "after", 0, 0, None)
        return web.json_response({"drops": await self._api.drops(after, limit)})


class _BadRequest(Exception):
    pass


def _int_param(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"{name}: not an integer: {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise _BadRequest(f"{name}: out of range [{low}, {high if high is not None else '∞'}]")
    return value


async def _ids_body(request: web.Request) -> list[int] | None:
    """``{"all": true}`` → None (every dead letter); ``{"ids": [1, 2]}`` → those."""
    try:
        body = await request.json()
    except ValueError:
        raise _BadRequest('body must be JSON: {"ids": [...]} or {"all": true}') from None
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    if body.get("all") is True:
        if body.get("ids"):
            raise _BadRequest("give either ids or all, not both")
        return None
    ids = body.get("ids")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    ):
        raise _BadRequest("ids: a non-empty list of integers (or all: true)")
    return ids
