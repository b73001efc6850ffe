"""The embedded broker against real amqtt, real sockets on port 0 and real paho clients.

The sink is a fake that records submissions and lets each test decide when (and whether)
the "commit" happens. Where a test must show that something did NOT happen, it uses a
barrier that proves the broker already went past the point where it would have happened
(a SUBACK or PINGRESP read on the same connection, or the reader observed paused); only
the in-flight cap test adds a short observation window on top of such a barrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import amqtt.broker
import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from paho.mqtt.enums import CallbackAPIVersion

from edge.amqtt_handler import EdgeProtocolHandler
from edge.broker import EdgeBroker, EdgeBrokerError
from edge.ingest import InboundPublish
from edge.mqtt_wire import (
    CONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    MalformedPacketError,
    PacketSplitter,
    RawPacket,
    decode_packet_id,
    decode_publish,
    encode_acks,
    encode_packet,
    read_packet,
)
from edge.passwords import hash_password, write_entries
from tests.harness import eventually as wait_until

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
CONNACK = 0x2
PINGRESP = 0xD


# -- helpers ------------------------------------------------------------------------------


async def eventually(predicate: Callable[[], object], what: str, deadline_s: float = 10.0) -> None:
    """Wait until ``predicate()`` is truthy, within ``deadline_s`` seconds."""
    await wait_until(predicate, what, deadline_s, interval=0.005)


async def holds_for(predicate: Callable[[], object], what: str, window: float) -> None:
    """Assert ``predicate()`` stays truthy for ``window`` seconds (negative checks only):
    wait for it to turn false, with the window as the deadline."""
    try:
        await wait_until(lambda: not predicate(), what, window, interval=0.01)
    except AssertionError:
        return  # the window passed with the predicate true throughout
    raise AssertionError(f"no longer true within {window}s: {what}")


class FakeSink:
    """Records submissions. ``hold=True`` keeps futures pending until :meth:`release`."""

    def __init__(self, *, hold: bool = False) -> None:
        self.hold = hold
        self.received: list[InboundPublish] = []
        self.futures: list[asyncio.Future[None]] = []
        self.fail_topics: set[str] = set()
        self.raise_topics: set[str] = set()

    def submit(self, publish: InboundPublish) -> asyncio.Future[None]:
        if publish.topic in self.raise_topics:
            raise RuntimeError("sink refused synchronously")
        loop = asyncio.get_running_loop()
        self.received.append(publish)
        future: asyncio.Future[None] = loop.create_future()
        self.futures.append(future)
        if publish.topic in self.fail_topics:
            future.set_exception(OSError("disk full"))
        elif not self.hold:
            loop.call_soon(_resolve, future)  # "commits" on the next loop turn, like a group
        return future

    def release(self, count: int | None = None) -> int:
        """Resolve up to ``count`` pending futures, oldest first; returns how many."""
        released = 0
        for future in self.futures:
            if count is not None and released >= count:
                break
            if not future.done():
                future.set_result(None)
                released += 1
        return released

    def pending(self) -> int:
        return sum(not f.done() for f in self.futures)

    def payloads(self) -> list[bytes]:
        return [p.payload for p in self.received]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def device_connected(self, device_id: str, peer: str) -> None:
        self.events.append(("connected", device_id, peer))

    def device_disconnected(self, device_id: str) -> None:
        self.events.append(("disconnected", device_id))


class Device:
    """A paho 2.x client running its network loop in its own thread."""

    def __init__(self, client_id: str, *, max_inflight: int = 20) -> None:
        self.client_id = client_id
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id
        )
        self.client.max_inflight_messages_set(max_inflight)
        self.acked: list[int] = []
        self.messages: list[mqtt.MQTTMessage] = []
        self.subacks: list[int] = []
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.on_publish = lambda _c, _u, mid, *_a: self.acked.append(mid)
        self.client.on_message = lambda _c, _u, message: self.messages.append(message)
        self.client.on_subscribe = lambda _c, _u, mid, *_a: self.subacks.append(mid)

    async def connect(self, port: int) -> Device:
        await asyncio.to_thread(self.client.connect, HOST, port, 60)
        self.client.loop_start()
        await eventually(self.connected.is_set, f"{self.client_id} CONNACK")
        return self

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        return int(info.mid)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        _rc, mid = self.client.subscribe(topic, qos)
        await eventually(lambda: mid in self.subacks, f"SUBACK for {topic}")

    async def unsubscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_unsubscribe = lambda *_a: done.set()
        self.client.unsubscribe(topic)
        await eventually(done.is_set, f"UNSUBACK for {topic}")

    def local_port(self) -> int:
        sock: Any = self.client.socket()
        assert sock is not None
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


class _ExactReader:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        return await self._reader.readexactly(n)


def _string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(
    client_id: str,
    *,
    keepalive: int = 60,
    clean: bool = True,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _string(client_id)
    if username is not None:
        body += _string(username)
    if password is not None:
        body += _string(password)
    return encode_packet(RawPacket(CONNECT, 0, body))


def publish_packet(
    topic: str, payload: bytes, *, qos: int, packet_id: int = 0, dup: bool = False
) -> bytes:
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return encode_packet(RawPacket(PUBLISH, (0x08 if dup else 0) | (qos << 1), body))


def ack_packet(kind: int, packet_id: int) -> bytes:
    return encode_packet(
        RawPacket(kind, 0x02 if kind == PUBREL else 0, struct.pack("!H", packet_id))
    )


class RawClient:
    """A hand-driven MQTT client for flows paho does not expose (PUBREC, DUP, garbage)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    @classmethod
    async def connect(cls, port: int, client_id: str, **options: Any) -> RawClient:
        client = await cls.open(port)
        await client.send(connect_packet(client_id, **options))
        connack = await client.read()
        assert connack is not None
        assert connack.packet_type == CONNACK
        assert connack.body[1] == 0, f"CONNACK refused with {connack.body[1]}"
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, deadline_s: float = 10.0) -> RawPacket | None:
        """The next packet, or None when the broker closed the connection."""
        async with asyncio.timeout(deadline_s):
            try:
                return await read_packet(
                    _ExactReader(self.reader), max_size=1 << 20, first_byte_timeout=None
                )
            except (MalformedPacketError, ConnectionError):
                return None

    async def ping(self) -> None:
        """Round trip through the broker's reader (a barrier); fails on any other packet."""
        await self.send(encode_packet(RawPacket(PINGREQ, 0, b"")))
        packet = await self.read()
        assert packet is not None
        assert packet.packet_type == PINGRESP, f"expected PINGRESP, got {packet}"

    async def expect(self, kind: int, packet_id: int) -> None:
        packet = await self.read()
        assert packet is not None, f"connection closed, expected packet type {kind}"
        assert (packet.packet_type, packet.body) == (kind, struct.pack("!H", packet_id))

    async def expect_closed(self) -> None:
        packet = await self.read()
        assert packet is None, f"expected the broker to close the connection, got {packet}"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class Harness:
    """Builds brokers and clients for one test and cleans them all up."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.brokers: list[EdgeBroker] = []
        self.devices: list[Device] = []
        self.raw: list[RawClient] = []

    async def broker(
        self,
        sink: FakeSink | None = None,
        *,
        observer: RecordingObserver | None = None,
        cap: int = 64,
        **options: Any,
    ) -> EdgeBroker:
        broker = EdgeBroker(
            listeners=[("default", HOST, 0)],
            sink=sink or FakeSink(),
            observer=observer,
            max_inflight_per_session=cap,
            **options,
        )
        self.brokers.append(broker)
        await broker.start()
        return broker

    async def device(self, broker: EdgeBroker, suffix: str, **options: Any) -> Device:
        device = Device(f"{self.name}-{suffix}", **options)
        self.devices.append(device)
        return await device.connect(port_of(broker))

    async def raw_client(self, broker: EdgeBroker, suffix: str | None, **options: Any) -> RawClient:
        port = port_of(broker)
        if suffix is None:
            client = await RawClient.open(port)
        else:
            client = await RawClient.connect(port, f"{self.name}-{suffix}", **options)
        self.raw.append(client)
        return client

    async def close(self) -> None:
        for device in self.devices:
            await device.close()
        for client in self.raw:
            await client.close()
        for broker in self.brokers:
            await broker.stop()


def port_of(broker: EdgeBroker) -> int:
    return broker.bound_addresses["default"][1]


@pytest.fixture
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h = Harness(request.node.name.replace("[", "-").replace("]", ""))
    try:
        yield h
    finally:
        await h.close()


def live_handler(broker: EdgeBroker, client_id: str) -> Any:
    return broker.amqtt_broker.sessions[client_id][1]


def seqs(payloads: Iterable[bytes]) -> list[int]:
    return [int(p) for p in payloads]


# -- lifecycle ----------------------------------------------------------------------------


async def test_start_stop_idempotent_and_port_zero_bound(harness: Harness) -> None:
    broker = EdgeBroker(
        listeners=[("default", HOST, 0), ("second", HOST, 0)],
        sink=FakeSink(),
        observer=None,
        max_inflight_per_session=8,
    )
    harness.brokers.append(broker)
    assert broker.bound_addresses == {}
    async with broker:
        await broker.start()  # no-op
        bound = broker.bound_addresses
        assert set(bound) == {"default", "second"}
        assert all(host == HOST and port > 0 for host, port in bound.values())
        assert bound["default"][1] != bound["second"][1]
        device = await harness.device(broker, "d")
        device.publish("d/x/up/t", b"1", 1)
        await eventually(lambda: device.acked, "PUBACK")
    assert broker.bound_addresses == {}
    await broker.stop()  # no-op
    await broker.start()  # restartable
    assert port_of(broker) > 0


async def test_start_failure_is_translated_and_leaves_nothing_bound(harness: Harness) -> None:
    first = await harness.broker()
    taken = port_of(first)
    broker = EdgeBroker(
        listeners=[("free", HOST, 0), ("taken", HOST, taken)],
        sink=FakeSink(),
        observer=None,
        max_inflight_per_session=8,
    )
    # SO_REUSEADDR (amqtt sets it) does not allow two listeners on one port on Linux.
    with pytest.raises(EdgeBrokerError):
        await broker.start()
    assert not broker.running


def test_constructor_rejects_bad_values() -> None:
    sink = FakeSink()
    with pytest.raises(ValueError, match="unique"):
        EdgeBroker(
            listeners=[("a", HOST, 0), ("a", HOST, 0)],
            sink=sink,
            observer=None,
            max_inflight_per_session=1,
        )
    with pytest.raises(ValueError, match="max_inflight"):
        EdgeBroker(listeners=[("a", HOST, 0)], sink=sink, observer=None, max_inflight_per_session=0)


# -- the handler really is ours, and only ours ---------------------------------------------


async def test_edge_handler_is_used_and_stock_amqtt_is_untouched(harness: Harness) -> None:
    broker = await harness.broker()
    device = await harness.device(broker, "dev")
    assert type(live_handler(broker, device.client_id)) is EdgeProtocolHandler
    # No global rebinding: a plain amqtt broker in the same process keeps the stock handler.
    assert amqtt.broker.BrokerProtocolHandler is BrokerProtocolHandler
    plain = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:0"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {}},
        }
    )
    await plain.start()
    try:
        port = plain._servers["default"].instance.sockets[0].getsockname()[1]
        other = Device(f"{harness.name}-plain")
        harness.devices.append(other)
        await other.connect(port)
        assert type(plain.sessions[other.client_id][1]) is BrokerProtocolHandler
        other.publish("d/x/up/t", b"1", 1)
        await eventually(lambda: other.acked, "stock PUBACK")
        await other.close()
    finally:
        await plain.shutdown()


# -- ack after commit -----------------------------------------------------------------------


async def test_puback_waits_for_the_sink_future(harness: Harness) -> None:
    sink = FakeSink(hold=True)
    broker = await harness.broker(sink)
    device = await harness.device(broker, "dev")
    mid = device.publish("d/dev/up/telemetry", b"reading", 1)
    await eventually(lambda: sink.received, "submission")
    # Barrier: the SUBACK is sent after the broker read the SUBSCRIBE that followed the
    # PUBLISH, and paho handles packets in order, so a PUBACK sent before it would show.
    await device.subscribe(f"{harness.name}/barrier")
    assert device.acked == []
    assert sink.pending() == 1
    sink.release()
    await eventually(lambda: device.acked == [mid], "PUBACK after the commit")
    submitted = sink.received[0]
    assert (submitted.device_id, submitted.topic, submitted.qos, submitted.payload) == (
        device.client_id,
        "d/dev/up/telemetry",
        1,
        b"reading",
    )
    assert broker.stats.acks_sent == 1


async def test_500_qos1_publishes_reach_the_sink_in_order(harness: Harness) -> None:
    sink = FakeSink()
    broker = await harness.broker(sink, cap=64)
    device = await harness.device(broker, "dev", max_inflight=1000)
    mids = [device.publish("d/dev/up/telemetry", str(i).encode(), 1) for i in range(500)]
    await eventually(lambda: len(device.acked) == 500, "500 PUBACKs", deadline_s=30)
    assert seqs(sink.payloads()) == list(range(500))
    assert sorted(device.acked) == sorted(mids)
    assert device.acked == mids  # acknowledgements leave in arrival order


async def test_inflight_cap_stops_reading_until_acks_go_out(harness: Harness) -> None:
    cap = 4
    sink = FakeSink(hold=True)
    broker = await harness.broker(sink, cap=cap)
    device = await harness.device(broker, "dev", max_inflight=100)
    mids = [device.publish("d/dev/up/telemetry", str(i).encode(), 1) for i in range(3 * cap)]
    handler = live_handler(broker, device.client_id)
    await eventually(lambda: broker.stats.reader_paused >= 1, "reader paused at the cap")
    assert len(sink.received) == cap
    assert handler.inflight == cap
    # The reader is parked; give the socket a moment to prove nothing more is read.
    await holds_for(lambda: len(sink.received) == cap, "no read past the cap", window=0.3)
    assert device.acked == []

    sink.release(1)  # one commit -> one PUBACK -> one slot -> one more publish read
    await eventually(lambda: len(sink.received) == cap + 1, "one more submission")
    await eventually(lambda: device.acked == mids[:1], "first PUBACK")
    assert len(sink.received) == cap + 1

    sink.hold = False  # from now on every store "commits" at once
    sink.release()
    await eventually(lambda: len(device.acked) == len(mids), "every PUBACK")
    assert seqs(sink.payloads()) == list(range(3 * cap))
    assert device.acked == mids
    assert max(0, handler.inflight) == 0


async def test_qos0_is_submitted_without_ack_and_qos2_completes(harness: Harness) -> None:
    sink = FakeSink()
    broker = await harness.broker(sink)
    device = await harness.device(broker, "dev")
    device.publish("d/dev/up/telemetry", b"zero", 0)
    mid = device.publish("d/dev/up/event", b"two", 2)
    await eventually(lambda: mid in device.acked, "PUBCOMP for the QoS 2 publish")
    assert [(p.qos, p.payload) for p in sink.received] == [(0, b"zero"), (2, b"two")]
    assert broker.stats.acks_sent == 1  # one PUBREC; QoS 0 is never acknowledged


async def test_qos2_persists_before_pubrec_and_suppresses_duplicates(harness: Harness) -> None:
    sink = FakeSink(hold=True)
    broker = await harness.broker(sink)
    client = await harness.raw_client(broker, "dev")
    topic = "d/dev/up/event"
    await client.send(publish_packet(topic, b"x", qos=2, packet_id=7))
    await eventually(lambda: sink.received, "submission")
    await client.send(publish_packet(topic, b"x", qos=2, packet_id=7, dup=True))
    await client.ping()  # the broker has read both PUBLISHes: no PUBREC while not stored
    assert len(sink.received) == 1

    sink.release()
    await client.expect(PUBREC, 7)  # for the original
    await client.expect(PUBREC, 7)  # for the resend, which was not stored again
    await client.send(publish_packet(topic, b"x", qos=2, packet_id=7, dup=True))
    await client.expect(PUBREC, 7)  # stored, awaiting PUBREL: still a duplicate
    await client.send(ack_packet(PUBREL, 7))
    await client.expect(PUBCOMP, 7)
    assert sink.payloads() == [b"x"]

    # After PUBCOMP the id is free: the same id is a new message.
    await client.send(publish_packet(topic, b"y", qos=2, packet_id=7))
    await eventually(lambda: len(sink.received) == 2, "second submission")
    sink.release()
    await client.expect(PUBREC, 7)
    assert sink.payloads() == [b"x", b"y"]
    assert broker.stats.qos2_duplicates == 2


# -- broadcast bypass ------------------------------------------------------------------------


async def test_uplink_reaches_subscribers_only_when_one_matches(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = FakeSink()
    broker = await harness.broker(sink)
    amqtt_broker = broker.amqtt_broker
    broadcasts: list[str | None] = []
    original = amqtt_broker._broadcast_message

    async def spy(session: Any, topic: str | None, data: Any, force_qos: Any = None) -> None:
        broadcasts.append(topic)
        await original(session, topic, data, force_qos)

    monkeypatch.setattr(amqtt_broker, "_broadcast_message", spy)
    device = await harness.device(broker, "dev")

    first = device.publish("d/dev/up/telemetry", b"1", 1)
    await eventually(lambda: first in device.acked, "PUBACK")
    assert broadcasts == []
    assert broker.stats.broadcast_skipped == 1

    app = await harness.device(broker, "app")
    await app.subscribe("d/+/up/#")
    second = device.publish("d/dev/up/telemetry", b"2", 1)
    await eventually(lambda: app.messages, "delivery to the subscriber")
    assert second in device.acked  # delivered only after it was stored and acknowledged
    assert [(m.topic, m.payload) for m in app.messages] == [("d/dev/up/telemetry", b"2")]
    assert broadcasts == ["d/dev/up/telemetry"]
    assert broker.stats.broadcast_forwarded == 1

    await app.unsubscribe("d/+/up/#")
    third = device.publish("d/dev/up/telemetry", b"3", 1)
    await eventually(lambda: third in device.acked, "PUBACK")
    assert broadcasts == ["d/dev/up/telemetry"]
    assert seqs(sink.payloads()) == [1, 2, 3]


async def test_stored_publishes_are_acknowledged_from_the_commit_in_order(
    harness: Harness,
) -> None:
    """The PUBACKs of stored heads go out from the sink future's callback (no wake-up of
    the connection's task), in arrival order; a later store finishing first waits for the
    earlier one, and a publish a subscriber wants takes the task's path (edge/amqtt_acks.py)."""
    sink = FakeSink(hold=True)
    broker = await harness.broker(sink)
    device = await harness.device(broker, "dev")
    ids = [device.publish("d/dev/up/telemetry", f"{i}".encode(), 1) for i in range(1, 6)]
    await eventually(lambda: len(sink.futures) == 5, "five publishes submitted")
    sink.release(3)
    await eventually(lambda: len(device.acked) == 3, "three PUBACKs")
    handled = asyncio.Event()  # callbacks run in the order they were added: ours after
    sink.futures[4].add_done_callback(lambda _future: handled.set())
    sink.futures[4].set_result(None)  # the fifth is stored before the fourth ...
    await asyncio.wait_for(handled.wait(), 5)
    assert broker.stats.acks_sent == 3  # ... but its PUBACK waits for the fourth's
    sink.futures[3].set_result(None)
    await eventually(lambda: len(device.acked) == 5, "five PUBACKs")
    assert device.acked == ids
    assert broker.stats.acks_sent_at_once == 5
    assert broker.stats.broadcast_skipped == 5

    app = await harness.device(broker, "app")
    await app.subscribe("d/+/up/#")
    wanted = device.publish("d/dev/up/telemetry", b"6", 1)
    await eventually(lambda: len(sink.futures) == 6, "the sixth publish submitted")
    sink.release()
    await eventually(lambda: app.messages, "delivery to the subscriber")
    await eventually(lambda: wanted in device.acked, "its PUBACK")
    assert broker.stats.acks_sent_at_once == 5  # acknowledged by the task, which forwards
    assert broker.stats.acks_sent == 6


