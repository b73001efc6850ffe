"""Device lifecycle: what a connection's start and end look like, and their Kafka records.

Pure code, no I/O. The broker (:mod:`edge.amqtt_handler`) fills :class:`SessionInfo` when a
device's connection starts and :class:`ConnectionEnded` when it ends, and hands them to a
:class:`LifecycleListener` (:class:`gateway.lifecycle_service.LifecycleService`), which
stores the records built here in the buffer like any uplink message. The record format is
documented in docs/lifecycle.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gateway.config import ClassConfig, LifecycleConfig

__all__ = [
    "ABNORMAL_REASONS",
    "AUTH_METHOD_KEY",
    "CLEAN",
    "CONNECTION_LOST",
    "DENIED",
    "EVENT_CLASS",
    "GATEWAY_RESTART",
    "GATEWAY_SHUTDOWN",
    "HEARTBEAT_CLASS",
    "INTERNAL_ERROR",
    "KEEPALIVE_TIMEOUT",
    "PROTOCOL_ERROR",
    "REASONS",
    "RECORD_SCHEMA",
    "REVOKED",
    "STORE_FAILED",
    "TAKEN_OVER",
    "TLS_KEY",
    "TOOK_OVER_KEY",
    "ConnectionEnded",
    "LifecycleListener",
    "SessionInfo",
    "connected_record",
    "disconnected_record",
    "encode",
    "internal_classes",
]

RECORD_SCHEMA: Final = 1
"""``schema`` field of every record; raised when a field changes meaning."""

EVENT_CLASS: Final = "!lifecycle"
"""Buffer class of connected/disconnected events. ``!`` cannot start a configured class
name, so no device publish can be routed into it."""
HEARTBEAT_CLASS: Final = "!heartbeat"
"""Buffer class of heartbeats (lossy: drop-oldest when full, expire after a TTL)."""

# Why a connection ended (``reason`` of a disconnected event).
CLEAN: Final = "clean"
"""The device sent DISCONNECT."""
CONNECTION_LOST: Final = "connection_lost"
"""The socket closed or failed without DISCONNECT (device killed, network gone)."""
KEEPALIVE_TIMEOUT: Final = "keepalive_timeout"
"""Nothing received for 1.5 x the device's keep-alive."""
PROTOCOL_ERROR: Final = "protocol_error"
"""A malformed or forbidden packet; the gateway closed the connection."""
TAKEN_OVER: Final = "taken_over"
"""A new connection with the same client id replaced this one."""
DENIED: Final = "denied"
"""The ACL denied a publish and ``broker.on_deny = "disconnect"``, or a quota closed the
connection (over its rate with ``quotas.policy = "disconnect"``, or an oversized payload with
``quotas.on_oversize = "disconnect"``; docs/quotas.md)."""
STORE_FAILED: Final = "store_failed"
"""A publish could not be stored (e.g. blocked past ``buffer.block_timeout_s``)."""
INTERNAL_ERROR: Final = "internal_error"
"""A gateway bug ended the connection (logged)."""
REVOKED: Final = "revoked"
"""A configuration reload (SIGHUP) revoked the device's credentials or certificate, or its
tenant or ACL no longer admits it; the gateway closed the connection (no will: the device is
no longer trusted)."""
GATEWAY_SHUTDOWN: Final = "gateway_shutdown"
"""The gateway stopped (SIGTERM) and closed every connection."""
GATEWAY_RESTART: Final = "gateway_restart"
"""Written at start for devices the last run left connected: that run ended without
closing them (crash, kill -9, power loss)."""

AUTH_METHOD_KEY: Final = "tidegate.auth_method"
"""amqtt ``Session.attributes``: how the CONNECT was authenticated (set by the broker)."""
TLS_KEY: Final = "tidegate.tls"
"""amqtt ``Session.attributes``: the connection came in over TLS."""
TOOK_OVER_KEY: Final = "tidegate.took_over"
"""amqtt ``Session.attributes``: the CONNECT replaced a live connection of the client id."""

