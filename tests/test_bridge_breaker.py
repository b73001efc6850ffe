"""The circuit breaker in a running gateway: Kafka unreachable → open, visible in status."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.dev.kafka import KafkaState
from tests.harness import (
    REPO,
    KafkaTls,
    device_credentials,
    running_gateway,
    write_gateway_config,
)

pytestmark = pytest.mark.kafka


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_breaker_opens_while_kafka_is_unreachable_and_status_shows_it(
    tmp_path: Path, kafka: KafkaState
) -> None:
    config = write_gateway_config(
        tmp_path,
        bootstrap=f"127.0.0.1:{_dead_port()}",
        tls=KafkaTls(kafka.ca_file, kafka.cert_file, kafka.key_file),
        topics={"event": "iot.events"},
        extra="",
    )
    # A small failure threshold so the test does not wait through the retry ladder.
    text = config.read_text().replace(
        "retry_backoff_max_s = 1.0\n", "retry_backoff_max_s = 30.0\nbreaker_failures = 2\n"
    )
    config.write_text(text)
    with running_gateway(config) as gateway:
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="dev-b"
        )
        client.username_pw_set(*device_credentials(gateway.mqtt_port, "dev-b"))
        client.connect("127.0.0.1", gateway.mqtt_port)
        client.loop_start()
        try:
            info = client.publish("d/dev-b/up/event", b"kept", qos=1)
            info.wait_for_publish(timeout=20)
            assert info.is_published()  # acknowledged from disk: Kafka is not needed for that
        finally:
            client.disconnect()
            client.loop_stop()
        status = gateway.wait_status(
            lambda s: s["kafka"]["breaker"]["state"] == "open", 60, "the breaker to open"
        )
        breaker = status["kafka"]["breaker"]
        assert breaker["consecutive_failures"] >= 2
        assert breaker["next_probe_in_s"] is not None
        assert breaker["next_probe_in_s"] <= 30.0
        assert status["buffer"]["rows"] == 1
        assert status["kafka"]["delivery"] == "at_least_once"
        # While open, no attempt is made: the failure count stays put until the probe.
        failures = breaker["consecutive_failures"]
        again = gateway.status()["kafka"]["breaker"]
        assert again["state"] != "open" or again["consecutive_failures"] == failures
        shown = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "status", "-c", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert "breaker" in shown.stdout
        assert "open" in shown.stdout
