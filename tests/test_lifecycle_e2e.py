"""Device lifecycle end to end: a real gateway process, real sockets, events read back from a
real Kafka. Devices are raw MQTT sockets (so a test controls exactly whether DISCONNECT is
sent, or nothing at all) and a paho client in its own process that is SIGKILLed."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.passwords import read_entries, write_entries
from gateway.dev.kafka import KafkaState
from tests.harness import (
    REPO,
    GatewayProcess,
    ReadRecord,
    device_credentials,
    eventually,
    kafka_tls,
    read_topics,
    running_gateway,
    wait_for,
    write_gateway_config,
)

pytestmark = pytest.mark.kafka


def _string(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(
    client_id: str,
    *,
    keep_alive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """An MQTT 3.1.1 CONNECT (will at QoS 1, not retained)."""
    flags = 0x02 if clean else 0
    payload = _string(client_id.encode())
    if will is not None:
        flags |= 0x04 | (1 << 3)
        payload += _string(will[0].encode()) + _string(will[1])
    if username is not None:
        flags |= 0x80
        payload += _string(username.encode())
    if password is not None:
        flags |= 0x40
        payload += _string(password.encode())
    body = _string(b"MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive) + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


class RawDevice:
    """A device on a plain socket: it sends exactly what the test says, nothing else."""

    def __init__(self, port: int, client_id: str, **connect: Any) -> None:
        self.port = port
        self.client_id = client_id
        self.connect_args = connect
        self.sock: socket.socket | None = None

    def connect(self) -> RawDevice:
        username, password = device_credentials(self.port, self.client_id)
        options = {"username": username, "password": password, **self.connect_args}
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.sendall(connect_packet(self.client_id, **options))
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            assert chunk, f"{self.client_id}: connection closed before CONNACK"
            connack += chunk
        assert connack == b"\x20\x02\x00\x00", f"{self.client_id}: refused: {connack!r}"
        self.sock = sock
        return self

    def disconnect(self) -> None:
        """A clean end: DISCONNECT, then close."""
        assert self.sock is not None
        self.sock.sendall(b"\xe0\x00")
        self.sock.close()
        self.sock = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_KILLED_DEVICE = textwrap.dedent(
    """
    import signal, sys, threading
    import paho.mqtt.client as mqtt
    port, device, username, password = int(sys.argv[1]), *sys.argv[2:5]
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=device)
    client.username_pw_set(username, password)
    client.will_set(f"d/{device}/up/event", b"will-of-" + device.encode(), qos=1)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    print("ready" if connected.wait(20) else "failed", flush=True)
    signal.pause()  # until the test SIGKILLs this process (no DISCONNECT is ever sent)
    """
)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    actions: list[Callable[[], None]] = []
    yield actions
    for action in reversed(actions):
        action()


def spawn_killable_device(port: int, device: str, cleanup: list[Callable[[], None]]) -> Any:
    """A paho device in its own process, connected with a will; SIGKILL it to "kill" it."""
    credentials = device_credentials(port, device)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_DEVICE, str(port), device, *credentials],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()

    cleanup.append(stop)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def lifecycle_config(tmp_path: Path, kafka: KafkaState, topics: dict[str, str], extra: str) -> Path:
    return write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=kafka_tls(kafka),
        topics={"event": topics["event"]},
        extra=f'\n[lifecycle]\ntopic = "{topics["lifecycle"]}"\n{extra}',
    )


def decoded(records: list[ReadRecord]) -> list[tuple[ReadRecord, dict[str, Any]]]:
    """Records with their JSON values, de-duplicated on ``tg-message-id`` as a consumer must
    (at-least-once: a record sent just before a kill -9 is sent again by the next run)."""
    seen: set[bytes] = set()
    out = []
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        message_id = record.headers["tg-message-id"]
        if message_id not in seen:
            seen.add(message_id)
            out.append((record, json.loads(record.value)))
    return out


def device_events(
    records: list[tuple[ReadRecord, dict[str, Any]]], device: str
) -> list[dict[str, Any]]:
    return [
        v
        for _r, v in sorted(records, key=lambda x: (x[0].partition, x[0].offset))
        if v["type"] in ("connected", "disconnected") and v["device_id"] == device
    ]


def registry(gateway: GatewayProcess) -> dict[str, dict[str, Any]]:
    admin = gateway.runtime["admin"]
    with urllib.request.urlopen(f"http://{admin['host']}:{admin['port']}/devices") as response:
        found = json.loads(response.read())
    devices = found["devices"] if isinstance(found, dict) else found
    return {d["device_id"]: d for d in devices}


async def test_connect_disconnect_reasons_wills_and_heartbeat(
    tmp_path: Path,
    kafka: KafkaState,
    kafka_topic_factory: Callable[..., str],
    cleanup: list[Callable[[], None]],
) -> None:
    topics = {"event": kafka_topic_factory("events"), "lifecycle": kafka_topic_factory("lc")}
    config = lifecycle_config(tmp_path, kafka, topics, "heartbeat_period_s = 1.0\n")
    tls = kafka_tls(kafka)
    with running_gateway(config) as gateway:
        port = gateway.mqtt_port
        killed = spawn_killable_device(port, "dev-killed", cleanup)
        clean = RawDevice(port, "dev-clean", will=("d/dev-clean/up/event", b"will-of-dev-clean"))
        silent = RawDevice(
            port, "dev-silent", keep_alive=1, will=("d/dev-silent/up/event", b"will-of-dev-silent")
        )
        first = RawDevice(port, "dev-twice", will=("d/dev-twice/up/event", b"will-of-dev-twice"))
        second = RawDevice(port, "dev-twice")
        for device in (clean, silent, first, second):
            cleanup.append(device.close)
            device.connect()
        beats = gateway.wait_status(
            lambda s: s["lifecycle"]["connected_devices"] == 4, 10, "4 devices connected"
        )["lifecycle"]["heartbeats"]
        gateway.wait_status(
            lambda s: s["lifecycle"]["heartbeats"] > beats, 10, "a heartbeat with 4 devices"
        )
        killed.send_signal(signal.SIGKILL)  # no DISCONNECT: the kernel closes the socket
        clean.disconnect()
        second.disconnect()
        # dev-silent sends nothing more: the gateway closes it after 1.5 x its keep-alive.
        status = gateway.wait_status(
            lambda s: s["lifecycle"]["connected_devices"] == 0, 15, "every device gone"
        )
        assert registry(gateway)["dev-killed"]["connected"] is False
        assert registry(gateway)["dev-silent"]["connected"] is False

        async def arrived() -> list[tuple[ReadRecord, dict[str, Any]]] | None:
            found = decoded(await read_topics(kafka.bootstrap, tls, [topics["lifecycle"]]))
            gone = {v["device_id"] for _r, v in found if v["type"] == "disconnected"}
            beats = [v for _r, v in found if v["type"] == "heartbeat"]
            wanted = {"dev-killed", "dev-clean", "dev-silent", "dev-twice"}
            return found if wanted <= gone and len(beats) >= 5 else None

        records = await eventually(arrived, "lifecycle events in Kafka", deadline_s=30)
        wills = await read_topics(kafka.bootstrap, tls, [topics["event"]])

    # The killed device: abnormal, its will published, and the will went where it asked
    # (an uplink topic, so into Kafka like any publish of the device).
    connected, gone = device_events(records, "dev-killed")
    assert connected["type"] == "connected"
    assert gone["type"] == "disconnected"
    assert (gone["reason"], gone["abnormal"], gone["will_published"]) == (
        "connection_lost",
        True,
        True,
    )
    assert gone["session"]["will"] == {"topic": "d/dev-killed/up/event", "qos": 1, "retain": False}
    assert gone["duration_s"] >= 0
    assert gone["connected_ms"] == connected["ts_ms"]
    will_values = {r.value: r for r in wills}
    assert b"will-of-dev-killed" in will_values
    assert will_values[b"will-of-dev-killed"].key == b"dev-killed"

    # Clean DISCONNECT: not abnormal, no will.
    connected, gone = device_events(records, "dev-clean")
    assert (gone["reason"], gone["abnormal"], gone["will_published"]) == ("clean", False, False)
    assert b"will-of-dev-clean" not in will_values
    assert connected["session"]["clean_session"] is True
    assert connected["session"]["keep_alive_s"] == 60
    assert connected["session"]["auth_method"] == "password"
    assert connected["session"]["tls"] is False
    assert connected["session"]["peer"].startswith("127.0.0.1:")
    assert connected["gateway_id"] == "gw-test"
    assert connected["took_over"] is False

    # Keep-alive expiry: abnormal, will published.
    _connected, gone = device_events(records, "dev-silent")
    assert (gone["reason"], gone["abnormal"], gone["will_published"]) == (
        "keepalive_timeout",
        True,
        True,
    )
    assert b"will-of-dev-silent" in will_values

    # Takeover: the old connection ends (no will) before the new one is announced.
    events = device_events(records, "dev-twice")
    assert [(e["type"], e.get("reason"), e.get("took_over")) for e in events] == [
        ("connected", None, False),
        ("disconnected", "taken_over", None),
        ("connected", None, True),
        ("disconnected", "clean", None),
    ]
    assert events[1]["will_published"] is False
    assert b"will-of-dev-twice" not in will_values

    # Record envelope: key = device id, gateway headers, no MQTT headers.
    for record, value in records:
        if value["type"] == "heartbeat":
            assert record.key == b"gw-test"
            assert record.headers["tg-class"] == b"!heartbeat"
        else:
            assert record.key == value["device_id"].encode()
            assert record.headers["tg-class"] == b"!lifecycle"
        assert record.headers["tg-gateway-id"] == b"gw-test"
        assert record.headers["tg-content-type"] == b"application/json"
        assert record.headers["tg-message-id"].startswith(b"gw-test:")
        assert "tg-mqtt-topic" not in record.headers

    # Heartbeats: at the configured period, with the fields the cloud needs.
    beats = sorted((v for _r, v in records if v["type"] == "heartbeat"), key=lambda v: v["seq"])
    gaps = [
        (b["ts_ms"] - a["ts_ms"]) / 1000
        for a, b in itertools.pairwise(beats)
        if b["seq"] == a["seq"] + 1
    ]
    assert len([g for g in gaps if abs(g - 1.0) <= 0.5]) >= 3, gaps
    assert abs(statistics.median(gaps) - 1.0) <= 0.1, gaps
    for beat in beats:
        assert beat["gateway_id"] == "gw-test"
        assert beat["period_s"] == 1.0
        assert beat["version"]
        assert beat["uptime_s"] >= 0
        assert set(beat["buffer"]) >= {"rows", "payload_bytes", "used_bytes", "oldest_age_s"}
        assert 0 <= beat["buffer"]["rows"] < 100  # a handful of events and heartbeats
        assert beat["kafka"]["breaker"] in ("closed", "open", "half_open")
    assert max(b["devices_connected"] for b in beats) == 4

    lifecycle = status["lifecycle"]
    assert lifecycle["disconnect_reasons"] == {
        "connection_lost": 1,
        "clean": 2,
        "keepalive_timeout": 1,
        "taken_over": 1,
    }
    assert lifecycle["wills_published"] == 2
    assert lifecycle["events"] == {"connected": 5, "disconnected": 5}


async def test_gateway_crash_and_shutdown_are_reported_for_connected_devices(
    tmp_path: Path,
    kafka: KafkaState,
    kafka_topic_factory: Callable[..., str],
    cleanup: list[Callable[[], None]],
) -> None:
    """kill -9 leaves devices "connected" in the registry: the next start reports them
    disconnected (gateway_restart). SIGTERM reports gateway_shutdown, and the shutdown sends
    those events before it stops the forwarder (no gateway runs afterwards to send them). A
    device whose password is revoked by a reload (SIGHUP) ends as ``revoked``, without will."""
    topics = {"event": kafka_topic_factory("events"), "lifecycle": kafka_topic_factory("lc")}
    config = lifecycle_config(tmp_path, kafka, topics, "heartbeat_period_s = 60\n")
    with running_gateway(config) as gateway:
        device = RawDevice(gateway.mqtt_port, "dev-crash", will=("d/dev-crash/up/event", b"w"))
        cleanup.append(device.close)
        device.connect()
        wait_for(
            lambda: registry(gateway).get("dev-crash", {}).get("connected"),
            10,
            "the connection committed to the registry",
        )
        gateway.kill9()
    device.close()
    with running_gateway(config) as gateway:
        assert registry(gateway)["dev-crash"]["connected"] is False
        device = RawDevice(gateway.mqtt_port, "dev-stay")
        revoked = RawDevice(gateway.mqtt_port, "dev-revoked", will=("d/dev-revoked/up/event", b"r"))
        for each in (device, revoked):
            cleanup.append(each.close)
            each.connect()
        gateway.wait_status(lambda s: s["lifecycle"]["connected_devices"] == 2, 10, "connected")
        # Revoke dev-revoked's password and reload (SIGHUP): it is disconnected, no will.
        passwords = config.parent / "devices.passwd"
        entries = read_entries(passwords)
        del entries["dev-revoked"]
        write_entries(passwords, entries)
        os.kill(gateway.runtime["pid"], signal.SIGHUP)
        gateway.wait_status(
            lambda s: s["lifecycle"]["disconnect_reasons"].get("revoked") == 1, 30, "revoked"
        )
        assert gateway.terminate(timeout=20) < 15
        assert "lifecycle events stay buffered" not in gateway.log()
    # The gateway is gone: whatever is in Kafka now was sent by the runs above.
    records = decoded(await read_topics(kafka.bootstrap, kafka_tls(kafka), [topics["lifecycle"]]))
    crash = device_events(records, "dev-crash")
    assert [e["type"] for e in crash] == ["connected", "disconnected"]
    assert crash[1]["reason"] == "gateway_restart"
    assert crash[1]["abnormal"] is True
    assert crash[1]["will_published"] is False
    assert crash[1]["session"] is None
    stay = device_events(records, "dev-stay")
    assert [e["type"] for e in stay] == ["connected", "disconnected"]
    assert stay[1]["reason"] == "gateway_shutdown"
    assert stay[1]["abnormal"] is False
    assert stay[1]["will_published"] is False
    gone = device_events(records, "dev-revoked")[-1]
    assert (gone["reason"], gone["abnormal"], gone["will_published"]) == ("revoked", True, False)
    wills = await read_topics(kafka.bootstrap, kafka_tls(kafka), [topics["event"]])
    assert wills == []  # no will of any of these devices was due
