"""Memory per connection: the slim primitives (pure unit tests) and, against a real
in-process broker on real sockets, that an idle connected device costs two tasks (the
connection's own, which also sends the acknowledgements, and its reader) and that the
one-task connection loop still serves SUBSCRIBE, UNSUBSCRIBE, deliveries and DISCONNECT
(bench/conn_memory.py measures the bytes; docs/benchmarks.md "10,000 devices")."""

from __future__ import annotations

import asyncio
import struct
import sys

import pytest

from edge.broker import EdgeBroker
from edge.ingest import InboundPublish
from edge.session_state import LazyEvent, LazyQueue, Wakeup
from tests.harness import eventually

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
TASKS_PER_CONNECTION = 2


class InstantSink:
    def __init__(self) -> None:
        self.received: list[InboundPublish] = []

    def submit(self, publish: InboundPublish) -> asyncio.Future[None]:
        self.received.append(publish)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def _string(text: str) -> bytes:
    return struct.pack("!H", len(text)) + text.encode()


def _packet(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([first, len(body)]) + body


def _connect(client_id: str) -> bytes:
    body = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _string(client_id)
    return _packet(0x10, body)


def _publish(topic: str, packet_id: int, payload: bytes) -> bytes:
    return _packet(0x32, _string(topic) + struct.pack("!H", packet_id) + payload)


async def test_wakeup_wakes_its_one_waiter_and_forgets_unheard_sets() -> None:
    wakeup = Wakeup()
    wakeup.set()  # nobody waits: nothing is remembered
    waiter = wakeup.wait()  # a plain future, registered at once
    assert not waiter.done()
    with pytest.raises(RuntimeError, match="already has a waiter"):
        await wakeup.wait()
    wakeup.set()
    async with asyncio.timeout(1):
        await waiter
    cancelled = wakeup.wait()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    again = wakeup.wait()  # a cancelled waiter leaves no trace
    wakeup.set()
    async with asyncio.timeout(1):
        await again


async def test_lazy_event_builds_its_deque_only_while_waited_on() -> None:
    event = LazyEvent()
    assert "_waiters" not in event.__dict__
    event.set()
    assert event.is_set()
    assert "_waiters" not in event.__dict__
    async with asyncio.timeout(1):
        assert await event.wait()
    event.clear()
    waiters = [asyncio.ensure_future(event.wait()) for _ in range(2)]
    await eventually(lambda: len(event.__dict__.get("_waiters", ())) == 2, "two waiters", 5)
    event.set()
    async with asyncio.timeout(1):
        assert await asyncio.gather(*waiters) == [True, True]
    assert "_waiters" not in event.__dict__


async def test_lazy_queue_answers_size_without_building_and_wakes_on_put() -> None:
    queue: LazyQueue[int] = LazyQueue(1)
    assert queue.empty()
    assert queue.qsize() == 0
    assert not queue.full()
    assert not {"_queue", "_getters", "_putters", "_finished"} & set(queue.__dict__)
    wakeup = queue.wakeup = Wakeup()
    waiter = wakeup.wait()
    putter = asyncio.ensure_future(queue.put(7))  # asyncio.Queue.put ends in put_nowait
    async with asyncio.timeout(1):
        await waiter
        await putter
    assert queue.full()
    assert queue.get_nowait() == 7
    assert queue.empty()


async def test_idle_connections_cost_two_tasks_and_the_loop_still_serves_them() -> None:
    sink = InstantSink()
    broker = EdgeBroker(
        listeners=[("default", HOST, 0)], sink=sink, observer=None, max_inflight_per_session=8
    )
    await broker.start()
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        port = broker.bound_addresses["default"][1]
        devices = 10
        before = 0
        # Device 0 first: the broker starts a shared task of its own on the first connection.
        for index in range(devices + 1):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(_connect(f"idle-{index}") + _publish(f"d/idle-{index}/t", 1, b"x"))
            async with asyncio.timeout(10):
                assert await reader.readexactly(8) == b"\x20\x02\x00\x00\x40\x02\x00\x01"
            streams.append((reader, writer))
            if index == 0:
                await eventually(lambda: broker.amqtt_broker.edge.live, "device 0 live", 10)
                before = len(asyncio.all_tasks())
        await eventually(
            lambda: len(broker.amqtt_broker.edge.live) == devices + 1, "all devices live", 10
        )
        assert len(asyncio.all_tasks()) - before == devices * TASKS_PER_CONNECTION
        # CPython shares attribute keys among instances up to 30 names; one more and every
        # handler carries its own ~1.6 KB dict (edge/amqtt_handler.py, _CLASS_DEFAULTS_WHY).
        handler = broker.amqtt_broker.edge.live["idle-3"]
        assert len(vars(handler)) <= 30
        assert sys.getsizeof(vars(handler)) < 1000, sorted(vars(handler))
        assert len(sink.received) == devices + 1

        # Through the one-task loop: SUBSCRIBE, a delivery to it, UNSUBSCRIBE, DISCONNECT.
        (sub_reader, sub_writer), (_pub_reader, pub_writer) = streams[1], streams[2]
        sub_writer.write(_packet(0x82, struct.pack("!H", 5) + _string("e/news") + b"\x00"))
        async with asyncio.timeout(10):
            assert await sub_reader.readexactly(5) == b"\x90\x03\x00\x05\x00"  # SUBACK qos 0
        pub_writer.write(_packet(0x30, _string("e/news") + b"hello"))  # QoS 0, not uplink
        async with asyncio.timeout(10):
            assert await sub_reader.readexactly(15) == _packet(0x30, _string("e/news") + b"hello")
        sub_writer.write(_packet(0xA2, struct.pack("!H", 6) + _string("e/news")))
        async with asyncio.timeout(10):
            assert await sub_reader.readexactly(4) == b"\xb0\x02\x00\x06"  # UNSUBACK
        sub_writer.write(b"\xe0\x00")  # DISCONNECT
        async with asyncio.timeout(10):
            assert await sub_reader.read() == b""  # the broker closed the connection
        await eventually(
            lambda: len(asyncio.all_tasks()) - before == (devices - 1) * TASKS_PER_CONNECTION,
            "the disconnected device's tasks ended",
            10,
        )
    finally:
        for _reader, writer in streams:
            writer.close()
        await broker.stop()


async def test_keepalive_wheel_runs_each_entry_once_per_schedule_on_one_timer_per_slot() -> None:
    from edge.keepalive import KeepAliveEntry, KeepAliveWheel

    loop = asyncio.get_running_loop()
    fired: list[tuple[str, float]] = []

    class Entry(KeepAliveEntry):
        __slots__ = ("again", "name")

        def __init__(self, name: str, again: float = 0.0) -> None:
            super().__init__()
            self.name, self.again = name, again

        def due(self) -> None:
            fired.append((self.name, loop.time()))
            if self.again:
                wheel.schedule(self, loop.time() + self.again)
                self.again = 0.0

    wheel = KeepAliveWheel(resolution=0.05)
    start = loop.time()
    a, b, c, d = Entry("a"), Entry("b"), Entry("c", again=0.1), Entry("d")
    for entry in (a, b, c):
        wheel.schedule(entry, start + 0.1)  # the same slot: one timer
    wheel.schedule(d, start + 0.3)
    assert len(wheel) == 4
    assert wheel.timers == 2
    wheel.cancel(b)
    wheel.cancel(b)  # twice: no-op
    wheel.schedule(a, start + 0.2)  # moved to a later slot
    await eventually(lambda: len(fired) == 4, "a, c, c again and d ran", 5)
    assert sorted(name for name, _ in fired) == ["a", "c", "c", "d"]
    assert all(at >= start + 0.1 for _, at in fired)
    assert dict(fired)["a"] >= start + 0.2
    assert len(wheel) == 0
    assert wheel.timers == 0  # nothing armed once empty


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return first, await reader.readexactly(length)


async def test_acks_keep_flowing_while_the_connection_task_awaits_a_retained_delivery() -> None:
    """The connection's task sends the acknowledgements, and amqtt makes it await the
    device's PUBACK of a retained QoS 1 message after a SUBSCRIBE. That PUBACK queues behind
    the device's publishes while the reader is paused at the in-flight cap (2 here): only
    acknowledgements sent by someone else (acking_aside) let the reader reach it before
    amqtt gives up on the delivery after 5 s."""
    sink = InstantSink()
    broker = EdgeBroker(
        listeners=[("default", HOST, 0)], sink=sink, observer=None, max_inflight_per_session=2
    )
    await broker.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        port = broker.bound_addresses["default"][1]
        reader, writer = await asyncio.open_connection(HOST, port)
        writers.append(writer)
        retained = _packet(0x33, _string("e/state") + struct.pack("!H", 1) + b"on")
        writer.write(_connect("keeper") + retained)
        async with asyncio.timeout(10):
            assert await reader.readexactly(8) == b"\x20\x02\x00\x00\x40\x02\x00\x01"

        reader, writer = await asyncio.open_connection(HOST, port)
        writers.append(writer)
        writer.write(_connect("busy"))
        async with asyncio.timeout(10):
            assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
        subscribe = _packet(0x82, struct.pack("!H", 9) + _string("e/state") + b"\x01")
        publishes = b"".join(_publish("d/busy/t", pid, b"x") for pid in range(1, 7))
        writer.write(subscribe + publishes)  # then PUBACK the retained message when it comes
        pubacks: set[int] = set()
        # Under amqtt's 5 s PUBACK timeout: without acking_aside the connection stalls until
        # that timeout gives up on the retained delivery.
        async with asyncio.timeout(3):
            while len(pubacks) < 6:
                kind, body = await _read_packet(reader)
                if kind >> 4 == 3:  # the retained PUBLISH, QoS 1: acknowledge it
                    topic_len = struct.unpack("!H", body[:2])[0]
                    packet_id = body[2 + topic_len : 4 + topic_len]
                    writer.write(b"\x40\x02" + packet_id)
                elif kind == 0x40:
                    pubacks.add(struct.unpack("!H", body)[0])
        assert pubacks == set(range(1, 7))
    finally:
        for writer in writers:
            writer.close()
        await broker.stop()
