"""Prometheus metrics (``GET /metrics`` on the admin server; every name in docs/metrics.md).

Nothing here runs per message. The gateway already keeps counters for ``/status`` (buffer
stats, forwarder status, breaker, broker stats, command/firmware/lifecycle status); a custom
collector reads them when Prometheus scrapes. Facts only SQLite knows (connected devices,
dead letters and command/firmware states by state) are read once per scrape, before
rendering. The one observation made outside a scrape is the PUBACK latency histogram: once
per group commit (not per message), the wait of the commit's oldest publish.

A dedicated :class:`CollectorRegistry` keeps the process-wide default registry (and whatever
a library registers there) out of the output.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from gateway.errors import BufferStoreError
from gateway.metrics_collect import StatsCollector, StoredFacts

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["CONTENT_TYPE", "DrainRate", "GatewayMetrics"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PUBACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_FACTS_DEADLINE_S = 2.0
"""Most a scrape waits for the buffer's connection (shared with the committer)."""

_RATE_WINDOW_S = 60.0
"""Ingest and forward rates for the drain estimate are averaged over this long."""


class DrainRate:
    """Net drain rate from (time, in, out) samples taken at scrapes: pure, clock injected.

    ``estimate(rows)`` is rows / (forward rate - ingest rate) over the last
    :data:`_RATE_WINDOW_S`; 0 when empty, +Inf when the backlog is not shrinking, NaN before
    two samples exist."""

    def __init__(self, window_s: float = _RATE_WINDOW_S) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, int, int]] = deque()

    def add(self, now: float, messages_in: int, messages_out: int) -> None:
        self._samples.append((now, messages_in, messages_out))
        # Keep one sample older than the window so the rate always spans a full window.
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window_s:
            self._samples.popleft()

    def estimate(self, rows: int) -> float:
        if rows <= 0:
            return 0.0
        if len(self._samples) < 2:
            return math.nan
        (t0, in0, out0), (t1, in1, out1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return math.nan
        net = ((out1 - out0) - (in1 - in0)) / (t1 - t0)
        return rows / net if net > 0 else math.inf


class GatewayMetrics:
    """The gateway's registry. ``await render()`` serves one scrape."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # No ``*_created`` series: they double the output and nothing here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self.puback_latency = Histogram(
            "tidegate_puback_latency_seconds",
            "Per group commit: seconds the commit's oldest publish waited from reaching the"
            " buffer until durable (its PUBACK follows at once).",
            buckets=_PUBACK_BUCKETS,
            registry=self.registry,
        )
        self.drain = DrainRate()
        self.facts = StoredFacts()
        self.registry.register(StatsCollector(self))
        gateway.buffer.on_commit = self._observe_commit

    def _observe_commit(self, _publishes: int, oldest_wait_s: float) -> None:
        self.puback_latency.observe(oldest_wait_s)

    async def render(self) -> bytes:
        """Refresh what SQLite knows, then the text exposition."""
        try:
            # Bounded: a scrape must not hang behind a slow commit; the last facts stand.
            async with asyncio.timeout(_FACTS_DEADLINE_S):
                await self._refresh_facts()
        except (sqlite3.Error, BufferStoreError, TimeoutError) as exc:
            log.warning("metrics: could not read stored facts: %r", exc)
        return generate_latest(self.registry)

    async def _refresh_facts(self) -> None:
        gw = self.gateway
        facts = StoredFacts()
        async with gw.buffer.read() as db:
            rows = list(await db.execute_fetchall("SELECT count(*) FROM devices WHERE connected"))
            facts.connected_devices = int(rows[0][0]) if rows else 0
            facts.dead_letters = await _by(db, "SELECT reason, count(*) FROM dead_letters")
            if gw.commands is not None:
                facts.commands = await _by(db, "SELECT state, count(*) FROM commands")
            if gw.firmware is not None:
                facts.campaigns = await _by(db, "SELECT state, count(*) FROM fw_campaigns")
                facts.targets = await _by(db, "SELECT state, count(*) FROM fw_targets")
        self.facts = facts


async def _by(db: object, query: str) -> dict[str, int]:
    rows = await db.execute_fetchall(query + " GROUP BY 1")  # type: ignore[attr-defined]
    return {str(key): int(count) for key, count in rows}
