"""The amqtt ``Broker`` subclass behind :class:`edge.broker.EdgeBroker`.

How the handler gets in: amqtt builds its handler in ``Broker._initialize_client_session``
through the module-global name ``BrokerProtocolHandler``. Rebinding that name would swap the
handler of *every* amqtt broker in the process (the bare-amqtt benchmark peer, other tests)
and could not carry this broker's sink. So :class:`EdgeAmqttBroker` overrides
``_initialize_client_session`` instead: it lets amqtt parse and validate the CONNECT as usual,
then returns our handler (bound to this broker's :class:`~edge.amqtt_handler.EdgeContext`) in
place of the stock one amqtt made, which was never attached or started. Scoped to this
instance; nothing global changes. ``tests/test_edge_broker.py`` checks both halves.

Other amqtt internals overridden here, all in :class:`EdgeAmqttBroker` (amqtt is pinned
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
* ``_client_message_loop``: the same work without amqtt's four waiter tasks per connection
  (:mod:`edge.amqtt_loop`).
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
from collections.abc import Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, Final

from amqtt.adapters import BufferReader
from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket

from edge.amqtt_handler import EdgeProtocolHandler
from edge.amqtt_loop import client_message_loop
from edge.broker_state import EdgeContext, Security, SubscriptionIndex
from edge.connect_rules import connect_string_error
from edge.device_auth import (
    NOT_AUTHORIZED,
    AuthDecision,
    DeviceAuthenticator,
    peer_certificate_cn,
)
from edge.ingest import InboundPublish, IngestSink, SessionObserver
from edge.lifecycle import (
    AUTH_METHOD_KEY,
    TLS_KEY,
    TOOK_OVER_KEY,
    LifecycleListener,
)
from edge.mqtt_wire import CONNECT, DecodedPublish, MalformedPacketError, encode_packet, read_packet
from edge.revocation import PeerIdentity
from edge.session_state import LazyQueue, slim_session, slim_stream

__all__ = ["EdgeAmqttBroker", "amqtt_config"]

log = logging.getLogger("edge.broker")

_ANONYMOUS_AUTH_PLUGIN: Final = "amqtt.plugins.authentication.AnonymousAuthPlugin"
_CLOSE_TIMEOUT_S: Final = 1.0
_CONNECTION_DRAIN_TIMEOUT_S: Final = 5.0
_ACCEPT_BACKLOG: Final = 4096
"""listen() backlog of TCP listeners (the kernel caps it at net.core.somaxconn)."""


async def _close_quietly(writer: Any) -> None:
    """Close an amqtt writer adapter; abort the transport if the peer does not cooperate."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await writer.close()
    except (TimeoutError, OSError, AMQTTError):
        transport = getattr(getattr(writer, "_writer", None), "transport", None)
        if transport is not None:
            transport.abort()


class EdgeAmqttBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
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
            needs_forward=self._needs_forward,
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
        if not self._accepting or not self._connection_allowed(writer):
            await _close_quietly(writer)
            return
        task = asyncio.current_task()
        if task is not None:
            self._connection_tasks.add(task)
        stream = getattr(writer, "_writer", None)  # amqtt's StreamWriterAdapter
        if isinstance(stream, asyncio.StreamWriter):
            slim_stream(stream)
        try:
            if listener_name in self._tls_contexts and not await self._tls_handshake(
                listener_name, writer
            ):
                return
            await super()._client_connected(listener_name, reader, writer)
        finally:
            if task is not None:
                self._connection_tasks.discard(task)

    def _connection_allowed(self, writer: Any) -> bool:
        """The per-source-address connection rate limit (:mod:`edge.quotas`)."""
        quotas = self.edge.security.quotas
        if quotas is None:
            return True
        address = str((writer.get_peer_info() or ("?",))[0])
        if quotas.may_connect(address, time.monotonic()):
            return True
        quotas.connection_refused(address)
        return False

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
        reason = connect_string_error(first.body)  # what amqtt lets through
        if reason is not None:
            self.edge.stats.malformed("?", peer, f"CONNECT refused: {reason}")
            await _close_quietly(writer)
            raise MQTTError(f"{peer}: {reason}")
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

    def _client_message_loop(self, client_session: Any, handler: Any) -> Coroutine[Any, Any, None]:
        # One task per connection instead of amqtt's five (edge/amqtt_loop.py). Not async
        # itself: amqtt awaits the coroutine returned, one frame less per connection.
        if isinstance(client_session.delivered_message_queue, LazyQueue):
            return client_message_loop(self, client_session, handler)
        coroutine: Coroutine[Any, Any, None] = super()._client_message_loop(client_session, handler)
        return coroutine

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

    async def _publish_session_retained_messages(self, session: Any) -> None:
        # amqtt awaits the device's PUBACKs of these in the connection's task, which also
        # sends our acknowledgements: hand those to a helper task meanwhile (acking_aside).
        handler = self._sessions.get(session.client_id, (None, None))[1]
        if session.retained_messages.empty() or not isinstance(handler, EdgeProtocolHandler):
            await super()._publish_session_retained_messages(session)
            return
        async with handler.acking_aside():
            await super()._publish_session_retained_messages(session)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        # As above, for the retained messages a new QoS 1/2 subscription receives.
        handler = self._sessions.get(session.client_id, (None, None))[1]
        topic_filter, qos = subscription
        if (
            not qos
            or not isinstance(handler, EdgeProtocolHandler)
            or not any(self._matches(topic, topic_filter) for topic in self._retained_messages)
        ):
            await super()._publish_retained_messages_for_subscription(subscription, session)
            return
        async with handler.acking_aside():
            await super()._publish_retained_messages_for_subscription(subscription, session)

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
        quotas = self.edge.security.quotas
        client_id = str(session.client_id)
        if quotas is not None and not quotas.may_subscribe(client_id, subscription[0]):
            peer = f"{session.remote_address}:{session.remote_port}"
            quotas.subscription_refused(client_id, peer, subscription[0])
            return 0x80
        result = int(await super().add_subscription(subscription, session))
        self._index.refresh(subscription[0], self._subscriptions)
        if quotas is not None and result != 0x80:
            quotas.subscribed(client_id, subscription[0])
        return result

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        # Also reached from _del_all_subscriptions (session deleted or cleaned up).
        deleted = int(super()._del_subscription(a_filter, session))
        if deleted:
            self._index.refresh(a_filter, self._subscriptions)
            quotas = self.edge.security.quotas
            if quotas is not None:
                quotas.unsubscribed(str(session.client_id), a_filter)
        return deleted

    def _needs_forward(self, publish: DecodedPublish) -> bool:
        return self._index.matches(publish.topic) or self._retains(publish)

    def _retains(self, publish: DecodedPublish) -> bool:
        return publish.retain and not publish.topic.startswith(self._uplink_prefix)

    async def _forward(self, session: Any, publish: DecodedPublish) -> None:
        """After the sink accepted a publish: amqtt's broadcast only if a subscription matches."""
        stats = self.edge.stats
        if self._index.matches(publish.topic):
            stats.broadcast_forwarded += 1
            await self._broadcast_message(session, publish.topic, publish.payload)
        else:
            stats.broadcast_skipped += 1
        if self._retains(publish):
            await self.retain_message(session, publish.topic, publish.payload, publish.qos)


def amqtt_config(listeners: Sequence[tuple[str, str, int]], *, allow_anonymous: bool) -> Any:
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
