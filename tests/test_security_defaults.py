"""Anonymous devices are refused by default: a real gateway process with the harness's config
(no ``allow_anonymous`` key), real paho devices."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import BrokerConfig
from gateway.dev.kafka import KafkaState
from tests.harness import (
    DEVICE_PASSWORD,
    KafkaTls,
    device_credentials,
    publish_qos1,
    running_gateway,
    wait_for,
    write_gateway_config,
)

pytestmark = pytest.mark.kafka

# paho 2 reports the MQTT 3.1.1 CONNACK codes 4 and 5 as reason codes 134 and 135.
BAD_CREDENTIALS, NOT_AUTHORIZED = 134, 135


def _connack(port: int, client_id: str, credentials: tuple[str, str] | None) -> int:
    """Connect once (no retries) and return the CONNACK code."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
    codes: list[int] = []
    got = threading.Event()

    def on_connect(*args: object) -> None:
        codes.append(args[3].value)  # type: ignore[attr-defined]
        got.set()

    client.on_connect = on_connect
    if credentials is not None:
        client.username_pw_set(*credentials)
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        wait_for(got.is_set, 15, f"CONNACK for {client_id}")
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


def test_default_config_refuses_anonymous_access() -> None:
    assert BrokerConfig().allow_anonymous is False


def test_anonymous_and_wrong_password_refused_by_default(tmp_path: Path, kafka: KafkaState) -> None:
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=KafkaTls(kafka.ca_file, kafka.cert_file, kafka.key_file),
        topics={"event": "iot.events"},
    )
    assert "allow_anonymous" not in config.read_text()  # the default is what is tested
    with running_gateway(config) as gateway:
        port = gateway.mqtt_port
        assert _connack(port, "anon-1", None) == NOT_AUTHORIZED
        user, _password = device_credentials(port, "dev-1")
        assert _connack(port, "dev-1", (user, "not-the-password")) == BAD_CREDENTIALS
        assert _connack(port, "stranger", ("stranger", DEVICE_PASSWORD)) == BAD_CREDENTIALS
        assert _connack(port, "dev-1", (user, DEVICE_PASSWORD)) == 0
        # A device id not provisioned before the gateway started: added to the password file
        # by the harness, picked up by the running gateway without a restart.
        publish_qos1(port, "late-dev", [("d/late-dev/up/event", b"x")])
        status = gateway.status()["security"]
        assert status["allow_anonymous"] is False
        assert status["auth_failures"] == 3
        audit = (gateway.data_dir / "audit.jsonl").read_text()
        assert "anonymous access is disabled" in audit
        assert "wrong password" in audit
        assert "unknown device" in audit
