"""Revocation and rotation without restart (SIGHUP): the real gateway process, a TLS listener
with the dev CA, a password file, real paho devices that stay connected through the reload,
raw sockets for the reconnect attempts. Pure parts first."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from paho.mqtt.enums import CallbackAPIVersion

from edge.passwords import read_entries, write_entries
from edge.revocation import (
    PeerIdentity,
    Revocation,
    RevocationError,
    certificate_identity,
    issued_by_any,
    normalise_fingerprint,
    read_ca_bundle,
    read_deny_file,
    session_verdict,
)
from gateway.config import parse_config
from gateway.dev.kafka import KafkaState
from gateway.pki import init_pki, issue_crl, issue_device_cert
from gateway.reload import merge_config
from tests.harness import (
    DEVICE_PASSWORD,
    GatewayProcess,
    kafka_tls,
    run_cli,
    running_gateway,
    wait_for,
    write_gateway_config,
)
from tests.test_edge_broker import connect_packet

FP = "ab" * 32

# -- pure ---------------------------------------------------------------------------------


def test_deny_file_ids_and_fingerprints(tmp_path: Path) -> None:
    path = tmp_path / "deny"
    colons = ":".join(["AB"] * 32)
    path.write_text(f"# header\ndev-1   # stolen\n\nsha256:{colons}\n")
    assert read_deny_file(path) == (frozenset({"dev-1"}), frozenset({FP}))
    path.write_text("sha256:abc\n")
    with pytest.raises(RevocationError, match=r"deny:1: not a SHA-256"):
        read_deny_file(path)
    path.write_text("two words\n")
    with pytest.raises(RevocationError, match="one device id"):
        read_deny_file(path)
    assert normalise_fingerprint(FP.upper()) == FP


def test_session_verdicts() -> None:
    revocation = Revocation(
        device_ids=frozenset({"gone"}),
        fingerprints=frozenset({FP}),
        crl_serials=frozenset({(b"issuer", 7)}),
    )
    passwords = {"pw": "hash-1"}

    def verdict(identity: PeerIdentity, *, anonymous: bool = False) -> str | None:
        return session_verdict(identity, revocation, passwords=passwords, allow_anonymous=anonymous)

    assert verdict(PeerIdentity("gone", "password", credential="x")) == (
        "device id revoked (deny list)"
    )
    assert verdict(PeerIdentity("c", "certificate", fingerprint=FP)) == (
        "certificate revoked (deny list fingerprint)"
    )
    crl = PeerIdentity("c", "certificate", fingerprint="0" * 64, serial=7, issuer=b"issuer")
    assert verdict(crl) == "certificate revoked (CRL)"
    other_ca = PeerIdentity("c", "certificate", fingerprint="0" * 64, serial=7, issuer=b"x")
    assert verdict(other_ca) is None
    assert verdict(PeerIdentity("pw", "password", credential="hash-1")) is None
    assert verdict(PeerIdentity("pw", "password", credential="hash-0")) == "password changed"
    assert verdict(PeerIdentity("new", "password", credential="h")) == (
        "removed from the password file"
    )
    assert verdict(PeerIdentity("a", "anonymous")) == "anonymous access turned off"
    assert verdict(PeerIdentity("a", "anonymous"), anonymous=True) is None


def test_merge_config_applies_security_and_lists_the_rest() -> None:
    kafka = {"bootstrap_servers": ["127.0.0.1:9093"], "tls": dict.fromkeys(
        ("cafile", "certfile", "keyfile"), "x.pem"
    )}  # fmt: skip
    old = parse_config({"kafka": kafka}, check_files=False)
    new = parse_config(
        {
            "kafka": {**kafka, "linger_ms": 50},
            "broker": {
                "allow_anonymous": True,
                "acl": {"enabled": True},
                "listeners": [{"name": "default", "port": 1999}],
                "max_inflight_per_session": 8,
            },
        },
        check_files=False,
    )
    merged, restart = merge_config(old, new)
    assert merged.broker.allow_anonymous
    assert merged.broker.acl.enabled
    assert merged.broker.listeners == old.broker.listeners  # a new port needs a restart
    assert merged.broker.max_inflight_per_session == old.broker.max_inflight_per_session
    assert merged.kafka == old.kafka
    assert sorted(restart) == ["broker.listeners", "broker.max_inflight_per_session", "kafka"]


# -- end to end -----------------------------------------------------------------------------


class LiveDevice:
    """A paho device that must stay on one connection: records CONNACKs, disconnects and
    PUBACKs; paho's own reconnect is pushed past the test."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id
        )
        self.client.reconnect_delay_set(min_delay=120, max_delay=120)
        self.connacks: list[int] = []
        self.disconnected = threading.Event()
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.append(rc.value)
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.on_publish = lambda _c, _u, mid, *_a: self._acked(mid)

    def _acked(self, mid: int) -> None:
        with self.lock:
            self.acked.add(mid)

    def connect(self, port: int, tls: tuple[Path, Path, Path] | None = None) -> LiveDevice:
        if tls is None:
            self.client.username_pw_set(self.client_id, DEVICE_PASSWORD)
        else:
            ca, cert, key = tls
            self.client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        wait_for(lambda: self.connacks, 15, f"{self.client_id} CONNACK")
        assert self.connacks == [0], self.connacks
        return self

    def publish(self, count: int) -> list[int]:
        """Send ``count`` QoS 1 messages without waiting; their message ids."""
        return [
            self.client.publish(f"d/{self.client_id}/up/event", f"m{i}".encode(), qos=1).mid
            for i in range(count)
        ]

    def publish_acked(self, count: int, earlier: list[int] | None = None) -> None:
        """Send ``count`` more and wait for their PUBACKs (and those of ``earlier``)."""
        mids = [*(earlier or []), *self.publish(count)]

        def done() -> bool:
            with self.lock:
                return set(mids) <= self.acked

        wait_for(done, 20, f"{self.client_id}: PUBACK of {count} messages")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _attempt(port: int, client_id: str, *, tls: ssl.SSLContext | None = None) -> str:
    """One fresh CONNECT (password devices send the harness password); what came back."""
    credentials = {} if tls else {"username": client_id, "password": DEVICE_PASSWORD}
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            sock = raw if tls is None else tls.wrap_socket(raw, server_hostname="localhost")
            sock.sendall(connect_packet(client_id, **credentials))
            data = sock.recv(4)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return f"closed ({type(exc).__name__})"
    return f"connack {data[3]}" if len(data) == 4 else "closed"


