"""Device authentication and the topic ACL in the embedded broker: real amqtt, real sockets on
port 0, real TLS (certificates from gateway.pki), real paho clients.

Negative checks use barriers: a refused CONNECT is observed as its CONNACK code or the closed
socket; "nothing was stored" is checked after a later publish on the same connection was
acknowledged (acks leave in arrival order, so the denied one was handled before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.acl import AclPolicy
from edge.audit import AuditLog
from edge.broker import EdgeBroker
from edge.broker_state import Security
from edge.device_auth import server_tls_context
from edge.mqtt_wire import PUBACK, PUBCOMP, PUBREC, PUBREL
from edge.passwords import hash_password, write_entries
from gateway.pki import PkiPaths, init_pki, issue_device_cert
from tests.test_edge_broker import (
    CONNACK,
    HOST,
    FakeSink,
    RawClient,
    ack_packet,
    connect_packet,
    eventually,
    publish_packet,
)

pytestmark = pytest.mark.timeout(60)

PASSWORD = "correct horse battery"
# paho 2 reports the MQTT 3.1.1 CONNACK codes 4 and 5 as reason codes 134 and 135.
BAD_CREDENTIALS = 134
NOT_AUTHORIZED = 135


@dataclass
class Pki:
    paths: PkiPaths
    foreign: Path
    """Directory of a second, unrelated CA."""

    def device(self, device_id: str, *, foreign: bool = False) -> tuple[Path, Path]:
        return issue_device_cert(self.foreign if foreign else self.paths.directory, device_id)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    paths = init_pki(base / "ca")
    init_pki(base / "other-ca")
    return Pki(paths, base / "other-ca")


class PahoDevice:
    """paho 2.x over TLS or TCP, network loop in its own thread; records CONNACK codes."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id
        )
        self.connack: list[int] = []
        self.acked: list[int] = []
        self.granted: dict[int, list[int]] = {}
        self.disconnected = threading.Event()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connack.append(rc.value)
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.on_publish = lambda _c, _u, mid, *_a: self.acked.append(mid)
        self.client.on_subscribe = lambda _c, _u, mid, codes, _p: self.granted.__setitem__(
            mid, [code.value for code in codes]
        )

    async def connect(
        self,
        port: int,
        *,
        tls: tuple[Path, Path, Path] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> int:
        """Connect and return the CONNACK code (0 accepted)."""
        if tls is not None:
            ca, cert, key = tls
            self.client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        if username is not None:
            self.client.username_pw_set(username, password)
        await asyncio.to_thread(self.client.connect, HOST, port, 30)
        self.client.loop_start()
        await eventually(lambda: self.connack, f"{self.client_id} CONNACK")
        return self.connack[0]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        info = self.client.publish(topic, payload, qos=qos)
        return int(info.mid)

    async def subscribe(self, topic: str) -> int:
        _rc, mid = self.client.subscribe(topic, 1)
        await eventually(lambda: mid in self.granted, f"SUBACK for {topic}")
        return self.granted[mid][0]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


class Env:
    """One test's brokers and clients (closed at the end)."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.tmp_path = tmp_path
        self.name = name
        self.brokers: list[EdgeBroker] = []
        self.devices: list[PahoDevice] = []
        self.raw_clients: list[RawClient] = []
        self.audit = AuditLog(tmp_path / "audit.jsonl")
        self.password_file = tmp_path / "passwords"

    def set_passwords(self, **passwords: str) -> None:
        write_entries(self.password_file, {d: hash_password(p) for d, p in passwords.items()})

    async def broker(
        self,
        sink: FakeSink,
        *,
        pki: Pki | None = None,
        acl: AclPolicy | None = None,
        on_deny: str = "puback_discard",
        **options: Any,
    ) -> EdgeBroker:
        listeners = [("tcp", HOST, 0)]
        tls = {}
        if pki is not None:
            listeners.append(("tls", HOST, 0))
            p = pki.paths
            tls["tls"] = server_tls_context(p.ca_cert, p.broker_cert, p.broker_key)
        broker = EdgeBroker(
            listeners=listeners,
            sink=sink,
            observer=None,
            max_inflight_per_session=16,
            tls=tls,
            security=Security(acl=acl, on_deny=on_deny, audit=self.audit),
            **options,
        )
        self.brokers.append(broker)
        await broker.start()
        return broker

    def device(self, client_id: str) -> PahoDevice:
        device = PahoDevice(client_id)
        self.devices.append(device)
        return device

    async def raw(self, broker: EdgeBroker, client_id: str, **options: Any) -> RawClient:
        client = await RawClient.connect(broker.bound_addresses["tcp"][1], client_id, **options)
        self.raw_clients.append(client)
        return client

    async def close(self) -> None:
        for device in self.devices:
            await device.close()
        for client in self.raw_clients:
            await client.close()
        for broker in self.brokers:
            await broker.stop()


@pytest.fixture
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    e = Env(tmp_path, request.node.name.replace("[", "-").replace("]", ""))
    try:
        yield e
    finally:
        await e.close()


def port(broker: EdgeBroker, name: str) -> int:
    return broker.bound_addresses[name][1]


async def tls_attempt(
    broker: EdgeBroker, pki: Pki, client_id: str, cert: tuple[Path, Path] | None
) -> str:
    """Open a TLS connection, send CONNECT, report what came back (never raises)."""
    context = ssl.create_default_context(cafile=str(pki.paths.ca_cert))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    writer = None
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(HOST, port(broker, "tls"), ssl=context)
            writer.write(connect_packet(client_id))
            await writer.drain()
            data = await reader.read(4)
    except (ssl.SSLError, ConnectionError, OSError):
        return "refused in TLS handshake"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    if not data:
        return "closed"
    assert data[0] >> 4 == CONNACK, data
    return f"connack {data[3]}"


def audit_events(env: Env, event: str) -> list[dict[str, Any]]:
    return [record for record in env.audit.read() if record["event"] == event]


# -- TLS listener -----------------------------------------------------------------------------


async def test_tls_device_with_matching_certificate_connects_and_publishes(
    env: Env, pki: Pki
) -> None:
    sink = FakeSink()
    broker = await env.broker(sink, pki=pki, allow_anonymous=False)
    cert, key = pki.device("tls-good")
    device = env.device("tls-good")
    assert await device.connect(port(broker, "tls"), tls=(pki.paths.ca_cert, cert, key)) == 0
    mid = device.publish("d/tls-good/up/event", b"hello")
    await eventually(lambda: mid in device.acked, "PUBACK over TLS")
    assert [(p.device_id, p.payload) for p in sink.received] == [("tls-good", b"hello")]


@pytest.mark.parametrize("case", ["no-certificate", "foreign-ca", "cn-differs"])
async def test_tls_listener_refuses_devices_without_a_valid_matching_certificate(
    env: Env, pki: Pki, case: str
) -> None:
    sink = FakeSink()
    broker = await env.broker(sink, pki=pki, allow_anonymous=True)  # TLS does not fall back
    client_id = f"tls-{case}"
    if case == "no-certificate":
        cert = None
    elif case == "foreign-ca":
        cert = pki.device(client_id, foreign=True)
    else:
        cert = pki.device("someone-else")
    outcome = await tls_attempt(broker, pki, client_id, cert)
    if case == "cn-differs":
        assert outcome == "connack 5"  # not authorized
        [record] = audit_events(env, "auth_failure")
        assert record["device"] == client_id
        assert "someone-else" in record["reason"]
        assert broker.stats.auth_failures == 1
    else:
        assert outcome in ("refused in TLS handshake", "closed")
        await eventually(lambda: audit_events(env, "tls_handshake_failed"), "audit record")
        [record] = audit_events(env, "tls_handshake_failed")
        assert record["listener"] == "tls"
        expected = "CERTIFICATE" if case == "no-certificate" else "CERTIFICATE_VERIFY_FAILED"
        assert expected in record["reason"]
        assert broker.stats.tls_handshake_failures == 1
    assert broker.stats.sessions_started == 0
    assert client_id not in broker.amqtt_broker.sessions
    # The plain listener next to it still serves (anonymous allowed here), so the refusals
    # above were decisions, not a broken broker.
    ok = await env.raw(broker, "plain-ok")
    await ok.ping()


# -- passwords ----------------------------------------------------------------------------------


async def test_password_authentication(env: Env) -> None:
    env.set_passwords(**{"pw-a": PASSWORD})
    sink = FakeSink()
    broker = await env.broker(sink, allow_anonymous=False, password_file=env.password_file)
    tcp = port(broker, "tcp")

    good = env.device("pw-a")
    assert await good.connect(tcp, username="pw-a", password=PASSWORD) == 0
    wrong = env.device("pw-a")  # same device id, wrong password
    assert await wrong.connect(tcp, username="pw-a", password="not the password") == BAD_CREDENTIALS
    await wrong.close()  # before paho's loop retries: one refusal, one audit record
    mismatch = env.device("pw-b")
    assert await mismatch.connect(tcp, username="pw-a", password=PASSWORD) == NOT_AUTHORIZED
    await mismatch.close()
    anonymous = env.device("pw-anon")
    assert await anonymous.connect(tcp) == NOT_AUTHORIZED
    await anonymous.close()

    mid = good.publish("d/pw-a/up/event", b"still here")
    await eventually(lambda: mid in good.acked, "PUBACK after the refused impostor")
    assert not good.disconnected.is_set()
    assert [p.device_id for p in sink.received] == ["pw-a"]
    reasons = [(r["device"], r["method"], r["reason"]) for r in audit_events(env, "auth_failure")]
    assert reasons == [
        ("pw-a", "password", "wrong password"),
        ("pw-b", "password", "user name differs from client id"),
        ("pw-anon", "anonymous", "anonymous access is disabled"),
    ]
    assert broker.stats.auth_failures == 3
    assert "not the password" not in env.audit.path.read_text()


async def test_password_file_change_is_picked_up_without_restart(env: Env) -> None:
    env.set_passwords(**{"early": PASSWORD})
    broker = await env.broker(FakeSink(), allow_anonymous=False, password_file=env.password_file)
    late = env.device("late")
    assert (
        await late.connect(port(broker, "tcp"), username="late", password=PASSWORD)
        == BAD_CREDENTIALS
    )
    await late.close()
    env.set_passwords(**{"early": PASSWORD, "late": PASSWORD})
    again = env.device("late")
    assert await again.connect(port(broker, "tcp"), username="late", password=PASSWORD) == 0


async def test_anonymous_still_accepted_when_allowed_and_no_credentials_configured(
    env: Env,
) -> None:
    broker = await env.broker(FakeSink(), allow_anonymous=True)
    device = env.device("anon-ok")
    assert await device.connect(port(broker, "tcp")) == 0


# -- ACL ------------------------------------------------------------------------------------------


async def test_acl_device_cannot_publish_as_another_or_subscribe_to_its_commands(
    env: Env,
) -> None:
    env.set_passwords(**{"acl-a": PASSWORD, "acl-b": PASSWORD})
    sink = FakeSink()
    broker = await env.broker(
        sink, allow_anonymous=False, password_file=env.password_file, acl=AclPolicy()
    )
    a = env.device("acl-a")
    assert await a.connect(port(broker, "tcp"), username="acl-a", password=PASSWORD) == 0

    assert await a.subscribe("d/acl-b/cmd") == 0x80
    assert await a.subscribe("d/+/cmd") == 0x80
    assert await a.subscribe("d/acl-a/cmd") == 1
    assert await a.subscribe("d/acl-a/fw/#") == 1

    own1 = a.publish("d/acl-a/up/event", b"own-1")
    forged = a.publish("d/acl-b/up/event", b"forged")
    own2 = a.publish("d/acl-a/up/event", b"own-2")
    # puback_discard: the forged publish is acknowledged in its turn, nothing is stored
    await eventually(lambda: {own1, forged, own2} <= set(a.acked), "all three PUBACKs")
    assert a.acked.index(own1) < a.acked.index(forged) < a.acked.index(own2)
    assert [(p.topic, p.payload) for p in sink.received] == [
        ("d/acl-a/up/event", b"own-1"),
        ("d/acl-a/up/event", b"own-2"),
    ]
    assert broker.stats.publishes_denied == 1
    assert broker.stats.subscriptions_denied == 2
    [denied] = audit_events(env, "publish_denied")
    assert (denied["device"], denied["topic"], denied["action"]) == (
        "acl-a",
        "d/acl-b/up/event",
        "puback_discard",
    )
    assert [r["topic_filter"] for r in audit_events(env, "subscribe_denied")] == [
        "d/acl-b/cmd",
        "d/+/cmd",
    ]


async def test_acl_on_deny_disconnect_closes_without_ack(env: Env) -> None:
    sink = FakeSink()
    broker = await env.broker(sink, acl=AclPolicy(), on_deny="disconnect")
    raw = await env.raw(broker, "deny-dc")
    await raw.send(publish_packet("d/deny-dc/up/event", b"ok", qos=1, packet_id=1))
    await raw.expect(PUBACK, 1)
    await raw.send(publish_packet("d/victim/up/event", b"forged", qos=1, packet_id=2))
    await raw.send(publish_packet("d/deny-dc/up/event", b"after", qos=1, packet_id=3))
    await raw.expect_closed()  # no PUBACK for the forged one, nothing after it stored
    assert [p.payload for p in sink.received] == [b"ok"]
    [denied] = audit_events(env, "publish_denied")
    assert denied["action"] == "disconnect"


async def test_acl_extra_rules_with_placeholder(env: Env) -> None:
    sink = FakeSink()
    acl = AclPolicy.with_extra(publish=["site/{device_id}/status"], subscribe=["broadcast/#"])
    broker = await env.broker(sink, acl=acl)
    a = env.device("extra-a")
    assert await a.connect(port(broker, "tcp")) == 0
    assert await a.subscribe("broadcast/alerts") == 1
    assert await a.subscribe("site/extra-a/status") == 0x80
    allowed = a.publish("site/extra-a/status", b"up")
    denied = a.publish("site/extra-b/status", b"forged")
    await eventually(lambda: {allowed, denied} <= set(a.acked), "PUBACKs")
    assert [p.topic for p in sink.received] == ["site/extra-a/status"]


async def test_unauthenticated_connect_cannot_disturb_an_authenticated_session(
    env: Env,
) -> None:
    # amqtt deletes a client id's clean session (and its subscriptions) before asking its
    # auth plugins; our check runs first, so an impostor changes nothing.
    env.set_passwords(**{"victim": PASSWORD})
    broker = await env.broker(FakeSink(), allow_anonymous=False, password_file=env.password_file)
    victim = env.device("victim")
    assert await victim.connect(port(broker, "tcp"), username="victim", password=PASSWORD) == 0
    assert await victim.subscribe("d/victim/cmd") == 1
    impostor = await RawClient.open(port(broker, "tcp"))
    env.raw_clients.append(impostor)
    await impostor.send(connect_packet("victim", username="victim", password="guess"))
    connack = await impostor.read()
    assert connack is not None
    assert (connack.packet_type, connack.body[1]) == (CONNACK, 4)
    await impostor.expect_closed()
    mid = victim.publish("d/victim/up/event", b"x")
    await eventually(lambda: mid in victim.acked, "victim still served")
    assert not victim.disconnected.is_set()
    subscribers = broker.amqtt_broker._subscriptions.get("d/victim/cmd", [])
    assert [session.client_id for session, _qos in subscribers] == ["victim"]


async def test_acl_denied_qos0_and_qos2_publishes_store_nothing(env: Env) -> None:
    sink = FakeSink()
    broker = await env.broker(sink, acl=AclPolicy())
    raw = await env.raw(broker, "deny-q")
    await raw.send(publish_packet("d/other/up/event", b"q0", qos=0))
    await raw.send(publish_packet("d/other/up/event", b"q2", qos=2, packet_id=7))
    await raw.expect(PUBREC, 7)  # acknowledged in its turn, like a stored one
    await raw.send(ack_packet(PUBREL, 7))
    await raw.expect(PUBCOMP, 7)
    await raw.send(publish_packet("d/deny-q/up/event", b"own", qos=1, packet_id=8))
    await raw.expect(PUBACK, 8)  # barrier: everything before it was handled
    assert [p.payload for p in sink.received] == [b"own"]
    assert broker.stats.publishes_denied == 2
    assert [r["qos"] for r in audit_events(env, "publish_denied")] == [0, 2]


async def test_unknown_device_and_missing_password_are_refused(env: Env) -> None:
    env.set_passwords(**{"known": PASSWORD})
    broker = await env.broker(FakeSink(), allow_anonymous=False, password_file=env.password_file)
    for client_id, options in [
        ("stranger", {"username": "stranger", "password": PASSWORD}),
        ("known", {"username": "known"}),
    ]:
        client = await RawClient.open(port(broker, "tcp"))
        env.raw_clients.append(client)
        await client.send(connect_packet(client_id, **options))
        connack = await client.read()
        assert connack is not None
        assert (connack.packet_type, connack.body[1]) == (CONNACK, 4)
        await client.expect_closed()
    reasons = [r["reason"] for r in audit_events(env, "auth_failure")]
    assert reasons == ["unknown device", "no password"]


async def test_tls_listener_closes_a_connection_that_never_starts_the_handshake(
    env: Env, pki: Pki
) -> None:
    broker = await env.broker(FakeSink(), pki=pki, connect_timeout=0.5)
    reader, writer = await asyncio.open_connection(HOST, port(broker, "tls"))
    try:
        async with asyncio.timeout(10):
            try:
                data = await reader.read()
            except ConnectionResetError:  # the gateway aborts the socket
                data = b""
        assert data == b""  # closed by the gateway, nothing sent
    finally:
        writer.close()
    [record] = audit_events(env, "tls_handshake_failed")
    assert record["reason"] == "TimeoutError"
