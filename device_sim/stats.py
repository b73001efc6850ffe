"""Counters and a PUBACK-latency histogram that shards can merge.

The histogram has log-spaced buckets (2 % wide) from 1 µs up, so memory stays bounded
whatever the run length and shard histograms add up exactly; percentiles are accurate to
the bucket width, the maximum is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FleetCounters", "LatencyHistogram"]

_GROWTH = 1.02
_LOG_GROWTH = math.log(_GROWTH)


@dataclass
class LatencyHistogram:
    """Latencies in microseconds, bucketed logarithmically."""

    buckets: dict[int, int] = field(default_factory=dict)
    count: int = 0
    max_us: float = 0.0

    def record(self, latency_us: float) -> None:
        """Add one sample."""
        index = int(math.log(latency_us) / _LOG_GROWTH) if latency_us > 1 else 0
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        self.max_us = max(self.max_us, latency_us)

    def merge(self, other: LatencyHistogram) -> None:
        """Add another histogram's samples to this one."""
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) in microseconds; 0 with no samples."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * q / 100))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                # Upper edge of the bucket, never above the true maximum.
                return min(_GROWTH ** (index + 1), self.max_us)
        return self.max_us

    def summary_ms(self) -> dict[str, float]:
        """p50/p90/p99/max in milliseconds (for reports)."""
        return {
            "p50": round(self.percentile(50) / 1000, 3),
            "p90": round(self.percentile(90) / 1000, 3),
            "p99": round(self.percentile(99) / 1000, 3),
            "max": round(self.max_us / 1000, 3),
        }


@dataclass
class FleetCounters:
    """What a fleet (or one shard of it) did. Plain ints, so shards can send and sum them."""

    devices: int = 0
    connected: int = 0
    """Devices connected right now."""
    ever_connected: int = 0
    """Devices that completed at least one CONNECT/CONNACK."""
    connect_failures: int = 0
    """Connection attempts that failed (refused, timed out, CONNACK error)."""
    gave_up: int = 0
    """Devices that never connected within their retry budget."""
    disconnects: int = 0
    """Unexpected connection losses after a successful connect."""
    sent: int = 0
    acked: int = 0
    unacked_at_end: int = 0
    """QoS1 messages still without PUBACK when the drain deadline passed."""
    errors: int = 0
    """Other failures (publish refused by the client library, callback errors)."""
    connect_time_s: float = 0.0
    """Time from start until the last device's first CONNACK."""
    first_send_wall: float = 0.0
    """Unix time of the first publish (0: none yet)."""
    last_ack_wall: float = 0.0
    """Unix time of the last PUBACK (QoS0: last write)."""
    commands_executed: int = 0
    """Commands applied successfully (``--commands``)."""
    commands_failed: int = 0
    """Commands applied and reported failed (``--command-failure-rate``)."""
    commands_repeated: int = 0
    """Commands received again after they were executed: reported again, not applied."""
    offline_windows: int = 0
    """Offline windows a device went through (profile ``[[offline]]``)."""
    storm_drops: int = 0
    """Connections dropped on purpose by a reconnect storm (profile ``[[reconnect_storms]]``)."""
    sent_garbage: int = 0
    """Misbehaving messages sent (QoS0, not in the ledger): random bytes."""
    sent_oversized: int = 0
    """... payloads above the gateway's packet size limit."""
    sent_wrong_topic: int = 0
    """... envelopes on a topic the device may not use."""

    def merge(self, other: FleetCounters) -> None:
        """Add another shard's counters."""
        for name in (
            "devices",
            "connected",
            "ever_connected",
            "connect_failures",
            "gave_up",
            "disconnects",
            "sent",
            "acked",
            "unacked_at_end",
            "errors",
            "commands_executed",
            "commands_failed",
            "commands_repeated",
            "offline_windows",
            "storm_drops",
            "sent_garbage",
            "sent_oversized",
            "sent_wrong_topic",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.connect_time_s = max(self.connect_time_s, other.connect_time_s)
        starts = [t for t in (self.first_send_wall, other.first_send_wall) if t]
        self.first_send_wall = min(starts, default=0.0)
        self.last_ack_wall = max(self.last_ack_wall, other.last_ack_wall)

    @property
    def send_window_s(self) -> float:
        """Seconds from the first publish to the last acknowledgement."""
        if not self.first_send_wall or self.last_ack_wall <= self.first_send_wall:
            return 0.0
        return self.last_ack_wall - self.first_send_wall

    def copy(self) -> FleetCounters:
        """A snapshot (progress reports must not alias the live counters)."""
        return FleetCounters(**self.__dict__)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON, pickling across processes)."""
        return dict(self.__dict__)
