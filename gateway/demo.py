"""``tidegate demo``: the whole product in one command, on embedded defaults.

Certificates → local Kafka (mutual TLS) → the gateway (``configs/dev.toml``) → a simulated
fleet publishing QoS1 → wait for the buffer to drain → the verifier's table. Everything it
started is stopped at the end, also on failure or Ctrl-C. Each step is a real process run
through the same CLI a user would type, so the demo shows exactly what users get.

Anonymous devices are refused (the default), so the demo provisions its fleet first: a
password file in the work directory with the simulator's device ids, all sharing one random
password made for this run (one scrypt hash reused for every id: hashing 1,000 passwords one
by one would take a minute). The simulator gets the password through its environment
(``TIDEGATE_SIM_PASSWORD``), not its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_sim.options import device_id
from edge.passwords import hash_password, write_entries
from gateway.app import read_runtime
from gateway.dev.kafka import KafkaState, read_state, start_kafka, stop_kafka
from gateway.errors import TidegateError
from gateway.pki import init_pki

__all__ = ["DemoError", "DemoOptions", "run_demo"]

REPO = Path(__file__).resolve().parents[1]
DEV_CONFIG = REPO / "configs" / "dev.toml"


class DemoError(TidegateError):
    """A demo step failed; the message says which."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    workdir: Path
    devices: int = 100
    count: int = 100
    kafka_state: Path | None = None
    """Reuse a running local Kafka instead of starting one (tests)."""
    drain_timeout_s: float = 180.0


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


@contextlib.contextmanager
def _kafka(options: DemoOptions, pki_dir: Path) -> Iterator[KafkaState]:
    if options.kafka_state is not None:
        yield read_state(options.kafka_state)
        return
    _say("starting the local Apache Kafka (first run downloads it from Maven Central)")
    started = time.monotonic()
    state = start_kafka(options.workdir / "kafka", pki_dir)
    _say(f"Kafka {state.version} up at {state.bootstrap} in {time.monotonic() - started:.1f} s")
    try:
        yield state
    finally:
        _say("stopping Kafka")
        stop_kafka(state.state_file)


@contextlib.contextmanager
def _gateway(env: dict[str, str], data_dir: Path, log_path: Path) -> Iterator[dict[str, Any]]:
    _say(f"starting the gateway (configs/dev.toml, log: {log_path})")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            _cli("run", "-c", str(DEV_CONFIG)), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            runtime = read_runtime(data_dir)
            if runtime and runtime.get("pid") == proc.pid:
                break
            if proc.poll() is not None:
                raise DemoError(f"the gateway exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise DemoError(f"the gateway did not start within 60 s; see {log_path}")
            time.sleep(0.1)
        yield runtime
    finally:
        if proc.poll() is None:
            _say("stopping the gateway (SIGTERM)")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _status(runtime: dict[str, Any]) -> dict[str, Any]:
    admin = runtime["admin"]
    url = f"http://{admin['host']}:{admin['port']}/status"
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback admin API
        data: dict[str, Any] = json.loads(response.read())
    return data


def _wait_drained(runtime: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status(runtime)
        if status["buffer"]["rows"] == 0:
            return status
        if time.monotonic() > deadline:
            raise DemoError(
                f"buffer still holds {status['buffer']['rows']} rows after {timeout_s:.0f} s;"
                f" Kafka: {status['kafka']}"
            )
        time.sleep(0.2)


def _provision_fleet(path: Path, devices: int) -> str:
    """Write the fleet's password file (ids of ``tidegate sim``); return the password."""
    password = secrets.token_urlsafe(18)
    encoded = hash_password(password)
    write_entries(path, {device_id("dev-", index): encoded for index in range(devices)})
    return password


def run_demo(options: DemoOptions) -> int:
    """Run the demo; return the verifier's exit code (0: nothing acknowledged is missing)."""
    workdir = options.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "gateway"
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh buffer: the demo counts from zero
    pki_dir = workdir / "pki"
    _say(f"working directory {workdir}")
    init_pki(pki_dir)
    ledger = workdir / "acks.jsonl"
    ledger.unlink(missing_ok=True)
    password_file = workdir / "devices.passwd"
    _say(f"provisioning {options.devices} device passwords in {password_file}")
    password = _provision_fleet(password_file, options.devices)
    with _kafka(options, pki_dir) as kafka:
        env = {
            **os.environ,
            "TIDEGATE_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "TIDEGATE_PKI_DIR": str(kafka.pki_dir),
            "TIDEGATE_DATA_DIR": str(data_dir),
            "TIDEGATE_MQTT_PORT": "0",
            "TIDEGATE_ADMIN_PORT": "0",
            "TIDEGATE_PASSWORD_FILE": str(password_file),
        }
        with _gateway(env, data_dir, workdir / "gateway.log") as runtime:
            port = runtime["mqtt"][0]["port"]
            _say(
                f"gateway listening on 127.0.0.1:{port}; simulating {options.devices} devices"
                f" x {options.count} QoS1 messages"
            )
            sim = subprocess.run(
                _cli(
                    "sim",
                    "--port",
                    str(port),
                    "--devices",
                    str(options.devices),
                    "--count",
                    str(options.count),
                    "--qos",
                    "1",
                    "--classes",
                    "telemetry,event",
                    "--ledger",
                    str(ledger),
                ),
                env={**env, "TIDEGATE_SIM_PASSWORD": password},
                check=False,
            )
            if sim.returncode != 0:
                raise DemoError(f"the simulator failed with exit code {sim.returncode}")
            status = _wait_drained(runtime, options.drain_timeout_s)
            _say(
                f"buffer drained: {status['kafka']['forwarded']} records forwarded in"
                f" {status['kafka']['batches']} batches"
            )
            _say("verifying: reading Kafka back and comparing with the ack ledger")
            verify = subprocess.run(
                _cli("verify", "-c", str(DEV_CONFIG), "--ledger", str(ledger)),
                env=env,
                check=False,
            )
    _say("done" if verify.returncode == 0 else f"verifier exit code {verify.returncode}")
    return verify.returncode
