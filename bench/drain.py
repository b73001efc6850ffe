"""Backlog drain: a buffer holding N messages (default 1,000,000) drains into Kafka while live
traffic keeps flowing.

    .venv/bin/python -m bench.drain [--rows 1000000] [--live-devices 100] [--live-rate 10]

The backlog is written straight into a fresh buffer file (telemetry class, 1,000 devices,
device envelopes around sensor readings of ~135 bytes) before the gateway starts, as if
Kafka had been away for a long time. Live devices publish QoS1 events (a higher class)
through the gateway during the drain. Reported: backlog drain rate (msg/s), live PUBACK
latency, gateway CPU and RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.procs import system_cpu
from bench.speed_probe import speed_probe
from device_sim.envelope import encode_envelope
from device_sim.sensors import Sensor
from edge.buffer import Buffer
from gateway.config import BufferConfig
from gateway.dev.kafka import KafkaState, create_topics, read_state, start_kafka, stop_kafka

REPO = Path(__file__).resolve().parents[1]


def fill_backlog(path: Path, rows: int, devices: int, *, seed: int = 7) -> None:
    """A new buffer file holding ``rows`` telemetry messages of ``devices`` devices
    (``bk-0000`` …), as if Kafka had been away: one message a millisecond up to now, each
    the device contract's CBOR envelope around a temperature reading in JSON (~130 bytes;
    it compresses like real telemetry, not like a constant filler)."""
    asyncio.run(_create(path))
    rng = random.Random(seed)
    sensors = [Sensor("temperature", "json", rng, size=0, filler=b"") for _ in range(devices)]
    seqs = [0] * devices
    first_ms = time.time_ns() // 1_000_000 - rows

    def row(i: int) -> tuple[str, str, bytes, int]:
        device = i % devices
        seqs[device] += 1
        seq, ts = seqs[device], first_ms + i
        msg_id = f"bk-{device:04d}:drain:telemetry:{seq}"
        body = sensors[device].reading(ts)
        payload = encode_envelope(msg_id=msg_id, seq=seq, ts=ts, body=body)
        return f"bk-{device:04d}", f"d/bk-{device:04d}/up/telemetry", payload, ts

    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        batch = 50_000
        for start in range(0, rows, batch):
            db.executemany(
                "INSERT INTO uplink (device_id, class, topic, qos, payload, ingest_ms, priority)"
                " VALUES (?, 'telemetry', ?, 1, ?, ?, 5)",
                [row(i) for i in range(start, min(rows, start + batch))],
            )
            db.commit()
    db.close()


async def _create(path: Path) -> None:
    async with Buffer(path, BufferConfig(max_rows=10_000_000, max_bytes=1 << 33)):
        pass


def _status(runtime: dict[str, Any]) -> dict[str, Any]:
    admin = runtime["admin"]
    with urllib.request.urlopen(f"http://{admin['host']}:{admin['port']}/status", timeout=5) as r:
        data: dict[str, Any] = json.loads(r.read())
    return data


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (the gateway's send worker)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out.extend(int(c) for c in task.read_text().split())
    return out


def _tree_cpu_s(pid: int) -> float:
    """CPU of ``pid``, its reaped children and its live children: the gateway's whole cost,
    the send worker included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    live = 0.0
    for child in _children(pid):
        with contextlib.suppress(OSError, IndexError):
            live += _cpu_s(child)
    return _cpu_s(pid) + reaped + live


