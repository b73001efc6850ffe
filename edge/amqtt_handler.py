"""amqtt's broker protocol handler, rebuilt around ack-after-commit (docs/edge-broker.md).

amqtt 0.12.1 starts one task per inbound PUBLISH and sends the PUBACK as soon as the message
is on an unbounded in-memory queue: no durability, no order, no bound on memory.
:class:`EdgeProtocolHandler` replaces the *inbound* half of amqtt's handler (the reader
loop; acknowledgements in :mod:`edge.amqtt_acks`) and keeps amqtt's outbound half
(``mqtt_publish`` and its PUBACK waiters, for deliveries to devices) and amqtt's broker loop
(CONNECT/CONNACK, SUBSCRIBE, takeover, wills, session bookkeeping):

* The reader cuts packets out of whole socket reads (:class:`edge.mqtt_wire.PacketSplitter`,
  bounded) and calls ``IngestSink.submit`` synchronously per PUBLISH, in socket order.
* Each QoS 1/2 publish waits on a per-connection FIFO until its sink future resolved; then
  its PUBACK/PUBREC goes out, in arrival order. A failed store closes the connection
  without acknowledging it or anything after it.
* At ``max_inflight`` un-acknowledged publishes the reader stops reading the socket (TCP
  pushes back on the device): memory per connection is bounded.
* QoS 2: persist-before-PUBREC; the ``awaiting_pubrel`` ids live on amqtt's ``Session``
  (in memory: after a crash a resent un-PUBREC'd message may be stored twice, which the
  at-least-once contract covers).

Also enforced here: a second CONNECT, reserved packet types, truncated or oversized
packets and bad PUBLISHes close the connection; the keep-alive (one check per keep-alive
period, on the broker's shared wheel, :mod:`edge.keepalive`); per-device quotas
(:mod:`edge.quotas`) and the topic ACL on publish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from amqtt.adapters import BufferReader
from amqtt.errors import AMQTTError, ProtocolHandlerError
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket

from edge.amqtt_acks import AckFlow, PendingAck
from edge.broker_state import EdgeContext, Qos2State
from edge.ingest import InboundPublish
from edge.keepalive import KeepAliveEntry
from edge.lifecycle import (
    CLEAN,
    CONNECTION_LOST,
    DENIED,
    GATEWAY_SHUTDOWN,
    INTERNAL_ERROR,
    KEEPALIVE_TIMEOUT,
    PROTOCOL_ERROR,
    REVOKED,
    TAKEN_OVER,
    TOOK_OVER_KEY,
    ConnectionEnded,
    SessionInfo,
)
from edge.mqtt_wire import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    DecodedPublish,
    MalformedPacketError,
    PacketSplitter,
    RawPacket,
    decode_packet_id,
    decode_publish,
    read_packet,
)
from edge.quotas import OVERSIZE, DeviceQuota
from edge.session_state import LazyEvent, LazyQueue, Wakeup

__all__ = ["QOS2_STATE_KEY", "EdgeProtocolHandler"]

log = logging.getLogger(__name__)

QOS2_STATE_KEY: Final = "tidegate.edge.qos2"
"""Key of :class:`Qos2State` in amqtt's ``Session.attributes``."""

_READ_CHUNK: Final = 65536
"""Bytes asked of the socket per read: under load one read holds dozens of publishes."""

_PENDING_SUBSCRIBE_LIMIT: Final = 16
"""amqtt queues SUBSCRIBE/UNSUBSCRIBE for the broker loop without limit; we bound it so a
device flooding SUBSCRIBE stalls its own reader instead of growing the queue."""


class _KeepAlive(KeepAliveEntry):
    """The reader's keep-alive state (one per connection, while it reads)."""

    __slots__ = ("expired", "handler", "idle_since", "timeout")

    def __init__(self, handler: EdgeProtocolHandler, timeout: float) -> None:
        super().__init__()
        self.handler = handler
        self.timeout = timeout
        """1.5 x the keep-alive (MQTT-3.1.2-24)."""
        self.idle_since: float | None = None
        """loop.time() since which the reader waits for a packet's first byte (None: not)."""
        self.expired = False

    def due(self) -> None:
        self.handler._check_keepalive(self)


