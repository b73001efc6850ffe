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

import logging
import math
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from bridge.breaker import BreakerState
from edge.tenant_share import TENANT_SHARE_DROP

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["BREAKER_STATES", "CONTENT_TYPE", "DROP_REASONS", "DrainRate", "GatewayMetrics"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BREAKER_STATES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
"""``tidegate_kafka_breaker_state`` values."""

_PUBACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

DROP_REASONS = (
    "buffer full: qos0",
    "buffer full: drop_newest",
    "buffer full: drop_oldest",
    "expired",
    "expired (dead letter)",
    TENANT_SHARE_DROP,
)
"""Reasons exported at 0 from the start, so ``increase()`` sees a series' first drop."""

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


@dataclass
class _StoredFacts:
    """What only SQLite knows, read once per scrape."""

    connected_devices: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)
    campaigns: dict[str, int] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)


class GatewayMetrics:
    """The gateway's registry. ``await render()`` serves one scrape."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
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
        self.facts = _StoredFacts()
        self.registry.register(_StatsCollector(self))
        gateway.buffer.on_commit = self._observe_commit

    def _observe_commit(self, _publishes: int, oldest_wait_s: float) -> None:
        self.puback_latency.observe(oldest_wait_s)

    async def render(self) -> bytes:
        """Refresh what SQLite knows, then the text exposition."""
        try:
            await self._refresh_facts()
        except (sqlite3.Error, ValueError) as exc:  # the buffer is closing or failing
            log.warning("metrics: could not read stored facts: %s", exc)
        return generate_latest(self.registry)

    async def _refresh_facts(self) -> None:
        gw = self._gateway
        facts = _StoredFacts()
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


def _labelled(
    name: str, doc: str, label: str, values: Mapping[str, int | float], *, counter: bool
) -> Metric:
    family: CounterMetricFamily | GaugeMetricFamily = (
        CounterMetricFamily(name, doc, labels=[label])
        if counter
        else GaugeMetricFamily(name, doc, labels=[label])
    )
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class _StatsCollector(Collector):
    """Reads the gateway's live counters at scrape time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names are dynamic per class/reason; no duplicate check needed

    def collect(self) -> Iterator[Metric]:
        yield from self._traffic()
        yield from self._buffer()
        yield from self._kafka()
        yield from self._edge()

    def _traffic(self) -> Iterator[Metric]:
        gw = self._metrics._gateway
        stats = gw.buffer.stats
        # Every configured class and known reason from 0: a series that appears at its
        # first event would hide that event from rate() and increase().
        classes = dict.fromkeys(gw.config.classes, 0)
        yield _gauge("tidegate_start_time_seconds", "Unix time the gateway started.", gw.started_at)
        info = GaugeMetricFamily(
            "tidegate_info", "Gateway identity (value 1).", labels=["gateway_id", "delivery"]
        )
        info.add_metric([gw.config.gateway.id, gw.config.kafka.delivery], 1)
        yield info
        yield _labelled(
            "tidegate_messages_in_total",
            "Messages stored in the buffer (acknowledgeable), by class.",
            "class",
            {**classes, **stats.class_committed},
            counter=True,
        )
        yield _labelled(
            "tidegate_messages_forwarded_total",
            "Messages Kafka acknowledged (and released from the buffer), by class.",
            "class",
            {**classes, **stats.class_released},
            counter=True,
        )
        yield _labelled(
            "tidegate_messages_dropped_total",
            "Messages dropped by policy (buffer full, expiry, tenant share), by reason.",
            "reason",
            {**dict.fromkeys(DROP_REASONS, 0), **stats.dropped},
            counter=True,
        )
        yield _labelled(
            "tidegate_messages_dropped_by_class_total",
            "Messages dropped by policy, by class.",
            "class",
            {**classes, **stats.class_dropped},
            counter=True,
        )
        yield _counter(
            "tidegate_duplicates_suppressed_total",
            "Retransmissions recognised and not stored twice.",
            stats.duplicates_suppressed,
        )
        yield _counter(
            "tidegate_messages_unrouted_total",
            "Publishes on topics no class routes.",
            gw.intake.unrouted,
        )

    def _buffer(self) -> Iterator[Metric]:
        gw = self._metrics._gateway
        stats, cfg = gw.buffer.stats, gw.config.buffer
        now = time.time()
        yield _gauge("tidegate_buffer_rows", "Messages waiting in the buffer.", stats.rows)
        yield _labelled(
            "tidegate_buffer_class_rows",
            "Messages waiting in the buffer, by class.",
            "class",
            stats.class_rows,
            counter=False,
        )
        yield _gauge("tidegate_buffer_payload_bytes", "Payload bytes waiting.", stats.payload_bytes)
        yield _gauge(
            "tidegate_buffer_used_bytes",
            "Bytes of the buffer file in use (rows, dead letters, ledgers).",
            stats.used_bytes,
        )
        yield _gauge("tidegate_buffer_max_bytes", "buffer.max_bytes.", cfg.max_bytes)
        yield _gauge("tidegate_buffer_max_rows", "buffer.max_rows.", cfg.max_rows)
        oldest = stats.oldest_ingest_ms
        yield _gauge(
            "tidegate_buffer_oldest_age_seconds",
            "Age of the oldest waiting message (0 when empty).",
            0.0 if oldest is None or not stats.rows else max(0.0, now - oldest / 1000),
        )
        rate = self._metrics.drain
        rate.add(
            time.monotonic(),
            sum(stats.class_committed.values()),
            sum(stats.class_released.values()),
        )
        yield _gauge(
            "tidegate_buffer_drain_estimate_seconds",
            "Estimated seconds until the buffer is empty at the last minute's net drain rate"
            " (+Inf: not shrinking, NaN: not measured yet).",
            rate.estimate(stats.rows),
        )
        yield _gauge(
            "tidegate_buffer_full",
            "1 while publishes wait for room (acknowledgements withheld).",
            int(gw.buffer.is_full),
        )
        yield _gauge(
            "tidegate_buffer_writable",
            "1 when the buffer accepts commits (the /readyz buffer check).",
            int(gw.buffer.writable),
        )
        yield _counter("tidegate_buffer_commits_total", "Successful group commits.", stats.commits)
        yield _counter(
            "tidegate_buffer_commit_failures_total",
            "Group commits that failed (disk full, I/O error).",
            stats.commit_failures,
        )
        yield _counter(
            "tidegate_buffer_block_disconnects_total",
            "Devices disconnected after waiting buffer.block_timeout_s for room.",
            stats.block_disconnects,
        )
        yield _labelled(
            "tidegate_dead_letters",
            "Dead letters held in the buffer, by reason.",
            "reason",
            self._metrics.facts.dead_letters,
            counter=False,
        )
        try:
            free = shutil.disk_usage(gw.config.buffer_path.parent).free
        except OSError:
            free = -1
        yield _gauge(
            "tidegate_disk_free_bytes",
            "Free bytes on the buffer's file system (-1: unknown).",
            free,
        )
        yield _gauge(
            "tidegate_disk_min_free_bytes",
            "buffer.min_free_disk_bytes: below it acknowledgements stop.",
            cfg.min_free_disk_bytes,
        )

    def _kafka(self) -> Iterator[Metric]:
        gw = self._metrics._gateway
        fwd, breaker = gw.forwarder.status, gw.forwarder.breaker
        yield _gauge(
            "tidegate_kafka_connected",
            "1 when the last Kafka call succeeded (the /readyz kafka check).",
            int(fwd.kafka_connected and breaker.state is BreakerState.CLOSED),
        )
        yield _gauge(
            "tidegate_kafka_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            BREAKER_STATES[breaker.state],
        )
        yield _counter(
            "tidegate_kafka_breaker_trips_total", "Times the breaker opened.", breaker.total_trips
        )
        yield _gauge(
            "tidegate_kafka_consecutive_failures",
            "Failed Kafka calls since the last success.",
            breaker.consecutive_failures,
        )
        send = SummaryMetricFamily(
            "tidegate_kafka_send_duration_seconds",
            "Seconds from handing a batch to the producer until every record's ack.",
            count_value=fwd.batches,
            sum_value=fwd.send_s,
        )
        yield send
        yield _counter(
            "tidegate_kafka_send_failures_total",
            "Batches that failed in part or whole (retried).",
            fwd.failed_batches,
        )
        yield _counter(
            "tidegate_kafka_producer_rebuilds_total",
            "Kafka producers discarded and built anew.",
            fwd.producer_rebuilds,
        )
        yield _counter(
            "tidegate_kafka_dead_lettered_total",
            "Messages moved to the dead letters (Kafka refused them for good).",
            fwd.dead_lettered,
        )
        yield _counter(
            "tidegate_kafka_dead_letters_forwarded_total",
            "Dead letters sent to the dead-letter topic.",
            fwd.dead_letters_forwarded,
        )

    def _edge(self) -> Iterator[Metric]:
        gw = self._metrics._gateway
        facts, broker = self._metrics.facts, gw.broker.stats
        yield _gauge(
            "tidegate_devices_connected", "Devices with an MQTT session.", facts.connected_devices
        )
        yield _counter(
            "tidegate_mqtt_auth_failures_total", "CONNECTs refused.", broker.auth_failures
        )
        yield _counter(
            "tidegate_mqtt_tls_handshake_failures_total",
            "TLS handshakes that failed.",
            broker.tls_handshake_failures,
        )
        yield _counter(
            "tidegate_mqtt_publishes_denied_total",
            "PUBLISHes the ACL refused.",
            broker.publishes_denied,
        )
        yield _counter(
            "tidegate_mqtt_malformed_packets_total",
            "Malformed MQTT packets.",
            broker.malformed_packets,
        )
        if gw.commands is not None:
            yield _labelled(
                "tidegate_commands",
                "Downlink commands held, by state.",
                "state",
                facts.commands,
                counter=False,
            )
        if gw.firmware is not None:
            yield _labelled(
                "tidegate_firmware_campaigns",
                "Firmware rollout campaigns, by state.",
                "state",
                facts.campaigns,
                counter=False,
            )
            yield _labelled(
                "tidegate_firmware_targets",
                "Devices targeted by firmware campaigns, by state.",
                "state",
                facts.targets,
                counter=False,
            )
