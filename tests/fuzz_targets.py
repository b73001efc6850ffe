"""Fuzz targets (hypothesis) for the hostile-input surface: the MQTT wire decoders, the
payload decoders of the intake, and the live packet path of a real :class:`EdgeBroker`.

Used by ``tests/test_fuzz.py``: a short seeded run in CI and the full campaign
(``scripts/fuzz``, ``pytest -m long``) whose results are in docs/fuzzing.md.

What counts as a failure:

* wire decoders: any exception other than :class:`MalformedPacketError`, or the broker's
  :class:`PacketSplitter` (fed in random pieces) disagreeing with :func:`read_packet`;
* payload decoders: any exception at all (bad payloads must become None / dead letters);
* live path (the broker runs in its own process, tests/fuzz_broker.py): an ERROR log line
  from the broker (a handler "reader failed" is a bug caught
  by the last-resort handler), a connection the broker does not close within
  ``CLOSE_DEADLINE_S`` after the client half-closed, or a broker that no longer answers a
  well-behaved client (checked every ``HEALTH_EVERY`` inputs and at the end).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from hypothesis import strategies as st

from edge.intake import _envelope_fields, _parse_device_info
from edge.mqtt_wire import (
    MalformedPacketError,
    PacketSplitter,
    RawPacket,
    decode_packet_id,
    decode_publish,
    encode_packet,
    read_packet,
)
from tests.harness import rss_bytes

__all__ = [
    "LiveBroker",
    "mutants",
    "decode_target",
    "live_inputs",
    "payload_target",
    "payloads",
    "wire_inputs",
]

CLOSE_DEADLINE_S: Final = 5.0
HEALTH_EVERY: Final = 250
MAX_PACKET: Final = 4096
"""The live broker's max packet size (small, so huge remaining lengths are the common case)."""
CLIENT_IDS: Final = [f"fz{i}" for i in range(40)] + ["", "a" * 23, "ü-ß", "d/+/#"]
"""Client ids of well-formed CONNECTs: a bounded set, as authentication bounds them in a
real deployment (amqtt keeps clean_session=0 sessions of every id it ever saw)."""


# -- generators -------------------------------------------------------------------------------


def _field(data: bytes) -> bytes:
    return struct.pack("!H", len(data) & 0xFFFF) + data


