"""Measure the constants of docs/sizing.md: gateway memory with N connected devices, and
buffer disk bytes per message for a few payload sizes.

Run (about 3 minutes, no Kafka needed; nothing else heavy should run meanwhile):

    .venv/bin/python -m bench.sizing --out docs/bench-results/sizing.json

Kafka is "down" on purpose (the bootstrap address is loopback's discard port, nothing listens):
every message stays in the buffer, as during an outage. Devices are `tidegate sim` processes on
loopback, bounded in count and duration.

* Memory: the gateway's RSS (VmRSS, and the peak VmHWM) idle, then with 100 and 1,000 devices
  connected and publishing slowly (0.2 msg/s each).
* Disk: devices x count messages of each payload size; then the buffer's pages in use
  (``used_bytes``, the figure ``buffer.max_bytes`` bounds), the file, its WAL and shm, the
  sum of payloads (from /status and the file system) and the bytes of each table and index
  (SQLite's dbstat).
* The drop ledger: 100,000 entries written straight into the real schema.

``--only memory|disk`` re-measures one part and keeps the other in the ``--out`` file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from edge.schema import create_statements
from gateway.pki import init_pki
from tests.harness import (
    REPO,
    GatewayProcess,
    KafkaTls,
    rss_bytes,
    wait_for,
    write_gateway_config,
)

__all__ = ["main"]

_MB = 1 << 20
_DBSTAT = "SELECT name, sum(pgsize) FROM dbstat GROUP BY name HAVING sum(pgsize) > 4096"
_DBSTAT_ONE = "SELECT sum(pgsize) FROM dbstat WHERE name = ?"


def _vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def _get(gateway: GatewayProcess, path: str) -> Any:
    admin = gateway.runtime["admin"]
    with urllib.request.urlopen(f"http://127.0.0.1:{admin['port']}{path}", timeout=10) as r:
        return json.loads(r.read())


def _connected(gateway: GatewayProcess) -> int:
    return sum(1 for d in _get(gateway, "/devices")["devices"] if d.get("connected"))


def _start(directory: Path, pki: Any, max_bytes: int) -> GatewayProcess:
    config = write_gateway_config(
        directory,
        bootstrap="127.0.0.1:9",
        tls=KafkaTls(pki.ca_cert, pki.gateway_cert, pki.gateway_key),
        topics={"telemetry": "sizing.telemetry"},
        extra=f"[buffer]\nmax_bytes = {max_bytes}\nmax_rows = 20000000\n",
        # Anonymous devices: a password CONNECT costs a scrypt check (~0.1-0.2 s of CPU on
        # this shared machine), which would make connecting 1,000 devices the measurement.
        anonymous=True,
    )
    return GatewayProcess(config).start()


def _sim(port: int, devices: int, extra: list[str], prefix: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "gateway.cli",
        "sim",
        *("--port", str(port), "--devices", str(devices), "--prefix", prefix),
        "--classes",
        "telemetry",
        *extra,
    ]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_memory(directory: Path, pki: Any, fleets: list[int]) -> list[dict[str, Any]]:
    gateway = _start(directory, pki, 1 << 30)
    results: list[dict[str, Any]] = []
    try:
        pid = gateway.proc.pid  # type: ignore[union-attr]
        wait_for(lambda: _get(gateway, "/status"), 10, "status")
        time.sleep(2)  # settle after start (imports, first Kafka attempts); a measurement pause
        results.append({"devices": 0, "rss_mb": round(rss_bytes(pid) / _MB, 1)})
        for n in fleets:
            duration = 30 + n / 50
            sim = _sim(
                gateway.mqtt_port,
                n,
                ["--rate", "0.2", "--duration", str(duration), "--payload-size", "256"],
                prefix=f"m{n}-",
            )
            try:
                wait_for(lambda n=n: _connected(gateway) >= n or None, duration, f"{n} connected")
                samples = []
                for _ in range(5):
                    samples.append(rss_bytes(pid))
                    time.sleep(1)  # sampling interval while the fleet stays connected
                results.append(
                    {
                        "devices": n,
                        "rss_mb": round(max(samples) / _MB, 1),
                        "hwm_mb": round(_vm(pid, "VmHWM") / _MB, 1),
                    }
                )
            finally:
                sim.wait(timeout=duration + 120)
            wait_for(lambda: _connected(gateway) == 0 or None, 60, "fleet gone")
    finally:
        gateway.terminate(timeout=60)
        gateway.stop()
    return results


def measure_disk(
    directory: Path, pki: Any, payloads: list[int], devices: int, count: int
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for size in payloads:
        run_dir = directory / f"disk-{size}"
        run_dir.mkdir()
        gateway = _start(run_dir, pki, 16 << 30)
        try:
            sim = _sim(
                gateway.mqtt_port,
                devices,
                ["--count", str(count), "--payload-size", str(size), "--inflight", "20"],
                prefix=f"d{size}-",
            )
            if sim.wait(timeout=900) != 0:
                raise RuntimeError(f"sim failed with exit code {sim.returncode}")
            buffer = _get(gateway, "/status")["buffer"]
            path = Path(buffer["path"])
            files = {
                suffix or "db": (path.parent / (path.name + suffix)).stat().st_size
                for suffix in ("", "-wal", "-shm")
                if (path.parent / (path.name + suffix)).exists()
            }
            rows = buffer["rows"]
            # Bytes per table and index (SQLite's dbstat), read-only beside the running writer.
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                tables = dict(db.execute(_DBSTAT).fetchall())
            results.append(
                {
                    "filler_bytes": size,
                    "rows": rows,
                    "devices": devices,
                    "payload_bytes_avg": round(buffer["payload_bytes"] / rows, 1),
                    "used_bytes": buffer["used_bytes"],
                    "used_bytes_per_row": round(buffer["used_bytes"] / rows, 1),
                    "overhead_per_row": round(
                        (buffer["used_bytes"] - buffer["payload_bytes"]) / rows, 1
                    ),
                    "files": files,
                    "tables": tables,
                    "file_bytes_per_row": round(sum(files.values()) / rows, 1),
                }
            )
        finally:
            gateway.terminate(timeout=60)
            gateway.stop()
    return results


def measure_ledger(directory: Path, rows: int) -> dict[str, Any]:
    """The drop ledger alone: ``rows`` realistic entries in the real schema (edge/schema.py)."""
    path = directory / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        for statement in create_statements():
            db.execute(statement)
        db.executemany(
            "INSERT INTO drops (message_id, device_id, class, topic, msg_id, seq, reason,"
            " dropped_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    1_700_000_000_000_000 + i,
                    f"dev-{i % 1000:05d}",
                    "telemetry",
                    f"d/dev-{i % 1000:05d}/up/telemetry",
                    f"dev-{i % 1000:05d}-{i:012d}",
                    i,
                    "buffer full (drop_oldest)",
                    1_700_000_000_000 + i,
                )
                for i in range(rows)
            ),
        )
        db.commit()
        ledger = int(db.execute(_DBSTAT_ONE, ("drops",)).fetchone()[0])
    return {"rows": rows, "bytes": ledger, "bytes_per_row": round(ledger / rows, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fleets", default="100,1000")
    parser.add_argument("--payloads", default="64,256,1024")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--count", type=int, default=1000, help="messages per device")
    parser.add_argument(
        "--only",
        choices=["memory", "disk"],
        default=None,
        help="measure one part; --out then keeps the other part of the file",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tidegate-sizing-") as tmp:
        directory = Path(tmp)
        pki = init_pki(directory / "pki")
        memory_dir = directory / "memory"
        memory_dir.mkdir()
        old = (
            json.loads(args.out.read_text())
            if args.out is not None and args.only and args.out.exists()
            else {}
        )
        result: dict[str, Any] = {**old}
        if args.only != "disk":
            fleets = [int(x) for x in args.fleets.split(",")]
            result["memory"] = measure_memory(memory_dir, pki, fleets)
            result["memory_measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if args.only != "memory":
            sizes = [int(x) for x in args.payloads.split(",")]
            result["disk"] = measure_disk(directory, pki, sizes, args.devices, args.count)
            result["drop_ledger"] = measure_ledger(directory, 100_000)
            result["disk_measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