def _client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def _reload(gateway: GatewayProcess) -> dict[str, Any]:
    before = gateway.status()["security"]["reload"]
    count = before["reloads"] + before["failures"]
    os.kill(gateway.runtime["pid"], signal.SIGHUP)
    status = gateway.wait_status(
        lambda s: s["security"]["reload"]["reloads"] + s["security"]["reload"]["failures"] > count,
        30,
        "the reload to finish",
    )
    last: dict[str, Any] = status["security"]["reload"]["last"]
    return last


def _fingerprint(cert: Path) -> str:
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


@pytest.mark.kafka
def test_sighup_disconnects_revoked_devices_and_keeps_the_others(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    events = kafka_topic_factory("events")
    pki = init_pki(tmp_path / "pki")
    certs = {d: issue_device_cert(pki.directory, d) for d in ("tls-ok", "tls-fp", "tls-crl")}
    deny = tmp_path / "deny.txt"
    deny.write_text("# revoked devices\n")
    extra = f"""
[[broker.listeners]]
name = "mtls"
host = "127.0.0.1"
port = 0
tls = true
cafile = "{pki.ca_cert}"
certfile = "{pki.broker_cert}"
keyfile = "{pki.broker_key}"

[broker.revocation]
deny_file = "{deny}"
"""
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=kafka_tls(kafka),
        topics={"event": events},
        devices=["pw-ok1", "pw-ok2", "pw-gone"],
        extra=extra,
    )
    live: dict[str, LiveDevice] = {}
    with running_gateway(config) as gateway:
        ports = {entry["name"]: entry["port"] for entry in gateway.runtime["mqtt"]}
        try:
            for device in ("pw-ok1", "pw-ok2", "pw-gone"):
                live[device] = LiveDevice(device).connect(ports["tcp"])
            for device, (cert, key) in certs.items():
                live[device] = LiveDevice(device).connect(ports["mtls"], (pki.ca_cert, cert, key))
            for device in live.values():
                device.publish_acked(3)

            # Revoke: a fingerprint in the deny list, a CRL, a device out of the password file.
            deny.write_text(f"# revoked devices\nsha256:{_fingerprint(certs['tls-fp'][0])}\n")
            crl = issue_crl(pki.directory, [certs["tls-crl"][0]], tmp_path / "devices.crl")
            config.write_text(config.read_text() + f'crl_file = "{crl}"\n')
            passwords = config.parent / "devices.passwd"
            entries = read_entries(passwords)
            del entries["pw-gone"]
            write_entries(passwords, entries)
            keepers = ("pw-ok1", "pw-ok2", "tls-ok")
            in_flight = {k: live[k].publish(20) for k in keepers}  # publishing across SIGHUP
            result = _reload(gateway)
            assert result["ok"], result
            assert sorted((d["device"], d["reason"]) for d in result["disconnected"]) == [
                ("pw-gone", "removed from the password file"),
                ("tls-crl", "certificate revoked (CRL)"),
                ("tls-fp", "certificate revoked (deny list fingerprint)"),
            ]
            assert "broker.revocation" in result["changed"]
            assert result["restart_needed"] == []

            for revoked in ("pw-gone", "tls-crl", "tls-fp"):
                assert live[revoked].disconnected.wait(10), f"{revoked} still connected"
            # The others: same connection (one CONNACK, no disconnect), still acknowledged.
            for keeper in keepers:
                live[keeper].publish_acked(5, earlier=in_flight[keeper])
                assert live[keeper].connacks == [0]
                assert not live[keeper].disconnected.is_set()

            # Reconnecting is refused; a valid certificate still gets through the CRL check.
            ca = pki.ca_cert
            assert _attempt(ports["tcp"], "pw-gone") == "connack 4"
            assert (
                _attempt(ports["mtls"], "tls-fp", tls=_client_context(ca, *certs["tls-fp"]))
                == "connack 5"
            )
            assert _attempt(
                ports["mtls"], "tls-crl", tls=_client_context(ca, *certs["tls-crl"])
            ).startswith("closed")
            fresh = _client_context(ca, *issue_device_cert(pki.directory, "tls-new"))
            assert _attempt(ports["mtls"], "tls-new", tls=fresh) == "connack 0"
        finally:
            for device in live.values():
                device.close()
        audit = (gateway.data_dir / "audit.jsonl").read_text()
        security = gateway.status()["security"]
    assert audit.count('"event":"device_disconnected"') == 3
    assert '"event":"security_reload"' in audit
    assert security["reload"]["reloads"] == 1


