"""Device security end to end: `tidegate devices add`, the real gateway process configured
with a TLS listener, a password file, the ACL and anonymous access off, real paho devices,
real Kafka read back."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.dev.kafka import KafkaState
from gateway.pki import init_pki, issue_device_cert
from tests.harness import (
    REPO,
    read_topics,
    running_gateway,
    wait_for,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls

pytestmark = pytest.mark.kafka

PASSWORD = "correct horse battery"


def _devices_add(password_file: Path, device_id: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "devices",
            "add",
            device_id,
            "--file",
            str(password_file),
            "--password-stdin",
        ],
        input=f"{PASSWORD}\n".encode(),
        check=True,
        cwd=REPO,
        capture_output=True,
    )


def _status_text(config: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "status", "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


class Device:
    """A paho device (own network thread) that records CONNACK, PUBACKs and SUBACK codes."""

    def __init__(self, client_id: str) -> None:
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id
        )
        self.connack: list[int] = []
        self.acked: set[int] = set()
        self.granted: dict[int, list[int]] = {}
        self.lock = threading.Lock()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connack.append(rc.value)
        self.client.on_publish = lambda _c, _u, mid, *_a: self._acked(mid)
        self.client.on_subscribe = lambda _c, _u, mid, codes, _p: self.granted.__setitem__(
            mid, [c.value for c in codes]
        )

    def _acked(self, mid: int) -> None:
        with self.lock:
            self.acked.add(mid)

    def connect(self, port: int, **options: Any) -> int:
        if "tls" in options:
            ca, cert, key = options["tls"]
            self.client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        if "username" in options:
            self.client.username_pw_set(options["username"], options.get("password"))
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        wait_for(lambda: self.connack, 10, "CONNACK")
        return self.connack[0]

    def publish_all(self, messages: list[tuple[str, bytes]]) -> None:
        mids = [self.client.publish(topic, payload, qos=1).mid for topic, payload in messages]

        def all_acked() -> bool:
            with self.lock:
                return set(mids) <= self.acked

        wait_for(all_acked, 20, "every PUBACK")

    def subscribe(self, topic: str) -> int:
        _rc, mid = self.client.subscribe(topic, 1)
        wait_for(lambda: mid in self.granted, 10, f"SUBACK {topic}")
        return self.granted[mid][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_authenticated_devices_acl_and_audit_end_to_end(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    events, dlq = kafka_topic_factory("events"), kafka_topic_factory("dlq")
    pki = init_pki(tmp_path / "pki")
    cert, key = issue_device_cert(pki.directory, "dev-tls")
    password_file = tmp_path / "devices.passwd"
    _devices_add(password_file, "dev-a")
    _devices_add(password_file, "dev-b")
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": events, "dlq": dlq},
        extra=f"""
[[broker.listeners]]
name = "mtls"
host = "127.0.0.1"
port = 0
tls = true
cafile = "{pki.ca_cert}"
certfile = "{pki.broker_cert}"
keyfile = "{pki.broker_key}"

[broker]
allow_anonymous = false
password_file = "{password_file}"
on_deny = "puback_discard"

[broker.acl]
enabled = true
""",
    )
    with running_gateway(config) as gateway:
        ports = {entry["name"]: entry["port"] for entry in gateway.runtime["mqtt"]}
        anonymous = Device("dev-anon")
        assert anonymous.connect(ports["tcp"]) == 135  # CONNACK 5, not authorized
        anonymous.close()  # before paho's loop retries
        wrong = Device("dev-b")
        assert wrong.connect(ports["tcp"], username="dev-b", password="nope") == 134  # 4
        wrong.close()  # before paho's loop retries: one refusal, one audit record

        a = Device("dev-a")
        assert a.connect(ports["tcp"], username="dev-a", password=PASSWORD) == 0
        assert a.subscribe("d/dev-b/cmd") == 0x80
        a.publish_all(
            [
                ("d/dev-a/up/event", b"a-1"),
                ("d/dev-b/up/event", b"forged-as-b"),
                ("nowhere/else", b"forged-elsewhere"),
                ("d/dev-a/up/event", b"a-2"),
            ]
        )
        t = Device("dev-tls")
        assert t.connect(ports["mtls"], tls=(pki.ca_cert, cert, key)) == 0
        t.publish_all([("d/dev-tls/up/event", b"tls-1")])
        status = gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "drain")
        status["security"].pop("reload")  # tests/test_reload.py
        assert status["security"] == {
            "auth_failures": 2,
            "tls_handshake_failures": 0,
            "publishes_denied": 2,
            "subscriptions_denied": 1,
            "wills_denied": 0,
            "acl": True,
            "allow_anonymous": False,
        }
        shown = _status_text(config)
        assert "anonymous refused, ACL on; refused: 2 auth, 0 TLS" in shown
        for device in (a, t):
            device.close()
        audit = [
            json.loads(line) for line in (gateway.data_dir / "audit.jsonl").read_text().splitlines()
        ]

    records = await read_topics(kafka.bootstrap, _tls(kafka), [events, dlq])
    assert sorted((r.key, r.value) for r in records) == [
        (b"dev-a", b"a-1"),
        (b"dev-a", b"a-2"),
        (b"dev-tls", b"tls-1"),
    ]
    assert not any(b"forged" in r.value for r in records)
    summary = [
        (r["event"], r["device"], r.get("topic") or r.get("topic_filter") or r.get("reason"))
        for r in audit
    ]
    assert summary == [
        ("auth_failure", "dev-anon", "anonymous access is disabled"),
        ("auth_failure", "dev-b", "wrong password"),
        ("subscribe_denied", "dev-a", "d/dev-b/cmd"),
        ("publish_denied", "dev-a", "d/dev-b/up/event"),
        ("publish_denied", "dev-a", "nowhere/else"),
    ]
