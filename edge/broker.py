"""The embedded MQTT broker devices connect to: amqtt 0.12.1 with ack-after-commit.

:class:`EdgeBroker` runs an amqtt ``Broker`` whose per-connection protocol handler is
:class:`edge.amqtt_handler.EdgeProtocolHandler`: every PUBLISH is handed to the
:class:`~edge.ingest.IngestSink` in socket order, and its PUBACK (QoS 1) or PUBREC (QoS 2)
is written only after the sink's future resolved, i.e. after the SQLite commit. QoS 2 is
supported (persist before PUBREC, duplicates suppressed until PUBREL); see the handler
module for the full flow and the reasons.

How the handler gets in: amqtt builds its handler in ``Broker._initialize_client_session``
through the module-global name ``BrokerProtocolHandler``. Rebinding that name would swap the
handler of *every* amqtt broker in the process (the bare-amqtt benchmark peer, other tests)
and could not carry this broker's sink. So :class:`_EdgeAmqttBroker` overrides
``_initialize_client_session`` instead: it lets amqtt parse and validate the CONNECT as usual,
then returns our handler (bound to this broker's :class:`~edge.amqtt_handler.EdgeContext`) in
place of the stock one amqtt made, which was never attached or started. Scoped to this
instance; nothing global changes. ``tests/test_edge_broker.py`` checks both halves.

Other amqtt internals overridden here, all in :class:`_EdgeAmqttBroker` (amqtt is pinned
exactly in pyproject.toml because of them):

* ``_client_connected``: refuses connections once stopping; tracks connection tasks so
  :meth:`EdgeBroker.stop` leaves none behind.
* ``_initialize_client_session``: the first packet is read with a deadline and a size limit
  (amqtt waits forever and buffers whatever length the header claims), and any decoding
  error closes the socket (amqtt leaked it for error types it did not expect).
* ``_handle_client_session``: when it returns, the handler is stopped and the session marked
  disconnected (amqtt left refused-authentication sessions "connected" forever).
* ``_handle_disconnect``: a connection that was taken over no longer touches the session
  (amqtt marked the shared clean_session=0 Session disconnected, and its monitor then
  deleted it under the new connection about a second later). The will is published when
  the handler's ``will_due()`` says so (the same decision the lifecycle event reports),
  through the ACL and the sink like a publish of the device (amqtt only broadcast it, so a
  will on an uplink topic never reached Kafka, and no ACL checked its topic).
* ``add_subscription`` / ``_del_subscription`` / ``start``: keep :class:`SubscriptionIndex`
  current, which decides whether a stored publish goes to amqtt's broadcast at all.

Broadcast bypass: amqtt checks every PUBLISH against every subscription filter on one
global queue (``_run_broadcast``), which caps throughput when devices hold thousands of
subscriptions. A publish is handed to that queue only if some current subscription matches
its topic (an exact-filter set plus a small cached scan of wildcard filters). Non-uplink
topics keep amqtt's behaviour (delivery to subscribers and retained messages) and are still
submitted to the sink; uplink topics (under ``uplink_prefix``) are never retained by the
broker: the buffer is their store.

Plugins: only ``AnonymousAuthPlugin`` is loaded (no event/packet logging, no $SYS: they cost
about a third of the CPU). With ``allow_anonymous=False`` it accepts any client that sends a
user name, which is all amqtt offers without the security work; amqtt's topic-ACL and
message events do not run for inbound publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from amqtt.adapters import BufferReader
from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket

from edge.amqtt_handler import EdgeProtocolHandler
from edge.broker_state import BrokerStats, EdgeContext, Security, SubscriptionIndex
from edge.device_auth import (
    NOT_AUTHORIZED,
    AuthDecision,
    DeviceAuthenticator,
    peer_certificate_cn,
)
from edge.ingest import InboundPublish, IngestSink, SessionObserver
from edge.lifecycle import (
    AUTH_METHOD_KEY,
    REVOKED,
    TLS_KEY,
    TOOK_OVER_KEY,
    LifecycleListener,
)
from edge.mqtt_wire import CONNECT, DecodedPublish, MalformedPacketError, encode_packet, read_packet
from edge.revocation import PeerIdentity, Revocation
from edge.session_state import slim_session
from gateway.errors import TidegateError

__all__ = ["DEFAULT_MAX_PACKET_SIZE", "EdgeBroker", "EdgeBrokerError"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PACKET_SIZE: Final = 1 << 20
"""Largest MQTT packet a device may send (bytes); larger ones close the connection."""

_ANONYMOUS_AUTH_PLUGIN: Final = "amqtt.plugins.authentication.AnonymousAuthPlugin"
_CLOSE_TIMEOUT_S: Final = 1.0
_CONNECTION_DRAIN_TIMEOUT_S: Final = 5.0
_ACCEPT_BACKLOG: Final = 4096
"""listen() backlog of TCP listeners (the kernel caps it at net.core.somaxconn)."""


class EdgeBrokerError(TidegateError):
    """The embedded broker could not start (for example a listener could not bind)."""


async def _close_quietly(writer: Any) -> None:
    """Close an amqtt writer adapter; abort the transport if the peer does not cooperate."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await writer.close()
    except (TimeoutError, OSError, AMQTTError):
        transport = getattr(getattr(writer, "_writer", None), "transport", None)
        if transport is not None:
            transport.abort()


