"""The embedded MQTT broker devices connect to: amqtt 0.12.1 with ack-after-commit.

:class:`EdgeBroker` runs an amqtt ``Broker`` whose per-connection protocol handler is
:class:`edge.amqtt_handler.EdgeProtocolHandler`: every PUBLISH is handed to the
:class:`~edge.ingest.IngestSink` in socket order, and its PUBACK (QoS 1) or PUBREC (QoS 2)
is written only after the sink's future resolved, i.e. after the SQLite commit. QoS 2 is
supported (persist before PUBREC, duplicates suppressed until PUBREL); see the handler
module for the full flow and the reasons.

The amqtt ``Broker`` subclass and the amqtt internals it overrides: :mod:`edge.amqtt_broker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from edge.amqtt_broker import EdgeAmqttBroker, amqtt_config
from edge.broker_state import BrokerStats, Security
from edge.device_auth import DeviceAuthenticator
from edge.ingest import IngestSink, SessionObserver
from edge.lifecycle import (
    REVOKED,
    LifecycleListener,
)
from edge.revocation import PeerIdentity, Revocation
from gateway.errors import TidegateError

__all__ = ["DEFAULT_MAX_PACKET_SIZE", "EdgeBroker", "EdgeBrokerError"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PACKET_SIZE: Final = 1 << 20
"""Largest MQTT packet a device may send (bytes); larger ones close the connection."""


class EdgeBrokerError(TidegateError):
    """The embedded broker could not start (for example a listener could not bind)."""


class EdgeBroker:
    """The embedded MQTT 3.1.1 broker with ack-after-commit.

    ``async with EdgeBroker(...) as broker:`` or :meth:`start` / :meth:`stop` (both
    idempotent; a stopped broker can be started again, on fresh ports when they were 0).

    Args:
        listeners: ``(name, host, port)`` per TCP listener; port 0 picks a free port (see
            :attr:`bound_addresses`). IPv4 addresses or host names.
        sink: receives every PUBLISH in socket order; see :class:`~edge.ingest.IngestSink`.
        observer: told when a device's connection starts and ends (takeovers included).
        max_inflight_per_session: un-acknowledged inbound publishes per connection; at the
            cap the broker stops reading that socket until an acknowledgement goes out.
        uplink_prefix: topics under it are device uplink (never retained by the broker).
        allow_anonymous: accept clients without credentials (see :mod:`edge.device_auth`).
        max_packet_size: larger packets close the connection.
        connect_timeout: seconds a new connection has to send its CONNECT.
        tls: listener name -> server TLS context (build it with
            :func:`edge.device_auth.server_tls_context`: client certificates required).
        password_file: device passwords (salted scrypt, :mod:`edge.passwords`), or None.
        security: topic ACL, deny policy and audit log (default: no ACL, no audit).
        revocation: revoked device ids, certificate fingerprints and CRL serials.
        lifecycle: told when connections start and end, with the reason and whether the
            will was published (:mod:`edge.lifecycle`).

    Reload (SIGHUP, :mod:`gateway.reload`): :attr:`authenticator` ``.update(...)``,
    :meth:`replace_tls_contexts`, :meth:`replace_security`, then :meth:`disconnect_invalid`.
    """

    def __init__(
        self,
        *,
        listeners: Sequence[tuple[str, str, int]],
        sink: IngestSink,
        observer: SessionObserver | None,
        max_inflight_per_session: int,
        uplink_prefix: str = "d/",
        allow_anonymous: bool = True,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        connect_timeout: float = 10.0,
        tls: Mapping[str, ssl.SSLContext] | None = None,
        password_file: Path | None = None,
        security: Security | None = None,
        revocation: Revocation | None = None,
        lifecycle: LifecycleListener | None = None,
    ) -> None:
        names = [name for name, _host, _port in listeners]
        if not names:
            raise ValueError("at least one listener is required")
        if len(set(names)) != len(names):
            raise ValueError(f"listener names must be unique: {names}")
        for name, host, port in listeners:
            if not 0 <= port <= 65535:
                raise ValueError(f"listener {name}: port {port} out of range")
            if ":" in host:
                raise ValueError(f"listener {name}: amqtt 0.12.1 cannot bind IPv6 address {host}")
        unknown = set(tls or {}) - set(names)
        if unknown:
            raise ValueError(f"TLS context for unknown listener(s): {sorted(unknown)}")
        if security is not None and security.on_deny not in ("puback_discard", "disconnect"):
            raise ValueError(f"invalid on_deny {security.on_deny!r}")
        if max_inflight_per_session < 1:
            raise ValueError("max_inflight_per_session must be at least 1")
        if not uplink_prefix or "+" in uplink_prefix or "#" in uplink_prefix:
            raise ValueError(f"invalid uplink prefix {uplink_prefix!r}")
        self._listeners = [(name, host, port) for name, host, port in listeners]
        self._sink = sink
        self._observer = observer
        self._max_inflight = max_inflight_per_session
        self._uplink_prefix = uplink_prefix
        self._allow_anonymous = allow_anonymous
        self._max_packet_size = max_packet_size
        self._connect_timeout = connect_timeout
        self._tls = dict(tls or {})
        self._security = security or Security()
        self._lifecycle = lifecycle
        # Reads the password file now: a broken one fails here, not at the first device.
        self._authenticator = DeviceAuthenticator(
            allow_anonymous=allow_anonymous, password_file=password_file
        )
        self._authenticator.revocation = revocation or Revocation()
        self._broker: EdgeAmqttBroker | None = None
        self._bound: dict[str, tuple[str, int]] = {}
        self._stats = BrokerStats()
        self._lock = asyncio.Lock()

    @property
    def bound_addresses(self) -> dict[str, tuple[str, int]]:
        """Listener name -> the ``(host, port)`` actually bound; empty while stopped."""
        return dict(self._bound)

    @property
    def stats(self) -> BrokerStats:
        """Counters of the current (or last) run."""
        return self._stats

    @property
    def amqtt_broker(self) -> Any:
        """The running amqtt ``Broker`` (private amqtt API: diagnostics and tests only)."""
        return self._broker

    @property
    def running(self) -> bool:
        return self._broker is not None

    @property
    def authenticator(self) -> DeviceAuthenticator:
        """Checks every CONNECT; its settings can be swapped while running (reload)."""
        return self._authenticator

    @property
    def security(self) -> Security:
        """The current ACL, deny policy and audit log."""
        return self._security

    def replace_tls_contexts(self, tls: Mapping[str, ssl.SSLContext]) -> None:
        """New server TLS contexts for the same TLS listeners: used from the next handshake
        on; established connections keep theirs."""
        if set(tls) != set(self._tls):
            raise ValueError(f"TLS listeners are {sorted(self._tls)}, got {sorted(tls)}")
        self._tls = dict(tls)
        if self._broker is not None:
            self._broker._tls_contexts = dict(tls)

    def replace_security(self, security: Security) -> None:
        """New ACL / deny policy: applies from the next PUBLISH or SUBSCRIBE read."""
        if security.on_deny not in ("puback_discard", "disconnect"):
            raise ValueError(f"invalid on_deny {security.on_deny!r}")
        # Quotas do not reload (their section needs a restart) and hold live state (buckets,
        # subscription counts): the running ones stay.
        security = dataclasses.replace(security, quotas=self._security.quotas)
        self._security = security
        if self._broker is not None:
            self._broker.edge.security = security

    def drop_subscriptions(self, allowed: Callable[[str, str], bool]) -> list[tuple[str, str]]:
        """Remove every subscription (connected or stored session) that ``allowed(client id,
        filter)`` now refuses, e.g. after an ACL change; audited as ``subscription_revoked``.
        Returns ``(device id, filter)`` of each."""
        broker = self._broker
        if broker is None:
            return []
        dropped: list[tuple[str, str]] = []
        for topic_filter, subscribers in list(broker._subscriptions.items()):
            for session, _qos in list(subscribers):
                device_id = str(session.client_id)
                if allowed(device_id, topic_filter):
                    continue
                broker._del_subscription(topic_filter, session)
                dropped.append((device_id, topic_filter))
                audit = broker.edge.security.audit
                if audit is not None:
                    audit.record(
                        "subscription_revoked", device=device_id, topic_filter=topic_filter
                    )
            if not broker._subscriptions.get(topic_filter, True):
                del broker._subscriptions[topic_filter]  # as amqtt does for emptied filters
        return dropped

    async def disconnect_invalid(
        self, verdict: Callable[[PeerIdentity], str | None]
    ) -> list[tuple[str, str]]:
        """Close every live connection whose identity ``verdict`` gives a reason for (audited
        as ``device_disconnected``); return ``(device id, reason)`` of each."""
        broker = self._broker
        if broker is None:
            return []
        closed: list[tuple[str, str]] = []
        for device_id, handler in list(broker.edge.live.items()):
            identity = broker.identities.get(handler)
            reason = None if identity is None else verdict(identity)
            if reason is None:
                continue
            peer = handler.peer
            log.warning("device %s (%s): disconnecting: %s", device_id, peer, reason)
            audit = broker.edge.security.audit
            if audit is not None:
                audit.record("device_disconnected", device=device_id, peer=peer, reason=reason)
            await handler.abort(reason, REVOKED)
            closed.append((device_id, reason))
        return closed

    async def start(self) -> None:
        """Bind the listeners and start serving. No-op when already running."""
        async with self._lock:
            if self._broker is not None:
                return
            broker = EdgeAmqttBroker(
                amqtt_config(self._listeners, allow_anonymous=self._allow_anonymous),
                sink=self._sink,
                observer=self._observer,
                max_inflight=self._max_inflight,
                max_packet_size=self._max_packet_size,
                uplink_prefix=self._uplink_prefix,
                connect_timeout=self._connect_timeout,
                authenticator=self._authenticator,
                security=self._security,
                tls_contexts=self._tls,
                lifecycle=self._lifecycle,
            )
            try:
                await broker.start()
            except Exception as exc:
                # amqtt leaves the listeners that did bind open when a later one fails.
                for server in list(broker._servers.values()):
                    with contextlib.suppress(Exception):
                        await server.close_instance()
                with contextlib.suppress(Exception):
                    await broker.plugins_manager.close()
                raise EdgeBrokerError(f"embedded MQTT broker failed to start: {exc}") from exc
            self._broker = broker
            self._stats = broker.edge.stats
            self._bound = broker.bound_addresses()
            log.info("edge broker listening on %s", self._bound)

    async def stop(self) -> None:
        """Stop accepting, end every session (no further acks), close. No-op when stopped."""
        async with self._lock:
            broker, self._broker = self._broker, None
            if broker is None:
                return
            self._bound = {}
            try:
                broker.close_listeners()
                await broker.shutdown()
            finally:
                await broker.cancel_connections()
            log.info("edge broker stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.shield(self.stop())
