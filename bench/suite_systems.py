"""The four systems the suite runs side by side, each started fresh per repetition.

- ``mosquitto``: Eclipse Mosquitto (Debian package), no persistence.
- ``amqtt``: bare amqtt 0.12.1 with its default plugins (bench/amqtt_bare.py), no persistence.
- ``naive-bridge``: Mosquitto plus bench/naive_bridge.py (paho → aiokafka, one send per
  message) into the local Kafka; its CPU is the two processes together.
- ``tidegate``: the gateway, durable QoS1 (``synchronous=FULL`` before PUBACK), into the
  local Kafka over mutual TLS.

Systems with Kafka get a fresh topic per repetition (broker-side timestamps, see
bench/suite_kafka.py), so records are counted and timed in Kafka itself.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Child, wait_for
from bench.suite_kafka import count_records, create_topic
from bench.targets import AmqttTarget, MosquittoTarget, _publish_one
from gateway.dev.kafka import KafkaState

__all__ = ["SYSTEMS", "System", "make_system"]

SYSTEMS = ("mosquitto", "amqtt", "naive-bridge", "tidegate")


@dataclass
class System:
    """A started system: its MQTT port, the pids whose CPU counts, its Kafka topic."""

    name: str
    port: int = 0
    children: dict[str, Child] = field(default_factory=dict)
    """role → process; the CPU of all of them is the system's CPU."""
    topic: str | None = None
    kafka: KafkaState | None = None
    baseline: int = 0
    """Records already in ``topic`` before the load (the warm-up)."""
    admin_url: str | None = None
    _stop: list[Any] = field(default_factory=list)

    def pids(self) -> dict[str, int]:
        return {role: child.pid for role, child in self.children.items()}

    def main_pid(self) -> int:
        """The process the memory figure is taken from (the gateway / the broker)."""
        return next(iter(self.children.values())).pid

    def check_alive(self) -> None:
        for child in self.children.values():
            child.check_alive()

    def in_kafka(self) -> int | None:
        """Records of this repetition's load that reached Kafka (None: no Kafka)."""
        if self.kafka is None or self.topic is None:
            return None
        return count_records(self.kafka, self.topic) - self.baseline

    def status(self) -> dict[str, Any]:
        if self.admin_url is None:
            return {}
        with urllib.request.urlopen(self.admin_url, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
        return data

    def stop(self) -> None:
        for stop in reversed(self._stop):
            stop()


def _gateway_config(directory: Path, kafka: KafkaState, topic: str) -> Path:
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[gateway]
id = "gw-bench"
data_dir = "{directory / "data"}"

[broker]
allow_anonymous = true

[[broker.listeners]]
name = "tcp"
host = "127.0.0.1"
port = 0

[classes.telemetry]
kafka_topic = "{topic}"
priority = 5

[classes.event]
kafka_topic = "{topic}"
priority = 8

[kafka]
bootstrap_servers = ["{kafka.bootstrap}"]

[kafka.tls]
cafile = "{kafka.ca_file}"
certfile = "{kafka.cert_file}"
keyfile = "{kafka.key_file}"

[admin]
port = 0
"""
    )
    return path


def _start_gateway(
    system: System, workdir: Path, kafka: KafkaState, code: Path, topic: str
) -> None:
    directory = workdir / "gateway"
    directory.mkdir()
    config = _gateway_config(directory, kafka, topic)
    argv = [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)]
    child = Child("tidegate", argv, directory / "gateway.log", cwd=code)
    system.children["gateway"] = child
    system._stop.append(child.stop)
    runtime_file = directory / "data" / "runtime.json"

    def ready() -> dict[str, Any] | None:
        child.check_alive()
        try:
            runtime: dict[str, Any] = json.loads(runtime_file.read_text())
        except (OSError, ValueError):
            return None
        return runtime if runtime.get("pid") == child.pid else None

    runtime = wait_for(ready, 60, "the gateway's runtime.json")
    system.port = int(runtime["mqtt"][0]["port"])
    admin = runtime["admin"]
    system.admin_url = f"http://{admin['host']}:{admin['port']}/status"


def _start_bridge(system: System, workdir: Path, kafka: KafkaState, code: Path) -> None:
    assert system.topic is not None
    stats = workdir / "naive-bridge.json"
    argv = [
        sys.executable, "-m", "bench.naive_bridge",
        "--mqtt-port", str(system.port),
        "--kafka-state", str(kafka.state_file),
        "--topic", system.topic,
        "--stats", str(stats),
    ]  # fmt: skip
    child = Child("naive-bridge", argv, workdir / "naive-bridge.log", cwd=code)
    system.children["bridge"] = child
    system._stop.append(child.stop)  # stopped in reverse: the bridge before Mosquitto
    wait_for(
        lambda: child.check_alive() and stats.with_suffix(".ready").exists(),
        60,
        "the naive bridge's subscription",
    )


def _warm_up(system: System) -> None:
    """One message through to Kafka before the load: connections and TLS handshakes are
    then out of the figures."""
    _publish_one(system.port, "warmup-00000")
    wait_for(lambda: (system.in_kafka() or 0) >= 1, 60, f"{system.name}'s warm-up in Kafka")
    system.baseline += system.in_kafka() or 0


def make_system(
    name: str, workdir: Path, *, kafka: KafkaState, code: Path, mosquitto: str, rep: int
) -> System:
    """Start ``name`` in ``workdir``; on any failure stop what was started and raise."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}")
    system = System(name)
    try:
        if name in {"mosquitto", "naive-bridge"}:
            target = MosquittoTarget(mosquitto)
            child, system.port = target.start(workdir)
            system.children["mosquitto"] = child
            system._stop.append(child.stop)
        elif name == "amqtt":
            amqtt = AmqttTarget(plugins="default", code=code)
            child, system.port = amqtt.start(workdir)
            system.children["amqtt"] = child
            system._stop.append(child.stop)
        if name in ("naive-bridge", "tidegate"):
            system.kafka = kafka
            system.topic = f"bench.{name}.{rep}.{os.urandom(3).hex()}"
            create_topic(kafka, system.topic)
            if name == "tidegate":
                _start_gateway(system, workdir, kafka, code, system.topic)
            else:
                _start_bridge(system, workdir, kafka, code)
            _warm_up(system)
    except BaseException:
        system.stop()
        raise
    return system