@pytest.mark.kafka
def test_invalid_reload_keeps_the_old_configuration_and_says_why(
    tmp_path: Path, kafka: KafkaState
) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_text("pw-revoked\n")
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=kafka_tls(kafka),
        topics={"event": "iot.events"},
        devices=["pw-a", "pw-revoked"],
        extra=f'\n[broker.revocation]\ndeny_file = "{deny}"\n',
    )
    good = config.read_text()
    with running_gateway(config) as gateway:
        port = gateway.mqtt_port
        device = LiveDevice("pw-a").connect(port)
        try:
            assert _attempt(port, "pw-revoked") == "connack 5"
            deny.write_text("sha256:not-hex\n")  # invalid deny list
            result = _reload(gateway)
            assert not result["ok"]
            assert "deny.txt:1: not a SHA-256 fingerprint" in result["error"]
            assert _attempt(port, "pw-revoked") == "connack 5"  # the old list still holds

            deny.write_text("pw-revoked\n")
            (tmp_path / "gateway.toml.ok").write_text(good)  # for `tidegate status -c`
            config.write_text(good + "\n[broker.acl\n")  # a TOML syntax error
            result = _reload(gateway)
            assert not result["ok"]
            assert "(syntax)" in result["error"]
            shown = run_cli("status", "-c", str(tmp_path / "gateway.toml.ok"))
            assert "FAILED, previous configuration kept" in shown.stdout, shown

            # A valid file with a change a reload cannot apply: applied the rest, says so.
            config.write_text(good.replace("retry_backoff_max_s = 1.0", "retry_backoff_max_s = 2"))
            shown = run_cli("reload", "-c", str(config))  # SIGHUP and wait, as an operator
            assert shown.returncode == 0, shown
            assert "not applied, restart needed: kafka" in shown.stdout
            result = gateway.status()["security"]["reload"]["last"]
            assert result["ok"], result
            assert result["restart_needed"] == ["kafka"]
            assert result["disconnected"] == []

            device.publish_acked(3)  # the same connection throughout
            assert device.connacks == [0]
            assert not device.disconnected.is_set()
        finally:
            device.close()
        status = gateway.status()["security"]["reload"]
        audit = (gateway.data_dir / "audit.jsonl").read_text()
    assert (status["reloads"], status["failures"]) == (1, 2)
    assert audit.count('"event":"security_reload_failed"') == 2


