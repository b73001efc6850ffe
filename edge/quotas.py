"""Per-device quotas of the edge broker: token buckets, payload size, subscriptions, and a
connection rate limit per source address.

Pure decisions with an explicit clock (``now`` in seconds, :func:`time.monotonic` in the
broker), so they are unit-tested without sockets; :mod:`edge.amqtt_handler` and
:mod:`edge.broker` call them and do the I/O (sleep, close, SUBACK failure).

Rates are token buckets that may go into debt: a publish always takes its tokens, and the
answer is how long the device must wait until the balance is back to zero. Under the
``throttle`` policy the handler sleeps that long before it submits the publish and reads the
next packet, so the device's socket is not read meanwhile (TCP back-pressure; nothing is
dropped, nothing is acknowledged early) and its rate settles at the quota. Under
``disconnect`` a positive wait closes the connection without acknowledging the publish; the
debt stays with the device id, so reconnecting at once does not buy a fresh burst.

Per publish the cost is two bucket updates (a handful of float operations) and no allocation.
State per device id and per source address is kept in dicts that are pruned of idle entries
(full buckets, nothing to remember) when they grow past a bound.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from edge.audit import AuditLog

__all__ = [
    "OVERSIZE",
    "ConnectionRateLimiter",
    "DeviceQuota",
    "QuotaCounters",
    "QuotaLimits",
    "QuotaSettings",
    "Quotas",
    "TokenBucket",
    "quota_status",
]

log = logging.getLogger("edge.quotas")

OVERSIZE: Final = -1.0
"""What :meth:`DeviceQuota.check` returns for a payload over ``max_payload_bytes``."""

_PRUNE_AT: Final = 65_536
"""Entries per state dict before idle ones are pruned."""

RatePolicy = Literal["throttle", "disconnect"]
OversizePolicy = Literal["disconnect", "puback_discard"]


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; :meth:`take` may leave it in debt."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("token bucket: rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now

    def take(self, cost: float, now: float) -> float:
        """Take ``cost`` tokens; seconds until the balance is back to zero (0.0: within quota)."""
        self._refill(now)
        self.tokens -= cost
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def full(self, now: float) -> bool:
        """Refilled to ``burst``: forgetting this bucket changes nothing."""
        self._refill(now)
        return self.tokens >= self.burst


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """One device's limits; None means unlimited."""

    messages_per_s: float | None = None
    messages_burst: float = 1.0
    bytes_per_s: float | None = None
    bytes_burst: float = 1.0
    max_payload_bytes: int | None = None
    max_subscriptions: int | None = None


@dataclass(frozen=True)
class QuotaSettings:
    """All quota settings of one broker (built from the ``[quotas]`` config section)."""

    policy: RatePolicy = "throttle"
    """Over a rate quota: ``throttle`` (stop reading until the tokens refill) or ``disconnect``."""
    on_oversize: OversizePolicy = "disconnect"
    """Payload over ``max_payload_bytes``: ``disconnect`` (MQTT 3.1.1 cannot refuse a PUBLISH)
    or ``puback_discard`` (acknowledge, store nothing, count and audit it as a drop)."""
    default: QuotaLimits = QuotaLimits()
    devices: Mapping[str, QuotaLimits] = field(default_factory=dict)
    """Per device id overrides (replace ``default`` for that device)."""
    connections_per_s: float | None = None
    """New connections per second per source address; None: unlimited."""
    connections_burst: float = 1.0


class DeviceQuota:
    """Rate and size state of one device id (shared by its connections over time)."""

    __slots__ = ("bytes", "limits", "messages")

    def __init__(self, limits: QuotaLimits, now: float) -> None:
        self.limits = limits
        self.messages = (
            None
            if limits.messages_per_s is None
            else TokenBucket(limits.messages_per_s, limits.messages_burst, now)
        )
        self.bytes = (
            None
            if limits.bytes_per_s is None
            else TokenBucket(limits.bytes_per_s, limits.bytes_burst, now)
        )

    def check(self, payload_size: int, now: float) -> float:
        """0.0: go on; > 0: seconds over the rate quota; :data:`OVERSIZE`: payload too large
        (no tokens taken for it)."""
        limit = self.limits.max_payload_bytes
        if limit is not None and payload_size > limit:
            return OVERSIZE
        wait = 0.0
        if self.messages is not None:
            wait = self.messages.take(1.0, now)
        if self.bytes is not None:
            wait = max(wait, self.bytes.take(payload_size, now))
        return wait

    def idle(self, now: float) -> bool:
        return all(b is None or b.full(now) for b in (self.messages, self.bytes))


