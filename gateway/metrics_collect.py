"""The collector behind ``/metrics`` (gateway/metrics.py): reads the gateway's live counters
at scrape time and turns them into metric families. Every name is listed in docs/metrics.md.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    from gateway.metrics import GatewayMetrics

__all__ = ["BREAKER_STATES", "DROP_REASONS", "StatsCollector", "StoredFacts"]

BREAKER_STATES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
"""``tidegate_kafka_breaker_state`` values."""

DROP_REASONS = (
    "buffer full: qos0",
    "buffer full: drop_newest",
    "buffer full: drop_oldest",
    "expired",
    "expired (dead letter)",
    TENANT_SHARE_DROP,
)
"""Reasons exported at 0 from the start, so ``increase()`` sees a series' first drop."""


@dataclass
class StoredFacts:
    """What only SQLite knows, read once per scrape."""

    connected_devices: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)
    campaigns: dict[str, int] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)


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


class StatsCollector(Collector):
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
        gw = self._metrics.gateway
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
        gw = self._metrics.gateway
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
        gw = self._metrics.gateway
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
        gw = self._metrics.gateway
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
