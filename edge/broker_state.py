"""Shared state of the edge broker: counters, per-broker context, per-session QoS 2 state,
and the subscription index that decides whether a publish goes to amqtt's broadcast.

Pure bookkeeping, no I/O; :mod:`edge.amqtt_handler` and :mod:`edge.broker` do the talking.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from edge.acl import AclPolicy
from edge.audit import AuditLog
from edge.ingest import IngestSink, SessionObserver
from edge.keepalive import KeepAliveWheel
from edge.lifecycle import ConnectionEnded, LifecycleListener, SessionInfo
from edge.mqtt_wire import DecodedPublish
from edge.quotas import Quotas

if TYPE_CHECKING:
    from edge.amqtt_handler import EdgeProtocolHandler

__all__ = [
    "BrokerStats",
    "EdgeContext",
    "Forward",
    "Qos2State",
    "Security",
    "SubscriptionIndex",
]

log = logging.getLogger("edge.broker")

TOPIC_CACHE_LIMIT: Final = 65_536
"""Most topics :class:`SubscriptionIndex` remembers a wildcard-scan result for."""

Forward = Callable[[Any, DecodedPublish], Awaitable[None]]
"""Hands a stored publish to subscribers on the edge (amqtt's broadcast) when any match."""


class _RateLimitedLog:
    """At most one line per key per second; the next line says how many were suppressed."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < 1.0:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        log.warning(msg, *args)


@dataclass
class BrokerStats:
    """Counters of the edge broker. Each event method logs (rate-limited) and counts together."""

    sessions_started: int = 0
    takeovers: int = 0
    publishes_submitted: int = 0
    acks_sent: int = 0
    acks_sent_at_once: int = 0
    """Of ``acks_sent``, those written from the sink future's callback, without waking the
    connection's task (edge/amqtt_acks.py)."""
    qos2_duplicates: int = 0
    reader_paused: int = 0
    """Times a session's reader stopped at the in-flight cap."""
    broadcast_forwarded: int = 0
    """Publishes handed to amqtt's broadcast because a subscription matched."""
    broadcast_skipped: int = 0
    """Publishes kept off amqtt's broadcast queue: no subscription matched."""
    sink_failures: int = 0
    qos0_store_failures: int = 0
    malformed_packets: int = 0
    keepalive_timeouts: int = 0
    auth_failures: int = 0
    tls_handshake_failures: int = 0
    """Connections to a TLS listener that did not complete the handshake (e.g. no client
    certificate, a certificate from another CA)."""
    """CONNECTs refused by authentication (see :mod:`edge.device_auth`)."""
    publishes_denied: int = 0
    """PUBLISHes the ACL refused (acknowledged and discarded, or disconnected)."""
    subscriptions_denied: int = 0
    """SUBSCRIBE topic filters the ACL refused (SUBACK 0x80)."""
    wills_published: int = 0
    """Will messages published after an abnormal disconnect (handed to the sink)."""
    wills_denied: int = 0
    """Will messages not published because the ACL forbids their topic to the device."""
    _log: _RateLimitedLog = field(default_factory=_RateLimitedLog, repr=False, compare=False)

    def sink_failed(self, device_id: str, topic: str, error: BaseException) -> None:
        self.sink_failures += 1
        self._log.warning(
            "sink",
            "device %s: storing a publish on %r failed (%r); closing the connection "
            "without acknowledging, the device will resend",
            device_id,
            topic,
            error,
        )

    def qos0_store_failed(self, device_id: str, error: BaseException) -> None:
        self.qos0_store_failures += 1
        self._log.warning("qos0", "device %s: a QoS 0 publish was not stored: %r", device_id, error)

    def malformed(self, device_id: str, peer: str, reason: str) -> None:
        self.malformed_packets += 1
        self._log.warning(
            "malformed", "device %s (%s): %s; closing the connection", device_id, peer, reason
        )

    def keepalive_expired(self, device_id: str, peer: str) -> None:
        self.keepalive_timeouts += 1
        self._log.warning(
            "keepalive", "device %s (%s): keep-alive expired; closing", device_id, peer
        )


@dataclass(frozen=True)
class Security:
    """Authorisation settings of one broker; the audit log also gets authentication failures."""

    acl: AclPolicy | None = None
    """None: no topic ACL (every device may publish and subscribe anywhere)."""
    on_deny: str = "puback_discard"
    """Denied PUBLISH: ``puback_discard`` (acknowledge, store nothing) or ``disconnect``."""
    audit: AuditLog | None = None
    quotas: Quotas | None = None
    """Per-device rate/size/subscription quotas and the connection rate limit; None: none."""
    tenant_of: Callable[[str], tuple[str | None, str]] | None = None
    """With tenants: device id -> ``(tenant, why)``; a device without a tenant is refused
    at CONNECT (:meth:`edge.tenants.TenantMap.resolve`)."""


@dataclass(eq=False)
class EdgeContext:
    """What every :class:`EdgeProtocolHandler` of one broker shares."""

    sink: IngestSink
    observer: SessionObserver | None
    max_inflight: int
    max_packet_size: int
    forward: Forward
    needs_forward: Callable[[DecodedPublish], bool] = lambda _publish: True
    """Whether :attr:`forward` has anything to do for a publish (a matching subscription,
    a retained message); False lets an acknowledgement go out without it (amqtt_acks.py)."""
    stats: BrokerStats = field(default_factory=BrokerStats)
    live: dict[str, EdgeProtocolHandler] = field(default_factory=dict)
    """The connection that currently owns each client id (for takeover and the observer)."""
    security: Security = field(default_factory=Security)
    lifecycle: LifecycleListener | None = None
    """Told when connections start and end, with session details and the reason."""
    stopping: bool = False
    """The broker is shutting down: connections end with reason ``gateway_shutdown``."""
    keepalive: KeepAliveWheel = field(default_factory=KeepAliveWheel)
    """The connections' keep-alive checks, one timer per slot (edge/keepalive.py)."""

    def _audit(self, event: str, **fields: object) -> None:
        if self.security.audit is not None:
            self.security.audit.record(event, **fields)

    def auth_failed(self, device_id: str, peer: str, method: str, reason: str) -> None:
        """A CONNECT was refused: count, log (rate-limited), audit."""
        self.stats.auth_failures += 1
        self.stats._log.warning(
            "auth",
            "device %r (%s): authentication refused (%s): %s",
            device_id,
            peer,
            method,
            reason,
        )
        self._audit("auth_failure", device=device_id, peer=peer, method=method, reason=reason)

    def tls_failed(self, listener: str, peer: str, reason: str) -> None:
        """A TLS handshake failed (no client certificate, another CA, not TLS): count, log
        (rate-limited), audit. The device id is unknown at this point."""
        self.stats.tls_handshake_failures += 1
        self.stats._log.warning(
            "tls", "%s on listener %s: TLS handshake failed: %s", peer, listener, reason
        )
        self._audit("tls_handshake_failed", listener=listener, peer=peer, reason=reason)

    def publish_denied(self, device_id: str, peer: str, topic: str, qos: int) -> None:
        """The ACL refused a PUBLISH: count, log (rate-limited), audit."""
        self.stats.publishes_denied += 1
        action = self.security.on_deny
        self.stats._log.warning(
            "acl-pub", "device %s (%s): publish to %r denied (%s)", device_id, peer, topic, action
        )
        self._audit(
            "publish_denied", device=device_id, peer=peer, topic=topic, qos=qos, action=action
        )

    def subscribe_denied(self, device_id: str, peer: str, topic_filter: str) -> None:
        """The ACL refused a SUBSCRIBE filter: count, log (rate-limited), audit."""
        self.stats.subscriptions_denied += 1
        self.stats._log.warning(
            "acl-sub", "device %s (%s): subscribe to %r denied", device_id, peer, topic_filter
        )
        self._audit("subscribe_denied", device=device_id, peer=peer, topic_filter=topic_filter)

    def notify_connected(self, device_id: str, peer: str) -> None:
        if self.observer is not None:
            try:
                self.observer.device_connected(device_id, peer)
            except Exception:  # an observer bug must not take the device's connection down
                log.exception("session observer failed on device_connected(%s)", device_id)

    def notify_disconnected(self, device_id: str) -> None:
        if self.observer is not None:
            try:
                self.observer.device_disconnected(device_id)
            except Exception:
                log.exception("session observer failed on device_disconnected(%s)", device_id)

    def lifecycle_started(self, info: SessionInfo) -> None:
        if self.lifecycle is not None:
            try:
                self.lifecycle.connection_started(info)
            except Exception:  # a listener bug must not take the device's connection down
                log.exception("lifecycle listener failed on connect of %s", info.device_id)

    def lifecycle_ended(self, ended: ConnectionEnded) -> None:
        if self.lifecycle is not None:
            try:
                self.lifecycle.connection_ended(ended)
            except Exception:
                log.exception("lifecycle listener failed on disconnect of %s", ended.device_id)


class Qos2State:
    """QoS 2 receive state of one MQTT session (see the module docstring)."""

    __slots__ = ("awaiting_pubrel", "storing")

    def __init__(self) -> None:
        self.storing: dict[int, asyncio.Future[None]] = {}
        """Packet id -> sink future, between PUBLISH and the end of the store."""
        self.awaiting_pubrel: set[int] = set()
        """Stored; PUBREC sent or about to be; a resent PUBLISH is a duplicate until PUBREL."""

    def track(self, packet_id: int, future: asyncio.Future[None]) -> None:
        self.storing[packet_id] = future

        # A done-callback, not the handler's pump, moves the id along: the store may finish
        # after this connection is gone, and the next connection of the session must see it.
        def stored(done: asyncio.Future[None]) -> None:
            if self.storing.get(packet_id) is done:
                del self.storing[packet_id]
            if not done.cancelled() and done.exception() is None:
                self.awaiting_pubrel.add(packet_id)

        future.add_done_callback(stored)


class SubscriptionIndex:
    """Answers "does any current subscription match this topic?" cheaply.

    Exact filters (no wildcard) are a set lookup. Wildcard filters are few on an edge
    gateway; the result of scanning them is cached per topic and the cache is dropped whenever
    the set of wildcard filters changes (and when it reaches ``TOPIC_CACHE_LIMIT`` topics, so
    it stays bounded however many devices publish).
    """

    def __init__(self, matcher: Callable[[str, str], bool]) -> None:
        self._matcher = matcher
        self._exact: set[str] = set()
        self._wild: dict[str, None] = {}
        self._cache: dict[str, bool] = {}

    def clear(self) -> None:
        self._exact.clear()
        self._wild.clear()
        self._cache.clear()

    def refresh(self, topic_filter: str, subscriptions: dict[str, list[Any]]) -> None:
        """Re-read one filter's state after amqtt changed its subscriber list."""
        active = bool(subscriptions.get(topic_filter))
        if "+" not in topic_filter and "#" not in topic_filter:
            if active:
                self._exact.add(topic_filter)
            else:
                self._exact.discard(topic_filter)
        elif active != (topic_filter in self._wild):
            if active:
                self._wild[topic_filter] = None
            else:
                del self._wild[topic_filter]
            self._cache.clear()

    def matches(self, topic: str) -> bool:
        if topic in self._exact:
            return True
        if not self._wild:
            return False
        hit = self._cache.get(topic)
        if hit is None:
            hit = any(self._matcher(topic, topic_filter) for topic_filter in self._wild)
            if len(self._cache) >= TOPIC_CACHE_LIMIT:
                self._cache.clear()
            self._cache[topic] = hit
        return hit