def _remaining(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


_text = st.text(max_size=24)
_strings = st.one_of(
    _text.map(lambda s: _field(s.encode())),
    st.binary(max_size=24).map(_field),  # invalid UTF-8 included
    st.sampled_from([b"", b"\x00", b"\xff\xff", b"\x00\x05ab"]),  # truncated / lying lengths
)
_own = st.sampled_from(["fz0", "fz1", "fz2"])
_topics = st.one_of(
    # Topics the live broker's ACL lets a device publish / subscribe to (its own), so the
    # publish path, the quota checks and the subscription limit are reached often.
    _own.map(lambda d: f"d/{d}/up/event"),
    st.tuples(_own, st.integers(0, 9)).map(lambda t: f"d/{t[0]}/fw/{t[1]}"),
    _own.map(lambda d: f"d/{d}/cmd"),
    st.sampled_from(["d/fz1/meta", "a/+/b", "#", "$SYS/x", "", "d/\x00/x"]),
    _text,
).map(lambda s: _field(s.encode()))
_packet_ids = st.integers(0, 0xFFFF).map(lambda n: struct.pack("!H", n))


@st.composite
def _connect_body(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from([_field(b"MQTT"), _field(b"MQIsdp"), b""]) | _strings)
    level = draw(st.sampled_from([4, 3, 5, 0, 255]))
    flags = draw(st.integers(0, 255))
    keepalive = draw(st.integers(0, 0xFFFF))
    body = name + bytes([level, flags]) + struct.pack("!H", keepalive)
    body += draw(st.sampled_from(CLIENT_IDS).map(lambda s: _field(s.encode())) | _strings)
    for _ in range(draw(st.integers(0, 4))):  # will topic/message, user name, password
        body += draw(_strings)
    return body


@st.composite
def _publish(draw: st.DrawFn) -> tuple[int, int, bytes]:
    flags = draw(st.integers(0, 15))
    body = draw(_topics)
    if flags & 0x06:
        body += draw(_packet_ids)
    body += draw(st.binary(max_size=200) | st.binary(min_size=90, max_size=160))
    return 3, flags, body


@st.composite
def _subscribe(draw: st.DrawFn) -> tuple[int, int, bytes]:
    kind = draw(st.sampled_from([8, 10]))
    body = draw(_packet_ids)
    for _ in range(draw(st.integers(0, 4))):
        body += draw(_topics | _strings)
        if kind == 8:
            body += bytes([draw(st.sampled_from([0, 1, 2, 3, 0x80]))])
    return kind, draw(st.sampled_from([2, 0, 0xF])), body


_other = st.tuples(
    st.integers(0, 15), st.integers(0, 15), st.one_of(_packet_ids, st.binary(max_size=16))
)
_packet_parts = st.one_of(
    _publish(), _subscribe(), _other, _connect_body().map(lambda b: (1, 0, b))
)


@st.composite
def _framed(draw: st.DrawFn) -> bytes:
    kind, flags, body = draw(_packet_parts)
    length = draw(
        st.one_of(
            st.just(len(body)),
            st.just(len(body)),
            st.integers(0, 0x0FFF_FFFF),  # lies, up to the 4-byte maximum (256 MiB)
            st.integers(len(body) + 1, len(body) + 8),
        )
    )
    packet = bytes([(kind << 4) | flags]) + _remaining(length) + body
    if draw(st.integers(0, 9)) == 0:  # a few byte-level mutations
        data = bytearray(packet)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        packet = bytes(data)
    return packet


wire_inputs: Final = st.one_of(
    st.lists(_framed(), min_size=1, max_size=6).map(b"".join),
    st.binary(max_size=64),
    st.just(b"\x30\xff\xff\xff\x7f"),  # PUBLISH announcing 256 MiB
    st.just(b"\x30\xff\xff\xff\xff\x01"),  # a 5-byte remaining length
)
"""Byte streams: framed packets (valid, lying lengths, mutated) and raw garbage."""


def _valid_connect(client_id: str, clean: bool) -> bytes:
    body = _field(b"MQTT") + bytes([4, 0x02 if clean else 0]) + struct.pack("!H", 60)
    return encode_packet(RawPacket(1, 0, body + _field(client_id.encode())))


@st.composite
def _session(draw: st.DrawFn) -> bytes:
    """A valid CONNECT then up to 12 well-formed packets of the device's own traffic
    (publishes of every QoS, DUP, payloads around the 100-byte limit, subscriptions past the
    4-filter limit, PUBREL, PINGREQ): reaches the deep paths that malformed streams do not
    (and its mutants break such a session at an arbitrary later point)."""
    device = draw(_own)
    out = _valid_connect(device, draw(st.booleans()))
    own_filters = [f"d/{device}/cmd", *(f"d/{device}/fw/{i}" for i in range(8)), "d/other/cmd"]
    for _ in range(draw(st.integers(1, 12))):
        kinds = ["publish", "publish", "publish", "sub", "unsub", "rel", "ping"]
        kind = draw(st.sampled_from(kinds))
        packet_id = struct.pack("!H", draw(st.integers(1, 20)))
        if kind == "publish":
            qos = draw(st.integers(0, 2))
            topic = draw(
                st.sampled_from([f"d/{device}/up/event", f"d/{device}/meta", "d/other/up/event"])
            )
            flags = (qos << 1) | draw(st.sampled_from([0, 1] + ([8] if qos else [])))
            body = _field(topic.encode()) + (packet_id if qos else b"")
            body += draw(st.binary(max_size=40) | st.binary(min_size=95, max_size=110))
            out += encode_packet(RawPacket(3, flags, body))
        elif kind == "sub":
            filters = draw(st.lists(st.sampled_from(own_filters), min_size=1, max_size=3))
            body = packet_id
            for topic_filter in filters:
                body += _field(topic_filter.encode()) + bytes([draw(st.integers(0, 2))])
            out += encode_packet(RawPacket(8, 2, body))
        elif kind == "unsub":
            body = packet_id + _field(draw(st.sampled_from(own_filters)).encode())
            out += encode_packet(RawPacket(10, 2, body))
        elif kind == "rel":
            out += encode_packet(RawPacket(6, 2, packet_id))
        else:
            out += b"\xc0\x00"
    return out


live_inputs: Final = st.one_of(
    st.tuples(
        st.one_of(
            st.tuples(_own, st.booleans()).map(lambda t: _valid_connect(*t)),
            st.just(b""),
        ),
        wire_inputs,
    ).map(b"".join),
    _session(),
)
"""A connection's bytes: a valid CONNECT then a fuzzed stream, fuzz from byte 0, or a
well-formed session (whose mutants break it anywhere)."""


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    _containers,
    max_leaves=12,
)


