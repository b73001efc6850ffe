"""MQTT 3.1.1 framing for the edge broker: read one whole packet (bounded), decode PUBLISH.

amqtt decodes packets straight off the socket, piece by piece, and trusts the declared
lengths: a 5-byte header announcing 256 MiB makes it buffer 256 MiB, and a bad length
inside a packet leaves the stream out of step. The edge broker instead reads exactly one
packet's bytes (refusing anything over ``max_size`` before reading its body), and decodes
from those bytes only. A decoding error then costs one connection, never the stream's
framing or the broker's memory.

Two ways to frame: :func:`read_packet` reads one packet from a stream (the CONNECT, before
the session exists); :class:`PacketSplitter` cuts packets out of whatever bytes one socket
read returned, with the same bounds, so the reader loop awaits once per socket read instead
of three times per packet (the hot path: about 20 small publishes arrive per read under
load). Everything except :func:`read_packet` is pure and unit-testable without sockets.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from gateway.errors import TidegateError

__all__ = [
    "CONNECT",
    "DISCONNECT",
    "PINGREQ",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "DecodedPublish",
    "MalformedPacketError",
    "PacketSplitter",
    "RawPacket",
    "decode_packet_id",
    "decode_publish",
    "encode_acks",
    "encode_packet",
    "read_packet",
]

CONNECT = 0x1
PUBLISH = 0x3
PUBACK = 0x4
PUBREC = 0x5
PUBREL = 0x6
PUBCOMP = 0x7
SUBSCRIBE = 0x8
UNSUBSCRIBE = 0xA
PINGREQ = 0xC
DISCONNECT = 0xE

_MAX_REMAINING_LENGTH_BYTES = 4


class MalformedPacketError(TidegateError):
    """A device sent bytes that are not a valid MQTT 3.1.1 packet, or broke the protocol.

    The broker closes that connection without acknowledging anything more; the device
    resends its unacknowledged messages after reconnecting.
    """


class ByteReader(Protocol):
    """What amqtt's ``ReaderAdapter`` offers: ``read(n)`` returns exactly ``n`` bytes or raises."""

    async def read(self, n: int = -1) -> bytes: ...


# Not frozen: a frozen dataclass's __init__ costs ~4x more (object.__setattr__ per
# field), and this one is built for every message on the hot path. Treat it as immutable.
@dataclass(slots=True, unsafe_hash=True)
class RawPacket:
    """One packet's fixed header fields and its whole body (variable header + payload)."""

    packet_type: int
    flags: int
    body: bytes


# Not frozen: a frozen dataclass's __init__ costs ~4x more (object.__setattr__ per
# field), and this one is built for every message on the hot path. Treat it as immutable.
@dataclass(slots=True, unsafe_hash=True)
class DecodedPublish:
    """A PUBLISH as the device sent it."""

    topic: str
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    """``None`` for QoS 0."""
    payload: bytes


async def _read_exactly(reader: ByteReader, n: int) -> bytes | None:
    """``n`` bytes, or ``None`` when the peer closed or reset the connection first."""
    try:
        data = await reader.read(n)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if len(data) < n:
        return None
    return data


async def read_packet(
    reader: ByteReader,
    *,
    max_size: int,
    first_byte_timeout: float | None,
    only_type: int | None = None,
) -> RawPacket | None:
    """Read one whole packet; ``None`` when the connection ended between packets.

    ``first_byte_timeout`` bounds only the wait for the packet's first byte (the MQTT
    keep-alive: 1.5 x the client's keep-alive). Once a packet has started, a timeout would
    leave the stream mid-packet, so the rest is read without one; a peer that stalls
    mid-packet is caught by TCP or by the next keep-alive check, and holds at most
    ``max_size`` bytes.

    Raises :class:`MalformedPacketError` for a bad length, an oversized packet, a
    connection that ended mid-packet, or a packet type other than ``only_type`` (checked
    before anything else is read); :class:`TimeoutError` when the keep-alive expired.
    """
    if first_byte_timeout is None:
        first = await _read_exactly(reader, 1)
    else:
        async with asyncio.timeout(first_byte_timeout):
            first = await _read_exactly(reader, 1)
    if first is None:
        return None
    if only_type is not None and first[0] >> 4 != only_type:
        raise MalformedPacketError(f"packet type {first[0] >> 4} where {only_type} was expected")
    remaining = 0
    for index in range(_MAX_REMAINING_LENGTH_BYTES):
        byte = await _read_exactly(reader, 1)
        if byte is None:
            raise MalformedPacketError("connection ended inside a fixed header")
        remaining |= (byte[0] & 0x7F) << (7 * index)
        if not byte[0] & 0x80:
            break
    else:
        raise MalformedPacketError("remaining length longer than 4 bytes")
    if remaining > max_size:
        raise MalformedPacketError(f"packet of {remaining} bytes exceeds the {max_size}-byte limit")
    body = b""
    if remaining:
        read = await _read_exactly(reader, remaining)
        if read is None:
            raise MalformedPacketError("connection ended inside a packet")
        body = read
    return RawPacket(first[0] >> 4, first[0] & 0x0F, body)