class EdgeProtocolHandler(AckFlow, BrokerProtocolHandler):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's ``BrokerProtocolHandler`` with the inbound flow replaced (module docstring).

    Built by :class:`edge.broker.EdgeBroker`'s amqtt ``Broker`` subclass for every device
    connection; amqtt's own broker loop drives it through ``start``/``stop``,
    ``wait_disconnect``, ``get_next_pending_subscription`` and ``mqtt_publish``.
    """

    # _CLASS_DEFAULTS_WHY: CPython keeps an instance's attributes in a compact table shared
    # by all instances of the class for up to 30 names; with more, every instance gets a
    # dict of its own (~1.6 KB). amqtt's __init__ sets 18, __init__ below 11 (start adds
    # _quota when quotas are on). State that changes only when the connection ends reads
    # these class defaults until then; keep-alive state lives in _read_until_closed.
    _stopped = False
    _disconnect_seen = False
    _disconnect_result: Any = None
    _quota: DeviceQuota | None = None
    close_reason: str | None = None
    """Why the connection ended (:data:`edge.lifecycle.REASONS`); the first cause wins."""
    _close_detail = ""
    _will_due: bool | None = None
    keepalive_timeout = None
    """amqtt's write-timeout period; unused (see _start_reader)."""

    def __init__(
        self,
        plugins_manager: Any,
        session: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        edge: EdgeContext,
    ) -> None:
        super().__init__(plugins_manager, session, loop)
        self._edge = edge
        # LazyQueue: most devices never (un)subscribe (edge/session_state.py).
        self.activity = Wakeup()
        """Wakes the connection loop (edge/amqtt_loop.py): acknowledgements to send,
        (un)subscriptions, the disconnect."""
        self._pending_subscriptions: LazyQueue[Any] = LazyQueue(_PENDING_SUBSCRIBE_LIMIT)
        self._pending_unsubscriptions: LazyQueue[Any] = LazyQueue(_PENDING_SUBSCRIBE_LIMIT)
        self._pending_subscriptions.wakeup = self._pending_unsubscriptions.wakeup = self.activity
        self._acks: list[PendingAck] = []
        self._qos0_pending: set[asyncio.Future[None]] = set()
        self._inflight = 0
        # Wakeup, not asyncio.Event: one waiter each, no deque per connection.
        self._capacity = Wakeup()
        self._closing = False
        self._session_info: SessionInfo | None = None
        """Set while the device is announced (start to _retire)."""
        # Nothing more per instance (see _CLASS_DEFAULTS_WHY above).

    # -- identity -----------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        """The client id of the attached session ("" before attach)."""
        if self.session is None:
            return ""
        return str(self.session.client_id)

    @property
    def peer(self) -> str:
        """``ip:port`` of the device (``[ip]:port`` for IPv6)."""
        if self.session is None:
            return "?"
        host = str(self.session.remote_address)
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.session.remote_port}"

    @property
    def inflight(self) -> int:
        """Publishes read from this connection and not yet acknowledged (or stored, QoS 0)."""
        return self._inflight

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Announce the device, then amqtt's start (which starts the reader).

        The observer hears ``device_connected`` before any publish of the connection is
        submitted. A previous live connection with the same client id is closed first (amqtt
        only does that for clean_session=0; MQTT-3.1.4-2 requires it always).
        """
        edge = self._edge
        device_id = self.device_id
        old = edge.live.get(device_id)
        took_over = bool(self.session.attributes.get(TOOK_OVER_KEY))  # set by the broker
        if old is not None and old is not self:
            edge.stats.takeovers += 1
            took_over = True
            old.mark_taken_over()
            old._retire()
            await old.abort("session taken over by a new connection", TAKEN_OVER)
        edge.live[device_id] = self
        if not self.session.transitions.is_connected():
            # amqtt's takeover of a clean_session=0 session can let the old connection's
            # disconnect mark the shared Session disconnected after the new one connected;
            # amqtt's session monitor would then delete it under us. It is ours now.
            self.session.transitions.connect()
        info = self._session_info = SessionInfo.of_amqtt_session(
            self.session, self.peer, took_over=took_over
        )  # announced from here on: _retire reports the end
        if edge.security.quotas is not None:
            self._quota = edge.security.quotas.device(device_id, time.monotonic())
        edge.stats.sessions_started += 1
        edge.notify_connected(device_id, self.peer)
        edge.lifecycle_started(info)
        await self._start_reader()

    async def _start_reader(self) -> None:
        """amqtt's ``ProtocolHandler.start`` and ``BrokerProtocolHandler.start``, slimmer.

        The same steps (reader task, wait until it runs, resend unacknowledged deliveries,
        a fresh disconnect waiter) with :class:`LazyEvent` for the reader events, and
        without amqtt's write-timeout timer: for a broker its callback does nothing
        (``BrokerProtocolHandler.handle_write_timeout``); our keep-alive is the reader's.
        """
        if not self._is_attached():
            raise ProtocolHandlerError("Handler is not attached to a stream")
        self._reader_ready = LazyEvent()
        self._reader_stopped = LazyEvent()
        self._reader_task = asyncio.create_task(self._reader_loop())
        await self._reader_ready.wait()
        if self.session.inflight_in or self.session.inflight_out:
            # amqtt resends these and awaits the device's answers in this (the connection's)
            # task, which also sends our acknowledgements: see AckFlow.acking_aside.
            async with self.acking_aside():
                await self._retry_deliveries()
        else:
            await self._retry_deliveries()
        waiter: asyncio.Future[Any] | None = self._disconnect_waiter  # type: ignore[has-type]
        if waiter is None or waiter.done():
            self._disconnect_waiter = asyncio.get_running_loop().create_future()

    def _init_session(self, session: Any) -> None:
        # amqtt's, without two per-connection attributes: a LoggerAdapter (~0.5 KB) that only
        # attaches the client id to amqtt's debug lines (self.logger stays amqtt's module
        # logger), and keepalive_timeout (its write-timeout timer is not armed, see
        # _start_reader; the keep-alive is the reader's).
        if not session:
            raise AMQTTError("Session cannot be None")
        self.session = session

    async def stop(self) -> None:
        """Stop reading and acknowledging, close the socket, tell the observer. Idempotent.

        Pending sink futures are left alone (the sink owns them); we only drop our callbacks
        so a dead connection is not kept alive by a store that never finishes.
        """
        self._closing = True
        self._stopped = True
        # The acknowledgements are sent by the connection's task (pump_acks), which stops
        # at _closing; one write already under way completes or fails with the socket.
        for item in self._acks:
            item.future.remove_done_callback(self._wake_pump)
        self._acks.clear()
        for future in self._qos0_pending:
            future.remove_done_callback(self._qos0_stored)
        self._qos0_pending.clear()
        self._abort_if_peer_not_reading()
        await super().stop()
        self.activity.set()  # amqtt's stop resolved the disconnect waiter
        if self._edge.stopping:
            self._ended(GATEWAY_SHUTDOWN, "the gateway is shutting down")
        else:
            self._ended(CONNECTION_LOST, "the connection ended")
        self._retire()

    def _ended(self, reason: str, detail: str) -> None:
        """Record why the connection ends; the first cause recorded wins."""
        if self.close_reason is None:
            self.close_reason, self._close_detail = reason, detail

    def mark_taken_over(self) -> None:
        """A CONNECT with this client id arrived: this connection ends as taken over, and
        its will is not published (amqtt's behaviour on takeover)."""
        self._ended(TAKEN_OVER, "session taken over by a new connection")

    def will_due(self) -> bool:
        """Whether this connection's will is published. Decided once, by whoever asks
        first (the broker publishing it, or the lifecycle event reporting it), so the two
        always agree: a will exists, no DISCONNECT was received, the connection was not
        taken over, the gateway is not shutting down, and the ACL lets the device publish
        on the will's topic (a denial is counted and audited here, once)."""
        if self._will_due is None:
            edge = self._edge
            due = (
                self.session is not None
                and bool(self.session.will_flag)
                and not isinstance(self._disconnect_result, DisconnectPacket)
                and self.close_reason not in (CLEAN, TAKEN_OVER, REVOKED, GATEWAY_SHUTDOWN)
                and not edge.stopping
            )
            acl = edge.security.acl
            topic = str(self.session.will_topic) if due else ""
            if due and acl is not None and not acl.may_publish(self.device_id, topic):
                edge.stats.wills_denied += 1
                qos = int(self.session.will_qos or 0)
                edge.publish_denied(self.device_id, self.peer, topic, qos)
                due = False
            self._will_due = due
        return self._will_due

    async def abort(self, reason: str, code: str = INTERNAL_ERROR) -> None:
        """Close this connection without acknowledging anything more (amqtt's broker loop
        then stops the handler and publishes the will, as for any abnormal disconnect).
        ``code`` is the lifecycle reason (:data:`edge.lifecycle.REASONS`)."""
        if self._closing:
            return
        self._ended(code, reason)
        self._closing = True
        self._capacity.set()
        log.info("device %s (%s): closing connection: %s", self.device_id, self.peer, reason)
        await self.handle_connection_closed()

    def _retire(self) -> None:
        info = self._session_info
        if info is None:  # not announced, or retired already
            return
        self._session_info = None
        device_id = self.device_id
        if self._edge.live.get(device_id) is self:
            del self._edge.live[device_id]
        self._edge.notify_disconnected(device_id)
        self._ended(CONNECTION_LOST, "the connection ended")
        self._edge.lifecycle_ended(
            ConnectionEnded(
                device_id=device_id,
                session=info,
                reason=self.close_reason or CONNECTION_LOST,
                detail=self._close_detail,
                will_published=self.will_due(),
                disconnected_ms=time.time_ns() // 1_000_000,
            )
        )

    def _abort_if_peer_not_reading(self) -> None:
        # amqtt's close drains the write buffer first; a peer that stopped reading would
        # block that forever. Such a peer will not read the rest anyway: drop it.
        transport = self._transport()
        if transport is None or transport.is_closing():
            return
        _low, high = transport.get_write_buffer_limits()
        if transport.get_write_buffer_size() > high:
            transport.abort()

    async def handle_disconnect(self, disconnect: Any) -> None:
        # amqtt resets its disconnect waiter to None after resolving it, and start() makes a
        # new one if the reader ended before start() returned: the broker loop would then
        # wait forever. Remember the first result and hand it to wait_disconnect instead.
        if not self._disconnect_seen:
            self._disconnect_seen = True
            self._disconnect_result = disconnect
        await super().handle_disconnect(disconnect)
        self.activity.set()

    async def wait_disconnect(self) -> Any:
        if self._disconnect_seen:
            return self._disconnect_result
        return await super().wait_disconnect()

    def disconnect_due(self) -> bool:
        """Whether ``wait_disconnect`` would return at once (the connection loop's test)."""
        waiter: asyncio.Future[Any] | None = self._disconnect_waiter
        return self._disconnect_seen or waiter is None or waiter.done()

    def disconnect_result(self) -> Any:
        """What ``wait_disconnect`` returns once :meth:`disconnect_due`."""
        if self._disconnect_seen:
            return self._disconnect_result
        waiter: asyncio.Future[Any] | None = self._disconnect_waiter
        if waiter is not None and waiter.done() and not waiter.cancelled():
            return waiter.result()
        return None

    # -- reading ----------------------------------------------------------------------------

    async def _reader_loop(self) -> None:
        # Replaces ProtocolHandler._reader_loop (started by ProtocolHandler.start).
        try:
            self._reader_ready.set()
            try:
                reason = await self._read_until_closed()
                if reason == "DISCONNECT":
                    self._ended(CLEAN, "DISCONNECT received")
                elif reason != "closing":
                    self._ended(CONNECTION_LOST, reason)
            except MalformedPacketError as exc:
                self._edge.stats.malformed(self.device_id, self.peer, str(exc))
                reason = f"malformed packet: {exc}"
                # A device killed while sending ends mid-packet: lost, not misbehaving.
                lost = str(exc).startswith("connection ended")
                self._ended(CONNECTION_LOST if lost else PROTOCOL_ERROR, reason)
            except TimeoutError:
                self._edge.stats.keepalive_expired(self.device_id, self.peer)
                reason = "keep-alive expired"
                self._ended(KEEPALIVE_TIMEOUT, reason)
            except OSError as exc:
                reason = f"socket error: {exc!r}"
                self._ended(CONNECTION_LOST, reason)
            except Exception as exc:  # last resort: a bug costs one connection, not the broker
                log.exception("device %s: reader failed", self.device_id)
                reason = f"internal error: {exc!r}"
                self._ended(INTERNAL_ERROR, reason)
            log.debug("device %s (%s): reader ends: %s", self.device_id, self.peer, reason)
            self._closing = True
            await self.handle_connection_closed()
            self._reader_stopped.set()
            await self.stop()
        finally:
            self._reader_stopped.set()

    async def _read_until_closed(self) -> str:
        keep_alive = int(self.session.keep_alive)
        # MQTT-3.1.2-24: disconnect after 1.5 x keep-alive without any packet.
        first_byte_timeout = keep_alive * 1.5 if keep_alive > 0 else None
        stream = getattr(self.reader, "_reader", None)
        if not isinstance(stream, asyncio.StreamReader):  # not amqtt's TCP adapter
            return await self._read_packet_by_packet(first_byte_timeout)
        max_inflight = self._edge.max_inflight
        splitter = PacketSplitter(self._edge.max_packet_size)
        loop = asyncio.get_running_loop()
        keepalive = _KeepAlive(self, first_byte_timeout or 0.0)
        wheel = self._edge.keepalive
        if first_byte_timeout is not None:
            wheel.schedule(keepalive, loop.time() + first_byte_timeout)
        try:
            while not self._closing:
                if self._inflight >= max_inflight:
                    await self._wait_for_capacity(max_inflight)
                    continue
                packet = splitter.next_packet()
                if packet is None:
                    # Only silence between packets counts against the keep-alive (inside a
                    # packet a timeout would leave the stream mid-packet, see read_packet).
                    keepalive.idle_since = None if splitter.pending else loop.time()
                    data = await stream.read(_READ_CHUNK)
                    keepalive.idle_since = None
                    if not data:
                        if keepalive.expired:
                            raise TimeoutError("keep-alive expired")
                        if splitter.pending:
                            raise MalformedPacketError("connection ended inside a packet")
                        return "connection closed by the device"
                    splitter.feed(data)
                    continue
                if not await self._dispatch(packet):
                    return "DISCONNECT"
            return "closing"
        finally:
            wheel.cancel(keepalive)

    def _check_keepalive(self, keepalive: _KeepAlive) -> None:
        """MQTT-3.1.2-24 without a timer per read: one check per keep-alive period (on the
        broker's shared wheel, edge/keepalive.py) sees how long the reader has been waiting
        for a packet's first byte, and closes the socket (the read then ends) once that is
        1.5 x the keep-alive."""
        timeout = keepalive.timeout
        loop = asyncio.get_running_loop()
        idle_since = keepalive.idle_since
        now = loop.time()
        if idle_since is not None and now - idle_since >= timeout and not self._closing:
            keepalive.expired = True
            transport = self._transport()
            if transport is not None:
                transport.abort()
                return
        start = idle_since if idle_since is not None else now
        self._edge.keepalive.schedule(keepalive, start + timeout)

    async def _read_packet_by_packet(self, first_byte_timeout: float | None) -> str:
        max_inflight = self._edge.max_inflight
        max_size = self._edge.max_packet_size
        while not self._closing:
            if self._inflight >= max_inflight:
                await self._wait_for_capacity(max_inflight)
                continue
            packet = await read_packet(
                self.reader, max_size=max_size, first_byte_timeout=first_byte_timeout
            )
            if packet is None:
                return "connection closed by the device"
            if not await self._dispatch(packet):
                return "DISCONNECT"
        return "closing"

    async def _wait_for_capacity(self, max_inflight: int) -> None:
        # Back-pressure: stop reading (bytes stay in the kernel, at most one read's worth
        # in the splitter) until an ack frees a slot. No keep-alive timeout here: the
        # silence is ours, not the device's.
        self._edge.stats.reader_paused += 1
        while self._inflight >= max_inflight and not self._closing:
            await self._capacity.wait()

    async def _dispatch(self, packet: RawPacket) -> bool:
        """Handle one packet; False when the device said DISCONNECT."""
        kind = packet.packet_type
        if kind == PUBLISH:
            await self._on_publish(decode_publish(packet.flags, packet.body))
        elif kind == PUBACK:
            await self.handle_puback(PubackPacket.build(decode_packet_id(packet.body)))
        elif kind == PUBREC:
            await self.handle_pubrec(PubrecPacket.build(decode_packet_id(packet.body)))
        elif kind == PUBCOMP:
            await self.handle_pubcomp(PubcompPacket.build(decode_packet_id(packet.body)))
        elif kind == PUBREL:
            packet_id = decode_packet_id(packet.body)
            self._qos2_state().awaiting_pubrel.discard(packet_id)
            # MQTT 3.1.1 section 4.3.3: answer every PUBREL with PUBCOMP, also for an unknown
            # id (a PUBREL resent after a reconnect).
            await self._send_packet(PubcompPacket.build(packet_id))
        elif kind in (SUBSCRIBE, UNSUBSCRIBE):
            await self._on_subscription_change(packet)
        elif kind == PINGREQ:
            await self._send_packet(PingRespPacket.build())
        elif kind == DISCONNECT:
            await self.handle_disconnect(DisconnectPacket())
            return False
        elif kind == CONNECT:
            raise MalformedPacketError("[MQTT-3.1.0-2] second CONNECT on a connection")
        else:
            raise MalformedPacketError(f"packet type {kind} is not valid from a client")
        return True

    async def _on_subscription_change(self, packet: RawPacket) -> None:
        header = MQTTFixedHeader(packet.packet_type, packet.flags, len(packet.body))
        reader = BufferReader(packet.body)
        try:
            if packet.packet_type == SUBSCRIBE:
                decoded = await SubscribePacket.from_stream(reader, fixed_header=header)
                topics = decoded.payload.topics
                valid = bool(topics) and all(0 <= qos <= 2 and topic for topic, qos in topics)
            else:
                decoded = await UnsubscribePacket.from_stream(reader, fixed_header=header)
                valid = bool(decoded.payload.topics)
        except Exception as exc:  # amqtt's decoders raise assorted types on bad input
            raise MalformedPacketError(f"undecodable SUBSCRIBE/UNSUBSCRIBE: {exc!r}") from exc
        if not valid:
            raise MalformedPacketError("SUBSCRIBE/UNSUBSCRIBE without valid topic filters")
        if packet.packet_type == SUBSCRIBE:
            await self.handle_subscribe(decoded)
        else:
            await self.handle_unsubscribe(decoded)

    async def _on_publish(self, publish: DecodedPublish) -> None:
        # Everything up to the submit is synchronous: socket order is storage order.
        edge = self._edge
        acl = edge.security.acl
        if acl is not None and not acl.may_publish(self.device_id, publish.topic):
            await self._on_denied_publish(publish)
            return
        quota = self._quota
        if quota is not None:
            wait = quota.check(len(publish.payload), time.monotonic())
            if wait and not await self._enforce_quota(publish, wait):
                return
        if publish.qos == 0:
            future = self._submit(publish)
            if future.done():
                self._qos0_report(future)
            else:
                # Counted against the cap until stored, so a QoS 0 flood cannot outrun the
                # sink either; nothing is acknowledged for QoS 0.
                self._inflight += 1
                self._qos0_pending.add(future)
                future.add_done_callback(self._qos0_stored)
            await edge.forward(self.session, publish)
            return
        packet_id = publish.packet_id
        assert packet_id is not None  # decode_publish guarantees it for QoS 1/2
        forward = True
        if publish.qos == 1:
            future = self._submit(publish)
            kind = PUBACK
        else:
            kind = PUBREC
            state = self._qos2_state()
            pending = state.storing.get(packet_id)
            if pending is not None:
                future, forward = pending, False
            elif packet_id in state.awaiting_pubrel:
                future = asyncio.get_running_loop().create_future()
                future.set_result(None)
                forward = False
            else:
                future = self._submit(publish)
                state.track(packet_id, future)
            if not forward:
                edge.stats.qos2_duplicates += 1
        self._acks.append(PendingAck(kind, packet_id, future, publish, forward))
        self._inflight += 1
        if future.done():
            self.activity.set()
        else:
            future.add_done_callback(self._wake_pump)

    async def _on_denied_publish(self, publish: DecodedPublish) -> None:
        """ACL said no: nothing is submitted or forwarded. MQTT 3.1.1 cannot refuse a PUBLISH,
        so either acknowledge it in its turn (after the publishes before it) or disconnect."""
        edge = self._edge
        edge.publish_denied(self.device_id, self.peer, publish.topic, publish.qos)
        if edge.security.on_deny == "disconnect":
            await self.abort(f"publish to {publish.topic!r} denied", DENIED)
            return
        self._ack_discarded(publish)

    async def _enforce_quota(self, publish: DecodedPublish, wait: float) -> bool:
        """Over a quota (:mod:`edge.quotas`): True when the publish may go on after a
        throttling wait (the socket is not read meanwhile), False when it was discarded or
        the connection is closing."""
        quotas = self._edge.security.quotas
        assert quotas is not None  # self._quota comes from it
        if wait == OVERSIZE:
            quotas.oversize(self.device_id, self.peer, publish.topic, len(publish.payload))
            if quotas.settings.on_oversize == "disconnect":
                await self.abort("payload over max_payload_bytes", DENIED)
            else:
                self._ack_discarded(publish)
            return False
        if quotas.settings.policy == "disconnect":
            quotas.rate_exceeded(self.device_id, self.peer)
            await self.abort("over its rate quota", DENIED)
            return False
        quotas.throttled(self.device_id, self.peer, wait)
        await asyncio.sleep(wait)
        return not self._closing

    def _submit(self, publish: DecodedPublish) -> asyncio.Future[None]:
        inbound = InboundPublish(
            device_id=self.device_id,
            topic=publish.topic,
            qos=publish.qos,
            retain=publish.retain,
            payload=publish.payload,
            received_at=time.time(),
            packet_id=publish.packet_id,
            dup=publish.dup,
        )
        self._edge.stats.publishes_submitted += 1
        try:
            return self._edge.sink.submit(inbound)
        except Exception as exc:  # "cannot be stored": same path as a failed future
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    def _qos2_state(self) -> Qos2State:
        attributes: dict[str, Any] = self.session.attributes
        state = attributes.get(QOS2_STATE_KEY)
        if not isinstance(state, Qos2State):
            state = attributes[QOS2_STATE_KEY] = Qos2State()
        return state