class ConnectionRateLimiter:
    """A token bucket per source address (one token per new TCP connection)."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, address: str, now: float) -> bool:
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[address] = TokenBucket(self._rate, self._burst, now)
        bucket._refill(now)
        if bucket.tokens < 1.0:
            return False  # a refused attempt takes nothing: retrying does not dig deeper
        bucket.tokens -= 1.0
        return True

    def _prune(self, now: float) -> None:
        self._buckets = {a: b for a, b in self._buckets.items() if not b.full(now)}
        if len(self._buckets) >= _PRUNE_AT:
            # That many addresses all busy at once: forget them rather than grow without
            # bound (fail open for the connection limit; the other quotas still apply).
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class QuotaCounters:
    """Quota events since the broker started (``tidegate status``)."""

    throttled: int = 0
    """Publishes that waited for tokens (``throttle`` policy)."""
    throttled_s: float = 0.0
    """Total seconds devices were held back."""
    rate_disconnects: int = 0
    """Connections closed for going over a rate quota (``disconnect`` policy)."""
    oversize_discarded: int = 0
    """Oversized publishes acknowledged and discarded (``puback_discard``)."""
    oversize_disconnects: int = 0
    subscriptions_refused: int = 0
    """SUBSCRIBE filters over ``max_subscriptions`` (answered with SUBACK 0x80)."""
    connections_refused: int = 0
    """New connections over the per-address rate, closed before CONNECT was read."""


class Quotas:
    """The quota state of one broker: decisions (pure) plus counting, logging and audit."""

    def __init__(self, settings: QuotaSettings, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.audit = audit
        self.counters = QuotaCounters()
        self._devices: dict[str, DeviceQuota] = {}
        self._subscriptions: dict[str, set[str]] = {}
        self._connections = (
            None
            if settings.connections_per_s is None
            else ConnectionRateLimiter(settings.connections_per_s, settings.connections_burst)
        )
        self._last_log: dict[str, float] = {}

    # -- decisions ------------------------------------------------------------------------

    def limits(self, device_id: str) -> QuotaLimits:
        return self.settings.devices.get(device_id, self.settings.default)

    def device(self, device_id: str, now: float) -> DeviceQuota | None:
        """The device's rate/size state; None when it has no per-publish limit at all."""
        quota = self._devices.get(device_id)
        if quota is not None:
            return quota
        limits = self.limits(device_id)
        unlimited = (limits.messages_per_s, limits.bytes_per_s, limits.max_payload_bytes)
        if unlimited == (None, None, None):
            return None
        if len(self._devices) >= _PRUNE_AT:
            self._devices = {d: q for d, q in self._devices.items() if not q.idle(now)}
        quota = self._devices[device_id] = DeviceQuota(limits, now)
        return quota

    def may_connect(self, address: str, now: float) -> bool:
        return self._connections is None or self._connections.allow(address, now)

    def may_subscribe(self, device_id: str, topic_filter: str) -> bool:
        """False when a new filter would exceed the device's ``max_subscriptions``."""
        limit = self.limits(device_id).max_subscriptions
        if limit is None:
            return True
        current = self._subscriptions.get(device_id, ())
        return topic_filter in current or len(current) < limit

    def subscribed(self, device_id: str, topic_filter: str) -> None:
        self._subscriptions.setdefault(device_id, set()).add(topic_filter)

    def unsubscribed(self, device_id: str, topic_filter: str) -> None:
        filters = self._subscriptions.get(device_id)
        if filters is not None:
            filters.discard(topic_filter)
            if not filters:
                del self._subscriptions[device_id]

    def subscription_count(self, device_id: str) -> int:
        return len(self._subscriptions.get(device_id, ()))

    # -- events: count, log (at most once per second per kind), audit ------------------------

    def throttled(self, device_id: str, peer: str, wait: float) -> None:
        self.counters.throttled += 1
        self.counters.throttled_s += wait
        if self._log_due("throttle"):
            log.warning("device %s (%s): over its rate quota; throttled", device_id, peer)
            self._audit("quota_throttled", device=device_id, peer=peer, wait_s=round(wait, 4))

    def rate_exceeded(self, device_id: str, peer: str) -> None:
        self.counters.rate_disconnects += 1
        log.warning("device %s (%s): over its rate quota; disconnecting", device_id, peer)
        self._audit("quota_disconnect", device=device_id, peer=peer, reason="rate")

    def oversize(self, device_id: str, peer: str, topic: str, size: int) -> None:
        action = self.settings.on_oversize
        if action == "disconnect":
            self.counters.oversize_disconnects += 1
        else:
            self.counters.oversize_discarded += 1
        limit = self.limits(device_id).max_payload_bytes
        if self._log_due("oversize"):
            log.warning(
                "device %s (%s): %d-byte payload on %r over the %s-byte limit (%s)",
                *(device_id, peer, size, topic, limit, action),
            )
        self._audit(
            "quota_oversize", device=device_id, peer=peer, topic=topic, size=size, action=action
        )

    def subscription_refused(self, device_id: str, peer: str, topic_filter: str) -> None:
        self.counters.subscriptions_refused += 1
        if self._log_due("subscriptions"):
            log.warning("device %s (%s): too many subscriptions", device_id, peer)
        self._audit(
            "quota_subscription_refused", device=device_id, peer=peer, topic_filter=topic_filter
        )

    def connection_refused(self, address: str) -> None:
        self.counters.connections_refused += 1
        if self._log_due("connections"):
            log.warning("%s: over the connection rate limit; closing", address)
            self._audit("quota_connection_refused", peer=address)

    def _log_due(self, kind: str) -> bool:
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) < 1.0:
            return False
        self._last_log[kind] = now
        return True

    def _audit(self, event: str, **fields: object) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)


def quota_status(quotas: Quotas | None) -> dict[str, object]:
    """The ``quotas`` part of ``tidegate status``."""
    if quotas is None:
        return {"enabled": False}
    counters = dataclasses.asdict(quotas.counters)
    counters["throttled_s"] = round(quotas.counters.throttled_s, 3)
    return {"enabled": True, "policy": quotas.settings.policy, **counters}
