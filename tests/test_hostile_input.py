"""Hostile input the edge broker must survive (issue 8, item 5), beyond the malformed-packet
cases of tests/test_edge_broker.py: zero-length and non-UTF-8 client ids, slow-loris
CONNECTs, a huge remaining length after CONNECT, half-open connections. Each ends in a clean
disconnect of that connection only, counted, with bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct

import pytest

from edge.connect_rules import connect_string_error
from edge.mqtt_wire import CONNECT, PUBACK, RawPacket, encode_packet
from tests.harness import rss_bytes
from tests.test_edge_broker import (
    CONNACK,
    FakeSink,
    Harness,
    RawClient,
    _string,
    eventually,
    harness,
    port_of,
    publish_packet,
)

__all__ = ["harness"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.timeout(60)


def connect_body(
    client_id: bytes,
    *,
    clean: bool = True,
    will_topic: bytes | None = None,
    username: bytes | None = None,
) -> bytes:
    flags = (0x02 if clean else 0) | (0x04 if will_topic is not None else 0)
    flags |= 0x80 if username is not None else 0
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
    body += struct.pack("!H", len(client_id)) + client_id
    if will_topic is not None:
        body += struct.pack("!H", len(will_topic)) + will_topic + b"\x00\x02hi"
    if username is not None:
        body += struct.pack("!H", len(username)) + username
    return body


def connect_bytes(client_id: bytes, **options: object) -> bytes:
    return encode_packet(RawPacket(CONNECT, 0, connect_body(client_id, **options)))  # type: ignore[arg-type]


async def test_zero_length_client_id_follows_mqtt_311(harness: Harness) -> None:
    sink = FakeSink()
    broker = await harness.broker(sink)
    # [MQTT-3.1.3-6]: clean session + empty id: accepted, the broker assigns an id.
    client = await harness.raw_client(broker, None)
    await client.send(connect_bytes(b""))
    connack = await client.read()
    assert connack is not None
    assert (connack.packet_type, connack.body[1]) == (CONNACK, 0)
    await client.send(publish_packet("d/anon/up/t", b"x", qos=1, packet_id=1))
    await client.expect(PUBACK, 1)
    assert sink.received[0].device_id  # a generated, non-empty id
    # [MQTT-3.1.3-8]: persistent session + empty id: CONNACK 0x02 and close.
    refused = await harness.raw_client(broker, None)
    await refused.send(connect_bytes(b"", clean=False))
    connack = await refused.read()
    assert connack is not None
    assert (connack.packet_type, connack.body[1]) == (CONNACK, 2)
    await refused.expect_closed()


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("client-id-not-utf8", {"client_id": b"\xff\xfedev"}),
        ("client-id-nul", {"client_id": b"dev\x00x"}),
        ("username-not-utf8", {"client_id": b"dev", "username": b"\xc3\x28"}),
        ("will-topic-wildcard", {"client_id": b"dev", "will_topic": b"d/+/x"}),
        ("will-topic-surrogate", {"client_id": b"dev", "will_topic": b"\xed\xa0\x80"}),
    ],
)
async def test_connect_strings_must_be_valid(
    harness: Harness, case: str, options: dict[str, bytes]
) -> None:
    broker = await harness.broker()
    good = await harness.device(broker, "good")
    bad = await harness.raw_client(broker, None)
    client_id = options.pop("client_id")
    await bad.send(connect_bytes(client_id, **options))
    await bad.expect_closed()  # no CONNACK: [MQTT-1.5.3-1] close the connection
    assert broker.stats.malformed_packets == 1, case
    assert broker.stats.sessions_started == 1  # only the good device
    mid = good.publish("d/good/up/t", b"ok", 1)
    await eventually(lambda: mid in good.acked, "the broker still serves other devices")


def test_connect_string_rules_pure() -> None:
    assert connect_string_error(connect_body(b"dev-1", username=b"dev-1")) is None
    assert connect_string_error(connect_body(b"", will_topic=b"d/x/status")) is None
    assert "UTF-8" in (connect_string_error(connect_body(b"\x80")) or "")
    assert connect_string_error(b"") is None  # structure errors are amqtt's to refuse
    assert connect_string_error(connect_body(b"ok")[:-1]) is None


async def test_slow_loris_connects_are_closed_at_the_deadline(harness: Harness) -> None:
    broker = await harness.broker(connect_timeout=1.0)
    good = await harness.device(broker, "good")
    data = connect_bytes(b"slow")
    clients = [await RawClient.open(port_of(broker)) for _ in range(30)]
    harness.raw.extend(clients)
    started = asyncio.get_running_loop().time()

    closed = [asyncio.Event() for _ in clients]

    async def trickle(client: RawClient, done: asyncio.Event) -> None:
        # One byte every 100 ms: always "making progress", never a whole CONNECT in time.
        # Between bytes, wait for the broker to close the connection (the 100 ms deadline).
        for byte in data:
            try:
                await client.send(bytes([byte]))
            except ConnectionError:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await done.wait()
                    return

    trickles = [asyncio.create_task(trickle(c, e)) for c, e in zip(clients, closed, strict=True)]
    try:
        for client, done in zip(clients, closed, strict=True):
            await client.expect_closed()
            done.set()
    finally:
        for task in trickles:
            task.cancel()
        await asyncio.gather(*trickles, return_exceptions=True)
    assert asyncio.get_running_loop().time() - started < 1.0 + len(data) * 0.1
    await eventually(lambda: broker.stats.malformed_packets == 30, "every slow-loris counted")
    assert broker.stats.sessions_started == 1
    mid = good.publish("d/good/up/t", b"ok", 1)
    await eventually(lambda: mid in good.acked, "the broker still serves other devices")


async def test_huge_remaining_length_is_not_allocated(harness: Harness) -> None:
    broker = await harness.broker()
    before = rss_bytes(os.getpid())
    for _ in range(20):
        client = await harness.raw_client(broker, "huge")
        # A PUBLISH announcing 256 MiB - 1 (the 4-byte maximum), then a little of it.
        await client.send(b"\x30\xff\xff\xff\x7f" + b"\x00\x03a/b" + bytes(1000))
        await client.expect_closed()
    assert broker.stats.malformed_packets == 20
    assert rss_bytes(os.getpid()) - before < 32 << 20  # 20 x 256 MiB were never allocated


async def test_half_open_connection_is_dropped_by_keepalive(harness: Harness) -> None:
    sink = FakeSink()
    broker = await harness.broker(sink)
    client = await harness.raw_client(broker, "gone", keepalive=1)
    await client.send(publish_packet("d/gone/up/t", b"x", qos=1, packet_id=1))
    await client.expect(PUBACK, 1)
    # The device vanishes without a FIN (power cut, NAT timeout): nothing more arrives. The
    # broker closes it after 1.5 x keep-alive and frees the client id.
    await client.expect_closed()
    assert broker.stats.keepalive_timeouts == 1
    await eventually(lambda: not broker.amqtt_broker.edge.live, "the session released")