@st.composite
def _cbor(draw: st.DrawFn) -> bytes:
    import cbor2

    value = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "msg_id": st.text(max_size=300) | st.integers() | st.binary(max_size=8),
                "ttl_s": st.integers() | st.floats() | st.text(max_size=4),
                "seq": st.integers(-(2**70), 2**70) | st.booleans() | st.none(),
                "type": st.text(max_size=8) | st.integers(),
                "firmware_version": st.text(max_size=8) | st.none(),
            },
        )
        | _json
    )
    return bytes(cbor2.dumps(value))


payloads: Final = st.one_of(
    st.binary(max_size=256),
    st.binary(max_size=64).map(lambda b: bytes([0xA0 | (len(b) % 32)]) + b),  # "a CBOR map"
    _cbor(),
    _json.map(lambda v: repr(v).encode()),
)
"""Payloads: garbage, CBOR-map prefixes, real CBOR envelopes with wrong types, JSON-ish."""


def mutants(data: bytes, rng: random.Random, count: int) -> list[bytes]:
    """``count`` byte-level mutations of ``data`` (flip, set, insert, delete, truncate,
    duplicate a slice): cheap extra inputs around each hypothesis-generated one."""
    out = []
    for _ in range(count):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(6)
            pos = rng.randrange(len(buf) + 1)
            if op == 0 and buf:
                buf[pos % len(buf)] ^= 1 << rng.randrange(8)
            elif op == 1 and buf:
                buf[pos % len(buf)] = rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))
            elif op == 2:
                buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op == 3:
                del buf[pos : pos + rng.randint(1, 8)]
            elif op == 4:
                del buf[pos:]
            else:
                end = min(len(buf), pos + rng.randint(1, 32))
                buf[end:end] = buf[pos:end]
        out.append(bytes(buf))
    return out


# -- targets ----------------------------------------------------------------------------------


class _BytesReader:
    """``read(n)``: exactly n bytes or IncompleteReadError, like amqtt's ReaderAdapter."""

    def __init__(self, data: bytes) -> None:
        self._reader = asyncio.StreamReader()
        self._reader.feed_data(data)
        self._reader.feed_eof()

    async def read(self, n: int = -1) -> bytes:
        return await self._reader.readexactly(n)


async def _read_all(data: bytes) -> tuple[list[RawPacket], bool]:
    """Packets :func:`read_packet` cuts from ``data``, and whether the stream ended in error."""
    reader = _BytesReader(data)
    packets: list[RawPacket] = []
    while True:
        try:
            packet = await read_packet(reader, max_size=MAX_PACKET, first_byte_timeout=None)
        except MalformedPacketError:
            return packets, True
        if packet is None:
            return packets, False
        packets.append(packet)


def _split_all(data: bytes) -> tuple[list[RawPacket], bool]:
    """The same through :class:`PacketSplitter`, fed in pieces of 1-64 bytes (the broker's
    hot path): it must agree with :func:`read_packet` exactly."""
    chunks = random.Random(len(data))
    splitter = PacketSplitter(MAX_PACKET)
    packets: list[RawPacket] = []
    position = 0
    try:
        while position < len(data):
            size = chunks.randint(1, 64)
            splitter.feed(data[position : position + size])
            position += size
            while (packet := splitter.next_packet()) is not None:
                packets.append(packet)
    except MalformedPacketError:
        return packets, True
    return packets, splitter.pending > 0