class _EdgeAmqttBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's ``Broker`` with the overrides listed in the module docstring."""

    def __init__(
        self,
        config: Any,
        *,
        sink: IngestSink,
        observer: SessionObserver | None,
        max_inflight: int,
        max_packet_size: int,
        uplink_prefix: str,
        connect_timeout: float,
        authenticator: DeviceAuthenticator,
        security: Security,
        tls_contexts: Mapping[str, ssl.SSLContext],
        lifecycle: LifecycleListener | None = None,
    ) -> None:
        super().__init__(config)
        self.edge = EdgeContext(
            sink=sink,
            observer=observer,
            max_inflight=max_inflight,
            max_packet_size=max_packet_size,
            forward=self._forward,
            security=security,
            lifecycle=lifecycle,
        )
        self._authenticator = authenticator
        self._tls_contexts = dict(tls_contexts)
        self._index = SubscriptionIndex(self._topic_matches)
        self._uplink_prefix = uplink_prefix
        self._connect_timeout = connect_timeout
        self._accepting = True
        self._connection_tasks: set[asyncio.Task[Any]] = set()
        self.identities: weakref.WeakKeyDictionary[EdgeProtocolHandler, PeerIdentity] = (
            weakref.WeakKeyDictionary()
        )
        """How each connection authenticated (re-checked on reload)."""

    def _topic_matches(self, topic: str, topic_filter: str) -> bool:
        # amqtt's own matcher, so the bypass decision agrees with _run_broadcast exactly.
        return bool(self._matches(topic, topic_filter))

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await super().start()  # clears amqtt's subscriptions
        self._index.clear()

    def close_listeners(self) -> None:
        """Stop accepting devices (amqtt closes its listeners only after the sessions)."""
        self._accepting = False
        self.edge.stopping = True
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()

    async def cancel_connections(self) -> None:
        """Cancel connection tasks that outlived shutdown (e.g. one still in CONNECT)."""
        tasks = [task for task in self._connection_tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CONNECTION_DRAIN_TIMEOUT_S)

    def bound_addresses(self) -> dict[str, tuple[str, int]]:
        bound: dict[str, tuple[str, int]] = {}
        for name, server in self._servers.items():
            sockets = getattr(server.instance, "sockets", None) or ()
            if sockets:
                host, port = sockets[0].getsockname()[:2]
                bound[name] = (str(host), int(port))
        return bound

    async def _create_server_instance(  # amqtt's signature
        self,
        listener_name: str,
        listener_type: Any,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        # amqtt's own TLS context hard-codes CERT_OPTIONAL; ours requires a client cert. Our
        # TLS listeners accept plain TCP and upgrade in _client_connected, so a failed
        # handshake (no certificate, another CA) is seen, audited and bounded by a deadline
        # instead of only being logged by asyncio.
        if listener_name in self._tls_contexts:
            ssl_context = None
        if listener_type == ListenerType.TCP:
            # amqtt's call with asyncio's default backlog of 100: 10,000 devices connecting
            # at once overflow it and wait out SYN retransmits (1 s, 3 s, ...).
            return await asyncio.start_server(
                partial(self.stream_connected, listener_name=listener_name),
                address,
                port,
                reuse_address=True,
                ssl=ssl_context,
                backlog=_ACCEPT_BACKLOG,
            )
        return await super()._create_server_instance(
            listener_name, listener_type, address, port, ssl_context
        )

    async def _tls_handshake(self, listener_name: str, writer: Any) -> bool:
        """Upgrade a TLS listener's connection; False (audited, socket closed) on failure."""
        context = self._tls_contexts[listener_name]
        stream: asyncio.StreamWriter = writer._writer  # amqtt's StreamWriterAdapter
        peer_info = stream.get_extra_info("peername") or ("?", 0)
        peer = f"{peer_info[0]}:{peer_info[1]}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                await stream.start_tls(context)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            self.edge.tls_failed(listener_name, peer, str(reason))
            stream.transport.abort()
            return False
        return True

    # -- connection overrides -----------------------------------------------------------

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        if not self._accepting:
            await _close_quietly(writer)
            return
        task = asyncio.current_task()
        if task is not None:
            self._connection_tasks.add(task)
        try:
            if listener_name in self._tls_contexts and not await self._tls_handshake(
                listener_name, writer
            ):
                return
            await super()._client_connected(listener_name, reader, writer)
        finally:
            if task is not None:
                self._connection_tasks.discard(task)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[EdgeProtocolHandler, Any]:
        peer = f"{remote_address}:{remote_port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                first = await read_packet(
                    reader,
                    max_size=self.edge.max_packet_size,
                    first_byte_timeout=None,
                    only_type=CONNECT,  # [MQTT-3.1.0-1]
                )
        except (MalformedPacketError, TimeoutError) as exc:
            self.edge.stats.malformed("?", peer, f"no valid CONNECT: {str(exc) or 'timed out'}")
            await _close_quietly(writer)
            raise MQTTError(f"{peer}: no valid CONNECT") from exc
        if first is None:
            await _close_quietly(writer)
            raise MQTTError(f"{peer}: connection closed before CONNECT")
        decision = await self._authenticate_connect(first, writer, peer)
        try:
            # amqtt parses and validates the CONNECT (and answers bad ones with a CONNACK
            # refusal) from the bytes we already read; the handler it built is discarded.
            _stock, session = await super()._initialize_client_session(
                BufferReader(encode_packet(first)), writer, remote_address, remote_port
            )
        except (AMQTTError, MQTTError, NoDataError):
            await _close_quietly(writer)
            raise
        except Exception as exc:  # amqtt's decoders raise assorted types on bad input
            self.edge.stats.malformed("?", peer, f"undecodable CONNECT: {exc!r}")
            await _close_quietly(writer)
            raise MQTTError(f"{peer}: undecodable CONNECT") from exc
        if decision is not None:
            # amqtt's session monitor drops disconnected anonymous sessions at once.
            session.is_anonymous = decision.anonymous
        slim_session(session)  # ~20 KB less per connection (edge/session_state.py)
        # For the lifecycle events. Set on every CONNECT: a resumed session keeps attributes.
        session.attributes[AUTH_METHOD_KEY] = "anonymous" if decision is None else decision.method
        session.attributes[TLS_KEY] = writer.get_ssl_info() is not None
        old = self.edge.live.get(str(session.client_id))
        session.attributes[TOOK_OVER_KEY] = old is not None
        if old is not None:
            # Before amqtt's own takeover (clean_session=0) closes the old connection, so
            # its end is reported as a takeover and its will is not published.
            old.mark_taken_over()
        handler = EdgeProtocolHandler(self.plugins_manager, loop=self._loop, edge=self.edge)
        if decision is not None and decision.identity is not None:
            self.identities[handler] = decision.identity
        return handler, session

    async def _authenticate_connect(
        self, first: Any, writer: Any, peer: str
    ) -> AuthDecision | None:
        """Refuse the CONNECT (CONNACK 4/5, close, MQTTError) unless the device is authenticated.

        Runs before amqtt's session handling: amqtt deletes or takes over the client id's
        existing session before it asks its auth plugins. None when the CONNECT does not
        decode; amqtt then refuses it the way it always did.
        """
        try:
            connect = await ConnectPacket.from_stream(BufferReader(encode_packet(first)))
            payload = connect.payload
            client_id = str(payload.client_id or "")
            username, password = payload.username, payload.password
        except Exception:  # amqtt's decoders raise assorted types; super() reports it
            return None
        ssl_object = writer.get_ssl_info()
        decision = await self._authenticator.check(
            client_id=client_id,
            username=username,
            password=password,
            certificate_cn=peer_certificate_cn(ssl_object),
            tls=ssl_object is not None,
            certificate_der=None if ssl_object is None else ssl_object.getpeercert(True),
        )
        tenant_of = self.edge.security.tenant_of
        if decision.accepted and tenant_of is not None:
            tenant, why = tenant_of(client_id)
            if tenant is None:
                decision = AuthDecision(False, decision.method, NOT_AUTHORIZED, f"no tenant: {why}")
        if decision.accepted:
            return decision
        self.edge.auth_failed(client_id, peer, decision.method, decision.reason)
        with contextlib.suppress(Exception):
            await ConnackPacket.build(0, decision.return_code).to_stream(writer)
        await _close_quietly(writer)
        raise MQTTError(f"{peer}: authentication refused: {decision.reason}")

    async def _authenticate(self, session: Any, _listener: Any) -> bool:
        # Decided in _initialize_client_session (before amqtt touched any session).
        return True

    async def _handle_client_session(  # noqa: PLR0917  # amqtt's signature
        self,
        reader: Any,
        writer: Any,
        client_session: Any,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        try:
            await super()._handle_client_session(
                reader, writer, client_session, handler, server, listener_name
            )
        finally:
            # Whatever way amqtt left (normal end, refused authentication, an error), the
            # connection is over: stop the handler and, if the session still points at it,
            # mark the session disconnected so amqtt's session monitor can expire it.
            await handler.stop()
            current = self._sessions.get(client_session.client_id, (None, None))[1]
            if current is handler and client_session.transitions.is_connected():
                client_session.transitions.disconnect()

    async def _handle_disconnect(
        self, client_session: Any, handler: Any, disconnect_waiter: Any
    ) -> None:
        # amqtt's version, except that a connection which was taken over leaves the session
        # alone. For clean_session=0 the new connection shares the very Session object, and
        # amqtt marked it disconnected here; its session monitor then deleted the session
        # (and stopped the new connection) about a second later.
        client_id = client_session.client_id
        # handler.will_due() decides once (no DISCONNECT, not taken over, not shutting
        # down); the lifecycle event reports the same decision. A takeover is marked in
        # _initialize_client_session, before amqtt's takeover resolves this waiter.
        if handler.will_due():  # every handler of this broker is an EdgeProtocolHandler
            await self._publish_will(client_session)
        await self._stop_handler(handler)
        # Check again: the takeover may have happened while the handler stopped. If it
        # happened before, EdgeProtocolHandler.start puts the session back to "connected".
        if self._sessions.get(client_id, (None, None))[1] in (None, handler):
            client_session.transitions.disconnect()
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_DISCONNECTED,
                client_id=client_id,
                client_session=client_session,
            )

    async def _publish_will(self, session: Any) -> None:
        """Publish a device's will as if the device had published it: through the sink (so
        a will on an uplink topic is stored and forwarded to Kafka like any publish), then
        to edge subscribers. The ACL was checked by ``will_due``. amqtt only broadcast it."""
        device_id = str(session.client_id)
        topic, qos = str(session.will_topic), int(session.will_qos or 0)
        retain, payload = bool(session.will_retain), bytes(session.will_message or b"")
        self.edge.stats.wills_published += 1
        inbound = InboundPublish(device_id, topic, qos, retain, payload, time.time())
        try:
            future = self.edge.sink.submit(inbound)
        except Exception as exc:  # same as a failed future
            self.edge.stats.sink_failed(device_id, topic, exc)
        else:
            stats = self.edge.stats

            def stored(done: asyncio.Future[None]) -> None:
                error = None if done.cancelled() else done.exception()
                if done.cancelled() or error is not None:
                    stats.sink_failed(device_id, topic, error or asyncio.CancelledError())

            future.add_done_callback(stored)
        await self._forward(session, DecodedPublish(topic, qos, retain, False, None, payload))

    # -- subscriptions ------------------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        acl = self.edge.security.acl
        if acl is not None and not acl.may_subscribe(str(session.client_id), subscription[0]):
            peer = f"{session.remote_address}:{session.remote_port}"
            self.edge.subscribe_denied(str(session.client_id), peer, subscription[0])
            return 0x80  # SUBACK failure [MQTT-3.9.3]
        result = int(await super().add_subscription(subscription, session))
        self._index.refresh(subscription[0], self._subscriptions)
        return result

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        # Also reached from _del_all_subscriptions (session deleted or cleaned up).
        deleted = int(super()._del_subscription(a_filter, session))
        if deleted:
            self._index.refresh(a_filter, self._subscriptions)
        return deleted

    async def _forward(self, session: Any, publish: DecodedPublish) -> None:
        """After the sink accepted a publish: amqtt's broadcast only if a subscription matches."""
        stats = self.edge.stats
        if self._index.matches(publish.topic):
            stats.broadcast_forwarded += 1
            await self._broadcast_message(session, publish.topic, publish.payload)
        else:
            stats.broadcast_skipped += 1
        if publish.retain and not publish.topic.startswith(self._uplink_prefix):
            await self.retain_message(session, publish.topic, publish.payload, publish.qos)


def _amqtt_config(listeners: Sequence[tuple[str, str, int]], *, allow_anonymous: bool) -> Any:
    binds = {name: f"{host}:{port}" for name, host, port in listeners}
    configs = {
        name: ListenerConfig(type=ListenerType.TCP, bind=bind) for name, bind in binds.items()
    }
    if "default" not in configs:
        # amqtt requires a listener named "default"; one without a bind address opens nothing.
        configs["default"] = ListenerConfig(bind=None)
    config = BrokerConfig(
        listeners=configs,
        plugins={_ANONYMOUS_AUTH_PLUGIN: {"allow_anonymous": allow_anonymous}},
        timeout_disconnect_delay=0,
    )
    # BrokerConfig copies the "default" listener's values into any field of another listener
    # that equals the field's default (so "0.0.0.0:1883" would be replaced): set them again.
    for name, bind in binds.items():
        config.listeners[name].bind = bind
        config.listeners[name].type = ListenerType.TCP
        config.listeners[name].max_connections = 0
    return config


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
        self._broker: _EdgeAmqttBroker | None = None
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
            broker = _EdgeAmqttBroker(
                _amqtt_config(self._listeners, allow_anonymous=self._allow_anonymous),
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
