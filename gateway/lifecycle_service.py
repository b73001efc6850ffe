"""Device lifecycle events and the gateway heartbeat, stored in the buffer like uplink.

Built by :class:`gateway.app.Gateway` when the config has an enabled ``[lifecycle]``
section. The broker tells it (synchronously, in order) when a device connection starts and
ends; each event becomes a row of the internal class ``!lifecycle`` (key = device id), and
every ``heartbeat_period_s`` a heartbeat becomes a row of ``!heartbeat`` (key = gateway id).
The forwarder sends them to Kafka like any other row: committed to SQLite first
(``synchronous=FULL``), deleted after Kafka acknowledged them, kept across outages and
restarts, in order per device. Format: docs/lifecycle.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from edge.buffer import Buffer
from edge.lifecycle import (
    EVENT_CLASS,
    GATEWAY_RESTART,
    HEARTBEAT_CLASS,
    RECORD_SCHEMA,
    ConnectionEnded,
    SessionInfo,
    connected_record,
    disconnected_record,
    encode,
)
from gateway.config import LifecycleConfig

__all__ = ["LifecycleService", "gateway_version"]

log = logging.getLogger(__name__)

_FAILURE_LOG_INTERVAL_S: Final = 5.0


def gateway_version() -> str:
    """The installed tidegate version (``unknown`` when not installed as a package)."""
    try:
        return importlib.metadata.version("tidegate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class LifecycleService:
    """Turns connection events and heartbeats into buffer rows; counts what it did.

    ``kafka_state`` returns the heartbeat's ``kafka`` object (connection and breaker state);
    it is called once per heartbeat.
    """

    def __init__(
        self,
        config: LifecycleConfig,
        *,
        gateway_id: str,
        buffer: Buffer,
        kafka_state: Callable[[], dict[str, Any]],
        started_at: float,
    ) -> None:
        self.config = config
        self._gateway_id = gateway_id
        self._buffer = buffer
        self._kafka_state = kafka_state
        self._started_at = started_at
        self._started_ms = int(started_at * 1000)
        self._version = gateway_version()
        self._connected: set[str] = set()
        self.events: dict[str, int] = {"connected": 0, "disconnected": 0}
        self.reasons: dict[str, int] = {}
        self.wills_published = 0
        self.heartbeats = 0
        self.last_heartbeat_ms: int | None = None
        self.store_failures = 0
        self._failure_logged = 0.0
        buffer.on_unclean_devices = self.gateway_restarted

    # -- events (called synchronously by the broker) ----------------------------------

    def connection_started(self, info: SessionInfo) -> None:
        self._connected.add(info.device_id)
        self.events["connected"] += 1
        self._store(EVENT_CLASS, info.device_id, connected_record(self._gateway_id, info))

    def connection_ended(self, ended: ConnectionEnded) -> None:
        self._connected.discard(ended.device_id)
        self.events["disconnected"] += 1
        self.reasons[ended.reason] = self.reasons.get(ended.reason, 0) + 1
        self.wills_published += ended.will_published
        self._store(EVENT_CLASS, ended.device_id, disconnected_record(self._gateway_id, ended))

    def gateway_restarted(self, device_ids: list[str]) -> None:
        """The last run left these devices connected (it crashed): report them gone."""
        now = time.time_ns() // 1_000_000
        log.warning(
            "%d devices were connected when the last run ended without closing them;"
            " reporting them disconnected (%s)",
            len(device_ids),
            GATEWAY_RESTART,
        )
        for device_id in device_ids:
            self.connection_ended(
                ConnectionEnded(
                    device_id=device_id,
                    session=None,
                    reason=GATEWAY_RESTART,
                    detail="the previous gateway run ended without closing the connection",
                    will_published=False,
                    disconnected_ms=now,
                )
            )

    # -- heartbeat -------------------------------------------------------------------------

    async def run(self) -> None:
        """Heartbeats every ``heartbeat_period_s`` on a fixed schedule (no drift); a beat
        that is late because the loop was busy is sent at once, missed ones are skipped."""
        period = self.config.heartbeat_period_s
        next_at = time.monotonic()
        while True:
            self.beat()
            next_at += period
            now = time.monotonic()
            next_at = max(next_at, now)
            await asyncio.sleep(next_at - now)

    def beat(self) -> None:
        """Store one heartbeat now."""
        self._store(HEARTBEAT_CLASS, self._gateway_id, self.heartbeat_record())
        self.heartbeats += 1

    def heartbeat_record(self) -> dict[str, Any]:
        now = time.time()
        now_ms = int(now * 1000)
        stats = self._buffer.stats
        self.last_heartbeat_ms = now_ms
        return {
            "schema": RECORD_SCHEMA,
            "type": "heartbeat",
            "gateway_id": self._gateway_id,
            "ts_ms": now_ms,
            "seq": self.heartbeats + 1,
            "version": self._version,
            "started_ms": self._started_ms,
            "uptime_s": round(now - self._started_at, 3),
            "period_s": self.config.heartbeat_period_s,
            "devices_connected": len(self._connected),
            "buffer": {
                "rows": stats.rows,
                "payload_bytes": stats.payload_bytes,
                "used_bytes": stats.used_bytes,
                "oldest_age_s": None
                if stats.oldest_ingest_ms is None
                else round(max(0, now_ms - stats.oldest_ingest_ms) / 1000, 3),
                "dead_letters": stats.dead_letters,
                "full": self._buffer.is_full,
                "disk_full": stats.disk_full,
            },
            "kafka": self._kafka_state(),
            "heartbeats_dropped": stats.class_dropped.get(HEARTBEAT_CLASS, 0),
        }

    async def flush(self, deadline: float) -> bool:
        """At shutdown, after the broker closed every connection: give the still running
        forwarder up to ``deadline`` seconds to send the queued events (the
        ``gateway_shutdown`` ones), so the cloud does not think those devices are online
        until this gateway comes back. True when none is left; what is left stays in the
        buffer for the next start, as always."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        with contextlib.suppress(Exception):  # a closed buffer: nothing more to flush
            async with asyncio.timeout(deadline):
                await self._buffer.enqueue_marker()  # the events just enqueued are committed
        await self._buffer.wait_for_class_empty(EVENT_CLASS, max(0.0, end - loop.time()))
        left = self._buffer.stats.class_rows.get(EVENT_CLASS, 0)
        if left:
            log.warning("%d lifecycle events stay buffered for the next start", left)
        return not left

    # -- storing -----------------------------------------------------------------------------

    def _store(self, class_name: str, key: str, record: dict[str, Any]) -> None:
        now_ms = time.time_ns() // 1_000_000
        ttl = self.config.heartbeat_ttl_s if class_name == HEARTBEAT_CLASS else None
        future = self._buffer.enqueue(
            device_id=key,
            class_name=class_name,
            topic="",  # no MQTT publish: the record builder leaves out the MQTT headers
            qos=1,
            payload=encode(record),
            ingest_ms=now_ms,
            priority=self.config.priority,
            expires_ms=None if ttl is None else now_ms + int(ttl * 1000),
            register_device=class_name != HEARTBEAT_CLASS,
        )
        future.add_done_callback(self._stored)

    def _stored(self, future: asyncio.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if not future.cancelled() and error is None:
            return
        self.store_failures += 1
        now = time.monotonic()
        if now - self._failure_logged >= _FAILURE_LOG_INTERVAL_S:
            self._failure_logged = now
            log.error(
                "a lifecycle record could not be stored (%r); %d so far",
                error,
                self.store_failures,
            )

    def status(self) -> dict[str, Any]:
        stats = self._buffer.stats
        return {
            "topic": self.config.topic,
            "heartbeat_topic": self.config.heartbeat_topic or self.config.topic,
            "heartbeat_period_s": self.config.heartbeat_period_s,
            "connected_devices": len(self._connected),
            "events": dict(self.events),
            "disconnect_reasons": dict(self.reasons),
            "wills_published": self.wills_published,
            "heartbeats": self.heartbeats,
            "last_heartbeat_ms": self.last_heartbeat_ms,
            "queued": {
                "events": stats.class_rows.get(EVENT_CLASS, 0),
                "heartbeats": stats.class_rows.get(HEARTBEAT_CLASS, 0),
            },
            "dropped": {
                "events": stats.class_dropped.get(EVENT_CLASS, 0),
                "heartbeats": stats.class_dropped.get(HEARTBEAT_CLASS, 0),
            },
            "store_failures": self.store_failures,
        }