class PacketSplitter:
    """Cuts whole MQTT packets out of a byte stream fed in arbitrary pieces.

    Bounds as :func:`read_packet`: a declared length over ``max_size`` or a remaining-length
    field longer than 4 bytes raises :class:`MalformedPacketError` as soon as the header is
    complete, before the body is buffered; so the buffer never holds more than one packet
    of at most ``max_size`` bytes plus one unread socket read.
    """

    __slots__ = ("_buffer", "_max_size", "_start")

    def __init__(self, max_size: int) -> None:
        self._buffer = bytearray()
        self._start = 0
        self._max_size = max_size

    @property
    def pending(self) -> int:
        """Bytes received and not yet returned as a packet (a partial packet when > 0 and
        :meth:`next_packet` returned ``None``)."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes) -> None:
        """Append bytes read from the socket."""
        if self._start:
            # Compact once per read, not once per packet (a memmove of what is left).
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def next_packet(self) -> RawPacket | None:
        """The next whole packet, or ``None`` until more bytes arrive."""
        buffer = self._buffer
        start = self._start
        size = len(buffer)
        index = start + 1
        remaining = 0
        shift = 0
        while True:
            if index >= size:
                return None
            byte = buffer[index]
            remaining |= (byte & 0x7F) << shift
            index += 1
            if not byte & 0x80:
                break
            shift += 7
            if index - start > _MAX_REMAINING_LENGTH_BYTES:
                raise MalformedPacketError("remaining length longer than 4 bytes")
        if remaining > self._max_size:
            raise MalformedPacketError(
                f"packet of {remaining} bytes exceeds the {self._max_size}-byte limit"
            )
        end = index + remaining
        if end > size:
            return None
        first = buffer[start]
        self._start = end
        return RawPacket(first >> 4, first & 0x0F, bytes(buffer[index:end]))


_ACK_HEADERS = {PUBACK: 0x40, PUBREC: 0x50, PUBCOMP: 0x70}


def encode_acks(acks: list[tuple[int, int]]) -> bytes:
    """PUBACK / PUBREC / PUBCOMP packets for ``(packet type, packet id)`` pairs, in order, as
    one buffer: one socket write for a whole run of acknowledgements."""
    out = bytearray()
    for kind, packet_id in acks:
        out += bytes((_ACK_HEADERS[kind], 2, packet_id >> 8, packet_id & 0xFF))
    return bytes(out)


def encode_packet(packet: RawPacket) -> bytes:
    """The wire bytes of ``packet`` (fixed header + body)."""
    out = bytearray([(packet.packet_type << 4) | packet.flags])
    length = len(packet.body)
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out) + packet.body


def decode_packet_id(body: bytes) -> int:
    """The packet id of a PUBACK / PUBREC / PUBREL / PUBCOMP body (exactly two bytes)."""
    if len(body) != 2:
        raise MalformedPacketError(f"acknowledgement body of {len(body)} bytes, expected 2")
    packet_id = (body[0] << 8) | body[1]
    if packet_id == 0:
        raise MalformedPacketError("packet id 0")
    return packet_id


def decode_publish(flags: int, body: bytes) -> DecodedPublish:
    """Decode and validate a PUBLISH the way MQTT 3.1.1 requires a server to.

    Refused (the connection is closed, nothing acknowledged): QoS 3, DUP on QoS 0, a topic
    that is empty, not UTF-8, or contains wildcards or U+0000, a ``$`` topic (reserved for
    the broker), packet id 0.
    """
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacketError("PUBLISH with QoS 3")
    dup = bool(flags & 0x08)
    if dup and qos == 0:
        raise MalformedPacketError("[MQTT-3.3.1-2] DUP set on a QoS 0 PUBLISH")
    if len(body) < 2:
        raise MalformedPacketError("PUBLISH without a topic")
    end = 2 + ((body[0] << 8) | body[1])
    if end > len(body):
        raise MalformedPacketError("PUBLISH topic longer than the packet")
    try:
        topic = body[2:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacketError("PUBLISH topic is not UTF-8") from exc
    if not topic:
        raise MalformedPacketError("[MQTT-4.7.3-1] empty PUBLISH topic")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise MalformedPacketError(f"[MQTT-3.3.2-2] invalid PUBLISH topic {topic!r}")
    if topic.startswith("$"):
        raise MalformedPacketError(f"[MQTT-4.7.2-1] devices may not publish to {topic!r}")
    packet_id: int | None = None
    if qos:
        if end + 2 > len(body):
            raise MalformedPacketError("PUBLISH without a packet id")
        packet_id = (body[end] << 8) | body[end + 1]
        if packet_id == 0:
            raise MalformedPacketError("PUBLISH with packet id 0")
        end += 2
    return DecodedPublish(topic, qos, bool(flags & 0x01), dup, packet_id, body[end:])