async def test_a_failed_store_is_never_acknowledged_from_the_callback(harness: Harness) -> None:
    sink = FakeSink(hold=True)
    broker = await harness.broker(sink)
    device = await harness.device(broker, "dev")
    first = device.publish("d/dev/up/telemetry", b"1", 1)
    device.publish("d/dev/up/telemetry", b"2", 1)
    await eventually(lambda: len(sink.futures) == 2, "two publishes submitted")
    sink.futures[0].set_result(None)
    sink.futures[1].set_exception(OSError("disk full"))
    await eventually(lambda: broker.stats.sink_failures == 1, "the failure handled")
    await eventually(device.disconnected.is_set, "the connection dropped")
    assert device.acked == [first]


async def test_non_uplink_topics_keep_broker_behaviour_and_reach_the_sink(harness: Harness) -> None:
    sink = FakeSink()
    broker = await harness.broker(sink)
    app = await harness.device(broker, "app")
    await app.subscribe("site/#")
    device = await harness.device(broker, "dev")
    device.publish("site/alarm", b"smoke", 1, retain=True)
    device.publish("d/dev/up/event", b"up", 1, retain=True)
    await eventually(lambda: app.messages, "delivery on a non-uplink topic")
    await eventually(lambda: len(device.acked) == 2, "PUBACKs")
    assert [(p.topic, p.payload) for p in sink.received] == [
        ("site/alarm", b"smoke"),
        ("d/dev/up/event", b"up"),
    ]
    retained = broker.amqtt_broker.retained_messages
    assert "site/alarm" in retained
    assert "d/dev/up/event" not in retained  # the buffer, not the broker, keeps uplinks
    late = await harness.device(broker, "late")
    await late.subscribe("site/alarm")
    await eventually(lambda: late.messages, "retained message for a late subscriber")
    assert late.messages[0].payload == b"smoke"