REASONS: Final = (
    CLEAN,
    CONNECTION_LOST,
    KEEPALIVE_TIMEOUT,
    PROTOCOL_ERROR,
    TAKEN_OVER,
    DENIED,
    STORE_FAILED,
    INTERNAL_ERROR,
    REVOKED,
    GATEWAY_SHUTDOWN,
    GATEWAY_RESTART,
)
ABNORMAL_REASONS: Final = frozenset(REASONS) - {CLEAN, GATEWAY_SHUTDOWN}
"""The device's connection ended without the device or the operator asking for it."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One device connection, as the CONNECT and the listener described it."""

    device_id: str
    peer: str
    """``ip:port`` of the device."""
    clean_session: bool
    keep_alive_s: int
    auth_method: str
    """``certificate``, ``password`` or ``anonymous`` (:mod:`edge.device_auth`)."""
    tls: bool
    session_present: bool
    """A persistent (clean_session=0) session was resumed."""
    will_topic: str | None
    """None when the CONNECT carried no will."""
    will_qos: int
    will_retain: bool
    took_over: bool
    """This connection replaced a live one with the same client id."""
    connected_ms: int

    @classmethod
    def of_amqtt_session(cls, session: Any, peer: str, *, took_over: bool) -> SessionInfo:
        """From amqtt's ``Session`` of a connection that has just been accepted."""
        attributes: dict[str, Any] = session.attributes
        will = bool(session.will_flag)
        return cls(
            device_id=str(session.client_id),
            peer=peer,
            clean_session=bool(session.clean_session),
            keep_alive_s=int(session.keep_alive or 0),
            auth_method=str(attributes.get(AUTH_METHOD_KEY, "anonymous")),
            tls=bool(attributes.get(TLS_KEY, False)),
            session_present=bool(session.parent),  # amqtt: 1 when a session was resumed
            will_topic=str(session.will_topic) if will else None,
            will_qos=int(session.will_qos or 0) if will else 0,
            will_retain=bool(session.will_retain) if will else False,
            took_over=took_over,
            connected_ms=time.time_ns() // 1_000_000,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "clean_session": self.clean_session,
            "keep_alive_s": self.keep_alive_s,
            "auth_method": self.auth_method,
            "tls": self.tls,
            "session_present": self.session_present,
            "will": None
            if self.will_topic is None
            else {"topic": self.will_topic, "qos": self.will_qos, "retain": self.will_retain},
        }


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """How one device connection ended."""

    device_id: str
    session: SessionInfo | None
    """None for :data:`GATEWAY_RESTART` (the last run's session is not known)."""
    reason: str
    """One of :data:`REASONS`."""
    detail: str
    """Human-readable cause (the log line's text)."""
    will_published: bool
    """The gateway published the device's will (abnormal end of a connection with a will;
    not on takeover or gateway shutdown)."""
    disconnected_ms: int


class LifecycleListener(Protocol):
    """Told synchronously, in order, when device connections start and end.

    Contract: called from the event loop, never awaits; per device the calls alternate
    ``connected`` / ``ended`` (a takeover ends the old connection before the new one is
    announced). Must not raise (the broker logs and ignores errors).
    """

    def connection_started(self, info: SessionInfo) -> None: ...

    def connection_ended(self, ended: ConnectionEnded) -> None: ...


def internal_classes(config: LifecycleConfig) -> dict[str, ClassConfig]:
    """The buffer classes lifecycle records are stored in.

    Events are lossy only when the buffer is full: then the oldest event is evicted to make
    room (a drop-ledger entry), because blocking would withhold nothing (no device waits for
    a PUBACK of them) and only pile them up in memory. Heartbeats also expire after
    ``heartbeat_ttl_s``: a backlog of stale heartbeats is worthless to the cloud.
    """
    heartbeat_topic = config.heartbeat_topic or config.topic
    return {
        EVENT_CLASS: ClassConfig(
            kafka_topic=config.topic,
            priority=config.priority,
            content_type="application/json",
            lossy=True,
            on_full="drop_oldest",
        ),
        HEARTBEAT_CLASS: ClassConfig(
            kafka_topic=heartbeat_topic,
            priority=config.priority,
            content_type="application/json",
            lossy=True,
            on_full="drop_oldest",
            ttl_s=config.heartbeat_ttl_s,
        ),
    }


def connected_record(gateway_id: str, info: SessionInfo) -> dict[str, Any]:
    """The ``connected`` event."""
    return {
        "schema": RECORD_SCHEMA,
        "type": "connected",
        "gateway_id": gateway_id,
        "device_id": info.device_id,
        "ts_ms": info.connected_ms,
        "took_over": info.took_over,
        "session": info.as_dict(),
    }


def disconnected_record(gateway_id: str, ended: ConnectionEnded) -> dict[str, Any]:
    """The ``disconnected`` event."""
    session = ended.session
    connected_ms = None if session is None else session.connected_ms
    return {
        "schema": RECORD_SCHEMA,
        "type": "disconnected",
        "gateway_id": gateway_id,
        "device_id": ended.device_id,
        "ts_ms": ended.disconnected_ms,
        "reason": ended.reason,
        "abnormal": ended.reason in ABNORMAL_REASONS,
        "detail": ended.detail,
        "will_published": ended.will_published,
        "connected_ms": connected_ms,
        "duration_s": None
        if connected_ms is None
        else round(max(0, ended.disconnected_ms - connected_ms) / 1000, 3),
        "session": None if session is None else session.as_dict(),
    }


def encode(record: dict[str, Any]) -> bytes:
    """Compact JSON, UTF-8."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
