"""The brokers under test, each started fresh per run as its own process.

A target starts its process on loopback, reports the MQTT port and the pid whose CPU and
memory are measured, optionally waits for work that continues after the last PUBACK
(tidegate: forwarding to Kafka), and stops the process by its pid.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.procs import REPO, Child, free_port, wait_for, wait_port
from gateway.dev.kafka import KafkaState

__all__ = [
    "AmqttTarget",
    "Drain",
    "GatewayTarget",
    "MosquittoTarget",
    "Target",
    "mosquitto_path",
]

_PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class Drain:
    """When the messages of a run had fully left the target (tidegate: acked by Kafka)."""

    done_wall: float
    """time.time() when the admin API first showed everything forwarded and the buffer empty."""
    forwarded: int
    batches: int
    commits: int
    """SQLite group commits so far (warm-up included)."""
    rows_committed: int
    largest_commit: int
    synchronous: str


class Target(Protocol):
    """One broker process per run. ``start`` → load → ``drain`` → ``stop``."""

    name: str

    def start(self, workdir: Path) -> tuple[Child, int]:
        """Start the process; return it and its MQTT port once it accepts connections."""
        ...

    def drain(self, expected: int, timeout_s: float) -> Drain | None:
        """Wait until ``expected`` messages have left the target; None if nothing to wait for."""
        ...

    def stop(self) -> None:
        """Stop the process (idempotent)."""
        ...


def _start_on_free_port(name: str, argv_for: Any, log: Path, cwd: Path = REPO) -> tuple[Child, int]:
    """Start ``argv_for(port)`` on a free port, retrying if the port was taken meanwhile."""
    error: Exception | None = None
    for _ in range(_PORT_ATTEMPTS):
        port = free_port()
        child = Child(name, argv_for(port), log, cwd=cwd)
        try:
            wait_port(child, port)
        except (RuntimeError, TimeoutError) as exc:
            child.stop()
            error = exc
            continue
        return child, port
    raise RuntimeError(f"{name} did not start: {error}")


@dataclass
class AmqttTarget:
    """Bare amqtt 0.12.1 (bench/amqtt_bare.py): no persistence, no Kafka."""

    plugins: str = "default"
    code: Path = REPO
    """Directory the process runs in (its packages are imported from there)."""
    name: str = ""
    _child: Child | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or f"amqtt-{self.plugins}"

    def start(self, workdir: Path) -> tuple[Child, int]:
        def argv(port: int) -> list[str]:
            cmd = "bench.amqtt_bare"
            return [sys.executable, "-m", cmd, "--port", str(port), "--plugins", self.plugins]

        log = workdir / f"{self.name}.log"
        self._child, port = _start_on_free_port(self.name, argv, log, self.code)
        return self._child, port

    def drain(self, expected: int, timeout_s: float) -> Drain | None:
        return None

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop()


def mosquitto_path() -> str | None:
    """The mosquitto binary, if installed."""
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


@dataclass
class MosquittoTarget:
    """Eclipse Mosquitto with a minimal config: one loopback listener, no persistence."""

    binary: str
    name: str = "mosquitto"
    _child: Child | None = field(default=None, repr=False)

    def start(self, workdir: Path) -> tuple[Child, int]:
        def argv(port: int) -> list[str]:
            conf = workdir / f"mosquitto-{port}.conf"
            conf.write_text(
                f"listener {port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence false\n"
                "log_dest stderr\n"
                "log_type error\n"
                "log_type warning\n"
            )
            return [self.binary, "-c", str(conf)]

        self._child, port = _start_on_free_port(self.name, argv, workdir / "mosquitto.log")
        return self._child, port

    def drain(self, expected: int, timeout_s: float) -> Drain | None:
        return None

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop()


def gateway_config(directory: Path, kafka: KafkaState) -> Path:
    """A gateway config on port 0 (MQTT and admin) with the default classes and Kafka
    settings (linger_ms=5, max_batch_bytes=1 MiB, no compression, commit_max_batch=2048)."""
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[gateway]
id = "gw-bench"
data_dir = "{directory / "data"}"

[[broker.listeners]]
name = "tcp"
host = "127.0.0.1"
port = 0

[broker]
allow_anonymous = true  # loopback benchmark, like the bare-amqtt and Mosquitto peers

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


def _publish_one(port: int, device: str, timeout_s: float = 10.0) -> None:
    """One QoS1 message from ``device``, waiting for its PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(f"d/{device}/up/telemetry", b"warm-up", qos=1)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise TimeoutError(f"warm-up message not acknowledged in {timeout_s}s")
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class GatewayProcess:
    """``python -m gateway.cli run -c CONFIG`` and its admin API."""

    child: Child
    data_dir: Path
    runtime: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        admin = self.runtime["admin"]
        url = f"http://{admin['host']}:{admin['port']}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
        return data


@dataclass
class GatewayTarget:
    """The tidegate gateway: durable QoS1 ingest, forwarding to the local Kafka."""

    kafka: KafkaState
    code: Path = REPO
    """Directory the gateway runs in (its packages are imported from there)."""
    name: str = "tidegate"
    _gateway: GatewayProcess | None = field(default=None, repr=False)
    _baseline: int = field(default=0, repr=False)
    """Messages forwarded before the load (the warm-up)."""

    def start(self, workdir: Path) -> tuple[Child, int]:
        directory = workdir / "gateway"
        directory.mkdir()
        config = gateway_config(directory, self.kafka)
        argv = [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)]
        child = Child(self.name, argv, directory / "gateway.log", cwd=self.code)
        gateway = GatewayProcess(child, directory / "data")
        self._gateway = gateway

        def ready() -> dict[str, Any] | None:
            child.check_alive()
            try:
                runtime: dict[str, Any] = json.loads(
                    (gateway.data_dir / "runtime.json").read_text()
                )
            except (OSError, ValueError):
                return None
            return runtime if runtime.get("pid") == child.pid else None

        gateway.runtime = wait_for(ready, 30, "the gateway's runtime.json")
        port = int(gateway.runtime["mqtt"][0]["port"])
        # The producer starts with the first batch. One warm-up message forwarded before the
        # load keeps the first TLS handshake with Kafka out of the end-to-end time.
        _publish_one(port, "warmup-00000")
        wait_for(
            lambda: gateway.status()["kafka"]["forwarded"] >= 1, 30, "the warm-up message in Kafka"
        )
        self._baseline = int(gateway.status()["kafka"]["forwarded"])
        return child, port

    def drain(self, expected: int, timeout_s: float) -> Drain | None:
        gateway = self._gateway
        if gateway is None:
            raise RuntimeError("gateway not started")

        def done() -> Drain | None:
            gateway.child.check_alive()
            status = gateway.status()
            kafka, buffer = status["kafka"], status["buffer"]
            if kafka["forwarded"] >= self._baseline + expected and buffer["rows"] == 0:
                return Drain(
                    done_wall=time.time(),
                    forwarded=int(kafka["forwarded"]),
                    batches=int(kafka["batches"]),
                    commits=int(buffer["commits"]),
                    rows_committed=int(buffer["rows_committed"]),
                    largest_commit=int(buffer["largest_commit"]),
                    synchronous=str(buffer["synchronous"]),
                )
            return None

        return wait_for(done, timeout_s, f"{expected} messages forwarded to Kafka")

    def stop(self) -> None:
        if self._gateway is not None:
            self._gateway.child.stop()