# -- observer ---------------------------------------------------------------------------------


async def test_observer_sees_connect_disconnect_and_takeover(harness: Harness) -> None:
    observer = RecordingObserver()
    broker = await harness.broker(observer=observer)
    device = await harness.device(broker, "paho")
    peer = f"{HOST}:{device.local_port()}"
    await eventually(lambda: observer.events, "connected")
    assert observer.events == [("connected", device.client_id, peer)]
    await device.close()
    await eventually(lambda: len(observer.events) == 2, "clean disconnect")
    assert observer.events[1] == ("disconnected", device.client_id)

    observer.events.clear()
    first = await harness.raw_client(broker, "raw", clean=False)
    second = await harness.raw_client(broker, "raw", clean=True)
    await first.expect_closed()  # taken over (MQTT-3.1.4-2), whatever clean_session says
    device_id = f"{harness.name}-raw"
    assert [e[:2] for e in observer.events] == [
        ("connected", device_id),
        ("disconnected", device_id),
        ("connected", device_id),
    ]
    await second.close()  # abrupt: no DISCONNECT packet
    await eventually(lambda: len(observer.events) == 4, "abrupt disconnect")
    assert observer.events[3] == ("disconnected", device_id)
    assert broker.stats.takeovers == 1


async def test_refused_authentication_is_not_a_session(harness: Harness, tmp_path: Path) -> None:
    observer = RecordingObserver()
    named_id = f"{harness.name}-named"
    password_file = tmp_path / "passwords"
    write_entries(password_file, {named_id: hash_password("correct horse")})
    broker = await harness.broker(
        observer=observer, allow_anonymous=False, password_file=password_file
    )
    client = await harness.raw_client(broker, None)
    await client.send(connect_packet(f"{harness.name}-anon"))
    connack = await client.read()
    assert connack is not None
    assert (connack.packet_type, connack.body[1]) == (CONNACK, 5)  # not authorized
    await client.expect_closed()
    named = await harness.raw_client(broker, "named", username=named_id, password="correct horse")
    await named.ping()
    assert observer.events == [("connected", f"{harness.name}-named", observer.events[0][2])]
    await eventually(
        lambda: (
            f"{harness.name}-anon" not in broker.amqtt_broker.sessions
            or not broker.amqtt_broker.sessions[f"{harness.name}-anon"][
                0
            ].transitions.is_connected()
        ),
        "refused session marked disconnected",
    )


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["future-fails", "submit-raises"])
async def test_sink_failure_closes_without_ack_and_broker_keeps_serving(
    harness: Harness, mode: str
) -> None:
    sink = FakeSink()
    bad_topic = "d/bad/up/event"
    (sink.fail_topics if mode == "future-fails" else sink.raise_topics).add(bad_topic)
    broker = await harness.broker(sink)
    bad = await harness.raw_client(broker, "bad")
    await bad.send(publish_packet(bad_topic, b"x", qos=1, packet_id=1))
    await bad.expect_closed()  # no PUBACK first
    assert broker.stats.sink_failures == 1
    good = await harness.device(broker, "good")
    mid = good.publish("d/good/up/event", b"ok", 1)
    await eventually(lambda: mid in good.acked, "PUBACK for another device")