@pytest.mark.kafka
def test_acl_change_applies_to_publishes_and_removes_subscriptions(
    tmp_path: Path, kafka: KafkaState
) -> None:
    acl = """
[broker.acl]
enabled = true
publish = ["broadcast/#", "d/+/fw/#"]
subscribe = ["broadcast/#"]
"""
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=kafka_tls(kafka),
        topics={"event": "iot.events"},
        devices=["sub", "pub"],
        extra=acl,
    )
    received: list[str] = []
    with running_gateway(config) as gateway:
        port = gateway.mqtt_port
        sub, pub = LiveDevice("sub").connect(port), LiveDevice("pub").connect(port)
        try:
            granted: list[list[int]] = []
            sub.client.on_subscribe = lambda _c, _u, _m, codes, _p: granted.append(
                [c.value for c in codes]
            )
            sub.client.on_message = lambda _c, _u, message: received.append(message.topic)
            sub.client.subscribe([("broadcast/#", 1), ("d/sub/fw/#", 1)])
            wait_for(lambda: granted, 10, "SUBACK")
            assert granted == [[1, 1]]

            def send(topic: str) -> None:
                info = pub.client.publish(topic, b"x", qos=1)
                wait_for(lambda: info.mid in pub.acked, 10, f"PUBACK {topic}")

            send("broadcast/1")
            send("d/sub/fw/1")
            wait_for(lambda: "d/sub/fw/1" in received, 10, "fw/1 delivered")
            assert received == ["broadcast/1", "d/sub/fw/1"]

            # The subscribe rule goes (the publish rules stay).
            config.write_text(config.read_text().replace('subscribe = ["broadcast/#"]', ""))
            result = _reload(gateway)
            assert result["ok"], result
            assert result["subscriptions_dropped"] == [
                {"device": "sub", "topic_filter": "broadcast/#"}
            ]
            assert result["disconnected"] == []
            send("broadcast/2")
            send("d/sub/fw/2")  # a barrier: broadcasts leave one queue, in order
            wait_for(lambda: "d/sub/fw/2" in received, 10, "fw/2 delivered")
            assert received == ["broadcast/1", "d/sub/fw/1", "d/sub/fw/2"]
            assert sub.connacks == [0]
            assert not sub.disconnected.is_set()
        finally:
            sub.close()
            pub.close()
        audit = (gateway.data_dir / "audit.jsonl").read_text()
    assert '"event":"subscription_revoked","device":"sub","topic_filter":"broadcast/#"' in audit


def test_certificates_are_rechecked_against_a_changed_ca_bundle(tmp_path: Path) -> None:
    old_ca, new_ca = init_pki(tmp_path / "old"), init_pki(tmp_path / "new")
    cert, _key = issue_device_cert(old_ca.directory, "dev")
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
    identity = certificate_identity("dev", der)
    assert identity.certificate == der
    old_bundle = read_ca_bundle(old_ca.ca_cert)
    both = [*old_bundle, *read_ca_bundle(new_ca.ca_cert)]
    assert issued_by_any(der, both)
    assert not issued_by_any(der, read_ca_bundle(new_ca.ca_cert))

    def verdict(cas: list[x509.Certificate] | None) -> str | None:
        return session_verdict(
            identity, Revocation(), passwords=None, allow_anonymous=False, trusted_cas=cas
        )

    assert verdict(None) is None  # bundle unchanged: not re-checked
    assert verdict(both) is None
    assert verdict(read_ca_bundle(new_ca.ca_cert)) == (
        "certificate no longer trusted (CA bundle changed)"
    )


@pytest.mark.kafka
def test_ca_bundle_rotation_applies_to_new_handshakes_and_connected_devices(
    tmp_path: Path, kafka: KafkaState
) -> None:
    old_ca, new_ca = init_pki(tmp_path / "old"), init_pki(tmp_path / "new")
    bundle = tmp_path / "device-cas.pem"
    bundle.write_bytes(old_ca.ca_cert.read_bytes() + new_ca.ca_cert.read_bytes())
    old_cert = issue_device_cert(old_ca.directory, "dev-old")
    new_cert = issue_device_cert(new_ca.directory, "dev-new")
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=kafka_tls(kafka),
        topics={"event": "iot.events"},
        extra=f"""
[[broker.listeners]]
name = "mtls"
host = "127.0.0.1"
port = 0
tls = true
cafile = "{bundle}"
certfile = "{old_ca.broker_cert}"
keyfile = "{old_ca.broker_key}"
""",
    )
    server_ca = old_ca.ca_cert  # what the devices trust the gateway's certificate with
    with running_gateway(config) as gateway:
        port = next(e["port"] for e in gateway.runtime["mqtt"] if e["name"] == "mtls")
        devices = {
            "dev-old": LiveDevice("dev-old").connect(port, (server_ca, *old_cert)),
            "dev-new": LiveDevice("dev-new").connect(port, (server_ca, *new_cert)),
        }
        try:
            bundle.write_bytes(new_ca.ca_cert.read_bytes())  # the old CA is retired
            result = _reload(gateway)
            assert result["ok"], result
            assert result["disconnected"] == [
                {"device": "dev-old", "reason": "certificate no longer trusted (CA bundle changed)"}
            ]
            assert devices["dev-old"].disconnected.wait(10)
            devices["dev-new"].publish_acked(3)
            assert devices["dev-new"].connacks == [0]
            assert not devices["dev-new"].disconnected.is_set()
            # New handshakes use the new bundle.
            old_tls = _client_context(server_ca, *old_cert)
            assert _attempt(port, "dev-old", tls=old_tls).startswith("closed")
            new_tls = _client_context(server_ca, *new_cert)
            assert _attempt(port, "dev-new", tls=new_tls) == "connack 0"
        finally:
            for device in devices.values():
                device.close()