def _rss(pid: int) -> int:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--live-devices", type=int, default=100)
    parser.add_argument("--live-rate", type=float, default=10.0)
    parser.add_argument("--lease-batch", type=int, default=2000, help="buffer.lease_batch")
    parser.add_argument(
        "--live-s",
        type=float,
        help="seconds of live traffic (default: about as long as the drain should take)",
    )
    parser.add_argument(
        "--send-workers",
        type=int,
        help="kafka.send_workers (0: the whole drain in the gateway's process; default:"
        " the gateway's default)",
    )
    parser.add_argument(
        "--compression",
        choices=["none", "gzip", "lz4", "zstd"],
        help="kafka.compression (default: the gateway's default)",
    )
    parser.add_argument("--kafka-state", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--code", type=Path, default=REPO, help="a checkout to run the gateway from (A/B)"
    )
    args = parser.parse_args()
    if args.rows < 1 or args.lease_batch < 1 or (args.live_s is not None and args.live_s <= 0):
        parser.error("--rows, --lease-batch and --live-s must be positive")
    if args.send_workers is not None and not 0 <= args.send_workers <= 8:
        parser.error("--send-workers must be 0..8")

    work = Path(tempfile.mkdtemp(prefix="tidegate-drain-"))
    kafka = read_state(args.kafka_state) if args.kafka_state else None
    if kafka is None:
        kafka = start_kafka(work / "kafka", work / "pki", topics=())
    machine_speed = speed_probe()  # before the load: how fast this machine is today
    try:
        result = run_drain(
            kafka,
            work,
            rows=args.rows,
            devices=args.devices,
            live_devices=args.live_devices,
            live_rate=args.live_rate,
            lease_batch=args.lease_batch,
            live_s=args.live_s,
            send_workers=args.send_workers,
            compression=args.compression,
            code=args.code.resolve(),
        )
        result["code"] = _describe(args.code)
        result["speed_probe"] = machine_speed
        result["command"] = " ".join(sys.argv)
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if args.kafka_state is None:
            stop_kafka(kafka.state_file)