GARBAGE = {
    "before-connect": b"\xff\xfe\xfd garbage \x00\x01",
    "not-connect-first": publish_packet("d/x/up/t", b"x", qos=0),
    "oversized-header": b"\x10\xff\xff\xff\x7f",
    "bad-length-varint": b"\x10\xff\xff\xff\xff\xff",
}
GARBAGE_AFTER_CONNECT = {
    "reserved-type": b"\x00\x00",
    "qos3-publish": b"\x36\x05\x00\x01a\x00\x01",
    "wildcard-topic": publish_packet("d/+/up", b"x", qos=0),
    "truncated-topic": b"\x30\x03\x00\x09a",
    "second-connect": connect_packet("again"),
    "bad-subscribe": b"\x82\x02\x00\x01",
}


@pytest.mark.parametrize(
    "case", sorted(GARBAGE) + [f"after:{k}" for k in sorted(GARBAGE_AFTER_CONNECT)]
)
async def test_malformed_input_closes_that_connection_only(harness: Harness, case: str) -> None:
    sink = FakeSink()
    broker = await harness.broker(sink)
    good = await harness.device(broker, "good")
    if case.startswith("after:"):
        bad = await harness.raw_client(broker, "bad")
        await bad.send(GARBAGE_AFTER_CONNECT[case.removeprefix("after:")])
    else:
        bad = await harness.raw_client(broker, None)
        await bad.send(GARBAGE[case])
    await bad.expect_closed()
    assert sink.received == []
    mid = good.publish("d/good/up/event", b"ok", 1)
    await eventually(lambda: mid in good.acked, "the broker still serves other devices")


