"""The README's demo, and a 1,000-device fleet against the real gateway from one command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.dev.kafka import KafkaState
from tests.harness import REPO, KafkaTls, running_gateway, sim_args, write_gateway_config

pytestmark = pytest.mark.kafka


def test_demo_end_to_end(tmp_path: Path) -> None:
    """`tidegate demo` exactly as scripts/demo runs it: its own Kafka, 100 x 100 QoS1."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert (
        "acknowledged=10000 in_kafka=10000 missing=0 duplicates=0 out_of_order=0 not_in_ledger=0"
        in output
    ), output
    # It stopped what it started: no Kafka state left behind.
    assert not (tmp_path / "demo" / "kafka" / "state.json").exists()


def test_thousand_devices_from_one_command(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: object
) -> None:
    assert callable(kafka_topic_factory)
    telemetry = kafka_topic_factory("telemetry")
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=KafkaTls(kafka.ca_file, kafka.cert_file, kafka.key_file),
        topics={"telemetry": telemetry},
    )
    ledger = tmp_path / "acks.jsonl"
    with running_gateway(config) as gateway:
        sim = subprocess.run(
            [
                sys.executable, "-m", "gateway.cli", "sim",
                *sim_args(gateway.mqtt_port, 1000),
                "--count", "3", "--classes", "telemetry",
                "--ledger", str(ledger), "--quiet",
            ],
            capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
        )  # fmt: skip
        assert sim.returncode == 0, sim.stdout + sim.stderr
        verify = subprocess.run(
            [
                sys.executable, "-m", "gateway.cli", "verify",
                "-c", str(config), "--ledger", str(ledger), "--topic", telemetry,
                "--wait", "60", "--strict",
            ],
            capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
        )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "acknowledged=3000 in_kafka=3000 missing=0 duplicates=0 out_of_order=0" in verify.stdout