def _describe(code: Path) -> str:
    """The commit a checkout is at (its path if it is not a git checkout)."""
    head = subprocess.run(
        ["git", "-C", str(code), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return head or str(code)


def run_drain(
    kafka: KafkaState,
    work: Path,
    *,
    rows: int,
    devices: int = 1000,
    live_devices: int = 100,
    live_rate: float = 10.0,
    live_s: float | None = None,
    lease_batch: int = 2000,
    send_workers: int | None = None,
    compression: str | None = None,
    code: Path = REPO,
) -> dict[str, Any]:
    """Fill a buffer with ``rows`` messages, start the gateway on it with live traffic,
    measure until the backlog is gone (bench.suite calls this too)."""
    args = argparse.Namespace(
        rows=rows,
        devices=devices,
        live_devices=live_devices,
        live_rate=live_rate,
        lease_batch=lease_batch,
        # Live traffic for about as long as the drain should take, unless told.
        live_s=live_s if live_s is not None else max(20, rows // 15_000),
    )
    suffix = os.urandom(3).hex()
    topics = {"telemetry": f"drain.telemetry.{suffix}", "event": f"drain.event.{suffix}"}
    create_topics(kafka, list(topics.values()), partitions=6)
    data = work / "gateway"
    data.mkdir()
    started = time.monotonic()
    fill_backlog(data / "buffer.sqlite3", args.rows, args.devices)
    fill_s = time.monotonic() - started
    config = work / "gateway.toml"
    config.write_text(
        f"""
[gateway]
id = "drain-bench"
data_dir = "{data}"
[[broker.listeners]]
port = 0
[broker]
allow_anonymous = true  # loopback benchmark, like the bare-amqtt and Mosquitto peers
[buffer]
max_rows = 10_000_000
max_bytes = 8_589_934_592
lease_batch = {args.lease_batch}
[classes.event]
kafka_topic = "{topics["event"]}"
priority = 8
[classes.telemetry]
kafka_topic = "{topics["telemetry"]}"
priority = 5
[kafka]
bootstrap_servers = ["{kafka.bootstrap}"]
{"" if send_workers is None else f"send_workers = {send_workers}"}
{"" if compression is None else f'compression = "{compression}"'}
[kafka.tls]
cafile = "{kafka.ca_file}"
certfile = "{kafka.cert_file}"
keyfile = "{kafka.key_file}"
[admin]
port = 0
"""
    )
    with (work / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=code,
        )
    try:
        kafka_pids = [b.pid for b in kafka.brokers if b.pid]
        result = _measure(gateway, data, args, work, code=code, kafka_pids=kafka_pids)
    finally:
        gateway.terminate()
        try:
            gateway.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(timeout=10)
    # What the gateway ran with (its default when not told; 0 before send workers existed).
    workers = (result["forwarder"].get("send_worker") or {}).get("children", 0)
    result.update(
        rows=args.rows, fill_s=round(fill_s, 1), send_workers=workers, compression=compression
    )
    return result


def _measure(
    gateway: subprocess.Popen[bytes],
    data: Path,
    args: argparse.Namespace,
    work: Path,
    *,
    code: Path = REPO,
    kafka_pids: list[int] | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while not (data / "runtime.json").exists():
        if gateway.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gateway did not start; see {work / 'gateway.log'}")
        time.sleep(0.2)
    runtime = json.loads((data / "runtime.json").read_text())
    port = runtime["mqtt"][0]["port"]
    kafka_pids = kafka_pids or []
    started, cpu0 = time.monotonic(), _tree_cpu_s(gateway.pid)
    machine0, _ = system_cpu()
    own_cpu0 = _cpu_s(gateway.pid)
    kafka_cpu0 = sum(_cpu_s(pid) for pid in kafka_pids)
    live_s = args.live_s
    sim = subprocess.Popen(
        [
            sys.executable, "-m", "gateway.cli", "sim", "--port", str(port),
            "--devices", str(args.live_devices), "--rate", str(args.live_rate),
            "--duration", str(live_s), "--max-time", "900", "--classes", "event",
            "--prefix", "live-", "--quiet", "--json", str(work / "live.json"),
        ],
        cwd=code,
    )  # fmt: skip
    peak_rss = peak_worker_rss = 0
    samples: list[tuple[float, int]] = []
    status: dict[str, Any] = {}
    try:
        while True:
            status = _status(runtime)
            backlog = status["buffer"]["class_rows"].get("telemetry", 0)
            elapsed = time.monotonic() - started
            samples.append((round(elapsed, 1), backlog))
            peak_rss = max(peak_rss, _rss(gateway.pid))
            worker_rss = sum(_rss(child) for child in _children(gateway.pid))
            peak_worker_rss = max(peak_worker_rss, worker_rss)
            if backlog == 0:
                break
            if elapsed > 1800:
                raise SystemExit("backlog not drained in 30 minutes")
            time.sleep(0.25)  # the drain takes seconds: 1 s steps were ±10 %
    finally:
        drained_s = time.monotonic() - started
        cpu = _tree_cpu_s(gateway.pid) - cpu0
        machine_cpu = system_cpu()[0] - machine0
        own_cpu = _cpu_s(gateway.pid) - own_cpu0
        kafka_cpu = sum(_cpu_s(pid) for pid in kafka_pids) - kafka_cpu0
        try:
            sim.wait(timeout=live_s + 120)
        except subprocess.TimeoutExpired:
            sim.send_signal(signal.SIGINT)
            sim.wait(timeout=60)
    live = json.loads((work / "live.json").read_text()) if (work / "live.json").exists() else {}
    return {
        "drain_s": round(drained_s, 1),
        "drain_msgs_per_s": round(args.rows / drained_s),
        "gateway_cpu_s": round(cpu, 1),
        # Every process on the machine (simulator, Kafka, the OS, other tenants), as a share
        # of all cores over the drain: how much room was left.
        "machine_busy_pct": round(100 * machine_cpu / (drained_s * (os.cpu_count() or 1)), 1),
        # The gateway's own process; the rest of gateway_cpu_s is its send worker.
        "gateway_main_cpu_s": round(own_cpu, 1),
        # Both sides of the drain share this machine's cores: what one row costs each (live
        # traffic included) says how far the CPU allows the rate to go.
        "kafka_cpu_s": round(kafka_cpu, 1),
        "cpu_us_per_row": {
            "gateway": round(cpu / args.rows * 1e6, 1),
            "kafka": round(kafka_cpu / args.rows * 1e6, 1),
        },
        "gateway_peak_rss_mb": round(peak_rss / 2**20, 1),
        "send_worker_peak_rss_mb": round(peak_worker_rss / 2**20, 1),
        # Where the forwarder's time went (cumulative seconds): buffer (lease, release) or
        # Kafka (send: from enqueue to the last ack of a batch).
        "forwarder": {
            k: status.get("kafka", {}).get(k)
            for k in ("batches", "forwarded", "lease_s", "send_s", "release_s", "send_worker")
        },
        "live": {
            "devices": args.live_devices,
            "rate_per_device": args.live_rate,
            "summary": live,
        },
        "backlog_samples": samples[:: max(1, len(samples) // 30)],
    }


if __name__ == "__main__":
    main()