async def test_silent_connections_are_closed(harness: Harness) -> None:
    broker = await harness.broker(connect_timeout=0.5)
    no_connect = await harness.raw_client(broker, None)
    idle = await harness.raw_client(broker, "idle", keepalive=1)
    await no_connect.expect_closed()
    await idle.expect_closed()  # 1.5 x keep-alive
    assert broker.stats.keepalive_timeouts == 1


async def test_stop_with_pending_store_sends_no_ack(harness: Harness) -> None:
    observer = RecordingObserver()
    sink = FakeSink(hold=True)
    broker = await harness.broker(sink, observer=observer)
    client = await harness.raw_client(broker, "dev")
    await client.send(publish_packet("d/dev/up/event", b"x", qos=1, packet_id=3))
    await eventually(lambda: sink.received, "submission")
    await broker.stop()
    await client.expect_closed()
    assert observer.events[-1] == ("disconnected", f"{harness.name}-dev")
    sink.release()  # a late commit after stop must not break anything
    assert not sink.futures[0].cancelled()  # the broker never cancels the sink's futures


# -- wire decoding (pure) -----------------------------------------------------------------------


def test_decode_publish_accepts_valid_packets() -> None:
    raw = publish_packet("d/a/up/t", b"\x00\x01payload", qos=1, packet_id=513)
    packet = RawPacket(PUBLISH, raw[0] & 0x0F, raw[2:])
    decoded = decode_publish(packet.flags, packet.body)
    assert (decoded.topic, decoded.qos, decoded.packet_id, decoded.payload) == (
        "d/a/up/t",
        1,
        513,
        b"\x00\x01payload",
    )
    assert decode_publish(0x01, _string("t")).retain