def decode_target(data: bytes) -> None:
    """Frame ``data`` both ways and decode every packet; only MalformedPacketError may come
    out of a decoder (it is caught), and both framings must agree."""
    packets, failed = asyncio.run(_read_all(data))
    assert _split_all(data) == (packets, failed), "PacketSplitter disagrees with read_packet"
    for packet in packets:
        assert len(packet.body) <= MAX_PACKET
        assert encode_packet(packet).endswith(packet.body)
        try:
            if packet.packet_type == 3:
                decoded = decode_publish(packet.flags, packet.body)
                assert decoded.topic
                assert "+" not in decoded.topic
                assert "#" not in decoded.topic
            else:
                decode_packet_id(packet.body)
        except MalformedPacketError:
            pass


def payload_target(payload: bytes) -> None:
    """The intake's envelope and device-info decoders never raise."""
    envelope = _envelope_fields(payload)
    if envelope is not None:
        msg_id, ttl_ms, seq = envelope
        assert isinstance(msg_id, str)
        assert 0 < len(msg_id) <= 256
        assert ttl_ms is None or 0 < ttl_ms < 2**62  # storable as an SQLite INTEGER
        assert seq is None or isinstance(seq, int)
    info = _parse_device_info(payload)
    assert info is None or all(v is None or isinstance(v, str) for v in info)


class LiveBroker:
    """A real EdgeBroker (ACL and quotas on) in its own process (tests/fuzz_broker.py), so
    its memory is measured apart from hypothesis and pytest; its ERROR log lines go to a
    file that every input checks."""

    def __init__(self, directory: Path) -> None:
        self.inputs = 0
        self.errors_path = directory / "fuzz-broker-errors.log"
        self.port = 0
        self.pid = 0
        self.final: dict[str, Any] = {}
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> LiveBroker:
        with self.errors_path.open("w") as errors:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fuzz_broker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        assert self._proc.stdout is not None
        ready = json.loads(self._proc.stdout.readline() or "{}")
        assert "port" in ready, f"fuzz broker did not start: {self.errors_path.read_text()}"
        self.port, self.pid = int(ready["port"]), self._proc.pid
        return self

    def __exit__(self, *_exc: object) -> None:
        proc = self._proc
        if proc is None:
            return
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.close()  # the broker stops and reports its counters
            self.final = json.loads(proc.stdout.readline() or "{}")
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def _check_errors(self, data: bytes) -> None:
        if self.errors_path.stat().st_size:
            errors = self.errors_path.read_text(errors="replace")[:2000]
            raise AssertionError(f"broker logged errors (last input {data[:64]!r}):\n{errors}")

    def target(self, data: bytes) -> None:
        """Send ``data`` on a fresh connection, half-close, expect the broker to close."""
        self.inputs += 1
        with socket.create_connection(("127.0.0.1", self.port), timeout=CLOSE_DEADLINE_S) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the broker closed first (e.g. after a bad first byte): fine
            try:
                while sock.recv(65536):
                    pass
            except TimeoutError as exc:
                raise AssertionError(f"broker kept the connection open: {data[:64]!r}") from exc
            except OSError:
                pass  # reset by the broker: closed
        self._check_errors(data)
        if self.inputs % HEALTH_EVERY == 0:
            self.check_health()

    def check_health(self) -> None:
        """A well-behaved client: CONNACK, then a QoS 1 PUBLISH is PUBACKed."""
        assert self._proc is not None
        assert self._proc.poll() is None, "the fuzz broker process died"
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(_valid_connect("fz-health", True))
            assert _recv(sock, 4)[:2] == b"\x20\x02", "no CONNACK"
            body = _field(b"d/fz-health/up/event") + b"\x00\x07" + b"ok"
            sock.sendall(encode_packet(RawPacket(3, 0x02, body)))
            assert _recv(sock, 4) == b"\x40\x02\x00\x07", "no PUBACK"
            sock.sendall(b"\xe0\x00")


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError("connection closed")
        data += chunk
    return data


Target = Callable[[bytes], None]
