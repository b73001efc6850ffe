"""Admin API routes for ``tidegate buffer``: ``GET /buffer/stats``, ``GET /buffer/peek``,
``POST /buffer/purge`` (all need the admin token: they show or change data).

Stats and peek read on a read-only connection of their own in a worker thread, so they never
hold up ingest (edge/buffer_ops.py). Purge goes through the buffer, which records each
purged message in the drop ledger and keeps its counters right.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from edge.buffer import Buffer
from edge.buffer_ops import PurgeFilter, open_read_only, peek_rows, read_stats
from gateway.config import GatewayConfig

__all__ = ["add_buffer_routes", "parse_purge_body"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_MAX_PEEK = 1000


class BufferAdminApi(Protocol):
    config: GatewayConfig
    buffer: Buffer


class BadBufferRequest(ValueError):
    """A request the buffer routes refuse (HTTP 400)."""


def parse_purge_body(body: Any) -> PurgeFilter:
    """``{"class": ..., "device": ..., "older_than_s": ...}`` → a filter; raises
    :class:`BadBufferRequest` with the reason."""
    if not isinstance(body, dict):
        raise BadBufferRequest("body must be a JSON object")
    unknown = set(body) - {"class", "device", "older_than_s"}
    if unknown:
        raise BadBufferRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    class_name, device, older = body.get("class"), body.get("device"), body.get("older_than_s")
    if class_name is not None and not isinstance(class_name, str):
        raise BadBufferRequest("class: a string")
    if device is not None and not isinstance(device, str):
        raise BadBufferRequest("device: a string")
    if older is not None and (
        isinstance(older, bool) or not isinstance(older, int | float) or older < 0
    ):
        raise BadBufferRequest("older_than_s: a number >= 0")
    try:
        return PurgeFilter(class_name, device, None if older is None else float(older))
    except ValueError as exc:
        raise BadBufferRequest(str(exc)) from None


def add_buffer_routes(app: web.Application, api: Any, guard: Callable[[Handler], Handler]) -> None:
    """Register the buffer routes on the admin app (``api`` is the gateway)."""
    gateway: BufferAdminApi = api

    def known_class(name: str | None) -> None:
        if name is not None and name not in gateway.config.classes:
            raise BadBufferRequest(
                f"class: unknown class {name!r} (known: {', '.join(gateway.config.classes)})"
            )

    async def stats(_request: web.Request) -> web.Response:
        path = gateway.config.buffer_path
        encrypted = gateway.config.buffer.encryption is not None

        def read() -> dict[str, Any]:
            with contextlib.closing(open_read_only(path)) as conn:
                return read_stats(conn, encrypted=encrypted)

        data = await asyncio.to_thread(read)
        live = gateway.buffer.stats
        data["live"] = {
            "rows": live.rows,
            "payload_bytes": live.payload_bytes,
            "dropped": live.dropped,
            "full": gateway.buffer.is_full,
            "max_rows": gateway.config.buffer.max_rows,
            "max_bytes": gateway.config.buffer.max_bytes,
        }
        return web.json_response(data)

    async def peek(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "10"))
            after = int(request.query.get("after", "0"))
        except ValueError:
            return _bad("limit and after: integers")
        if not 1 <= limit <= _MAX_PEEK or after < 0:
            return _bad(f"limit: 1..{_MAX_PEEK}; after: >= 0")
        class_name, device = request.query.get("class"), request.query.get("device")
        try:
            known_class(class_name)
        except BadBufferRequest as exc:
            return _bad(str(exc))
        path, keyring = gateway.config.buffer_path, gateway.buffer._keyring

        def read() -> list[dict[str, Any]]:
            with contextlib.closing(open_read_only(path)) as conn:
                return peek_rows(
                    conn,
                    keyring,
                    class_name=class_name,
                    device_id=device,
                    limit=limit,
                    after_id=after,
                )

        return web.json_response({"messages": await asyncio.to_thread(read)})

    async def purge(request: web.Request) -> web.Response:
        try:
            which = parse_purge_body(await request.json())
            known_class(which.class_name)
        except ValueError as exc:  # BadBufferRequest, and bad JSON
            return _bad(str(exc))
        result = await gateway.buffer.purge(which)
        log.warning(
            "admin: purged %d queued messages (%d bytes; %d in flight to Kafka skipped): %s",
            result.purged,
            result.purged_bytes,
            result.skipped_in_flight,
            which,
        )
        return web.json_response(
            {
                "purged": result.purged,
                "purged_bytes": result.purged_bytes,
                "skipped_in_flight": result.skipped_in_flight,
            }
        )

    app.router.add_get("/buffer/stats", guard(stats))
    app.router.add_get("/buffer/peek", guard(peek))
    app.router.add_post("/buffer/purge", guard(purge))


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)