@pytest.mark.parametrize(
    ("flags", "body"),
    [
        (0x06, _string("t") + b"\x00\x01"),  # QoS 3
        (0x08, _string("t")),  # DUP on QoS 0
        (0x00, b"\x00"),  # no topic length
        (0x00, b"\x00\x05ab"),  # topic longer than the packet
        (0x00, b"\x00\x02\xff\xfe"),  # not UTF-8
        (0x00, _string("")),
        (0x00, _string("a/#")),
        (0x00, _string("$SYS/x")),
        (0x02, _string("t") + b"\x00"),  # truncated packet id
        (0x02, _string("t") + b"\x00\x00"),  # packet id 0
    ],
)
def test_decode_publish_rejects_malformed(flags: int, body: bytes) -> None:
    with pytest.raises(MalformedPacketError):
        decode_publish(flags, body)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 300_000])
async def test_read_packet_round_trips_remaining_length(size: int) -> None:
    reader = asyncio.StreamReader()
    body = bytes(size)
    reader.feed_data(encode_packet(RawPacket(PUBACK, 0, body)))
    reader.feed_eof()
    packet = await read_packet(_ExactReader(reader), max_size=1 << 20, first_byte_timeout=None)
    assert packet == RawPacket(PUBACK, 0, body)
    assert await read_packet(_ExactReader(reader), max_size=1, first_byte_timeout=None) is None


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 1 << 20])
def test_packet_splitter_yields_the_same_packets_whatever_the_read_sizes(piece: int) -> None:
    packets = [
        RawPacket(PUBLISH, 2, bytes([i % 251]) * size)
        for i, size in enumerate([0, 1, 126, 127, 128, 16_383, 16_384, 70_000, 5])
    ]
    stream = b"".join(encode_packet(p) for p in packets)
    splitter = PacketSplitter(1 << 20)
    out: list[RawPacket] = []
    for start in range(0, len(stream), piece):
        splitter.feed(stream[start : start + piece])
        while (packet := splitter.next_packet()) is not None:
            out.append(packet)
    assert out == packets
    assert splitter.pending == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
        (b"\x30\xff\xff\xff\x7f", "exceeds"),  # 256 MiB announced: refused before buffering
        (encode_packet(RawPacket(PUBLISH, 0, bytes(1025))), "exceeds"),
    ],
)
def test_packet_splitter_refuses_bad_lengths_before_buffering_the_body(
    data: bytes, reason: str
) -> None:
    splitter = PacketSplitter(1024)
    splitter.feed(data[:6])
    with pytest.raises(MalformedPacketError, match=reason):
        splitter.next_packet()


def test_encode_acks_is_one_buffer_of_two_byte_acknowledgements() -> None:
    wire = encode_acks([(PUBACK, 1), (PUBREC, 0x1234), (PUBCOMP, 65535)])
    splitter = PacketSplitter(16)
    splitter.feed(wire)
    got = [splitter.next_packet() for _ in range(3)]
    assert [(p.packet_type, decode_packet_id(p.body)) for p in got if p] == [
        (PUBACK, 1),
        (PUBREC, 0x1234),
        (PUBCOMP, 65535),
    ]
    assert splitter.next_packet() is None


@pytest.mark.parametrize(("clean_first", "clean_second"), [(False, False), (True, True)])
async def test_taken_over_session_stays_with_the_new_connection(
    harness: Harness, clean_first: bool, clean_second: bool
) -> None:
    observer = RecordingObserver()
    broker = await harness.broker(observer=observer)
    first = await harness.raw_client(broker, "dev", clean=clean_first)
    second = await harness.raw_client(broker, "dev", clean=clean_second)
    await first.expect_closed()
    amqtt_broker = broker.amqtt_broker
    await eventually(
        lambda: len(amqtt_broker._connection_tasks) == 1, "the old connection fully handled"
    )
    # amqtt's session monitor deletes (and stops) sessions it finds disconnected: the
    # session must still say connected and belong to the new connection.
    device_id = f"{harness.name}-dev"
    session, handler = amqtt_broker.sessions[device_id]
    assert session.transitions.is_connected()
    assert type(handler) is EdgeProtocolHandler
    assert not handler._stopped
    await second.ping()
    await second.send(publish_packet("d/dev/up/event", b"x", qos=1, packet_id=1))
    await second.expect(PUBACK, 1)
    assert [e[:2] for e in observer.events] == [
        ("connected", device_id),
        ("disconnected", device_id),
        ("connected", device_id),
    ]
