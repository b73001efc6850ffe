"""The suite's tidegate-only figures: memory during a Kafka outage, backlog drain, and the
10,000-device figure taken from the simulator-at-scale benchmark's results.

Outage: the gateway takes a steady simulator load; a few seconds in, every Kafka broker is
SIGSTOPped (connections hang, nothing is acknowledged: Kafka "down" without losing data) for
``outage_s``; the gateway's RSS is sampled throughout; then Kafka is SIGCONTinued and the time
until the buffer is empty again is measured. RSS counts as flat when it grew by at most
``FLAT_MB`` between the end of the first fifth of the outage and its end (the first fifth
holds the one-off growth: producer retry buffers, SQLite page cache warming up).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.drain import run_drain
from bench.procs import REPO, Child, rss_mb, wait_for
from bench.suite_systems import make_system
from gateway.dev.kafka import KafkaState

__all__ = ["FLAT_MB", "drain_figures", "find_scale_json", "outage_figures", "scale_figures"]

FLAT_MB = 10.0


def outage_figures(
    kafka: KafkaState,
    workdir: Path,
    *,
    code: Path,
    mosquitto: str,
    outage_s: float,
    devices: int,
    rate: float,
    warm_s: float = 5.0,
) -> dict[str, Any]:
    """Gateway RSS through a Kafka outage of ``outage_s`` under ``rate`` msg/s in total,
    after ``warm_s`` of steady traffic into Kafka."""
    workdir.mkdir(parents=True)
    system = make_system("tidegate", workdir, kafka=kafka, code=code, mosquitto=mosquitto, rep=99)
    pid = system.main_pid()
    brokers = [b.pid for b in kafka.brokers if b.pid]
    argv = [
        sys.executable, "-m", "device_sim", "sim", "--port", str(system.port),
        "--devices", str(devices), "--rate", str(rate / devices),
        "--duration", str(outage_s + warm_s + 2), "--inflight", "20", "--prefix", "out-",
        "--max-time", str(int(outage_s * 2 + 120)), "--drain-timeout", "60",
        "--json", str(workdir / "sim-outage.json"), "--quiet",
    ]  # fmt: skip
    sim = Child("simulator", argv, workdir / "sim-outage.log", cwd=code)
    samples: list[tuple[float, float]] = []
    frozen = False
    try:
        time.sleep(warm_s)  # steady traffic before the outage (a window, not a wait)
        for broker in brokers:
            os.kill(broker, signal.SIGSTOP)
        frozen = True
        started = time.monotonic()
        step = max(0.5, outage_s / 120)
        while (elapsed := time.monotonic() - started) < outage_s:
            system.check_alive()
            samples.append((round(elapsed, 1), round(rss_mb(pid)[0], 1)))
            time.sleep(step)  # sampling interval
        samples.append((round(time.monotonic() - started, 1), round(rss_mb(pid)[0], 1)))
        rows_at_thaw = int(system.status()["buffer"]["rows"])
    finally:
        if frozen:
            for broker in brokers:
                os.kill(broker, signal.SIGCONT)
    try:
        thawed = time.monotonic()
        sim_timeout = outage_s + 180
        wait_for(lambda: not sim.alive(), sim_timeout, "the outage simulator to finish")
        wait_for(
            lambda: system.status()["buffer"]["rows"] == 0, 300, "the buffer to empty after Kafka"
        )
        recovery_s = time.monotonic() - thawed
        summary = json.loads((workdir / "sim-outage.json").read_text())
    finally:
        sim.stop()
        system.stop()
    fifth = next((rss for t, rss in samples if t >= outage_s / 5), samples[0][1])
    growth = samples[-1][1] - fifth
    return {
        "outage_s": outage_s,
        "offered_rate": rate,
        "devices": devices,
        "acked": int(summary["counters"]["acked"]),
        "buffer_rows_at_end_of_outage": rows_at_thaw,
        "rss_at_start_mb": samples[0][1],
        "rss_after_first_fifth_mb": fifth,
        "rss_at_end_mb": samples[-1][1],
        "rss_max_mb": max(rss for _, rss in samples),
        "growth_after_first_fifth_mb": round(growth, 1),
        "flat": growth <= FLAT_MB,
        "recovery_s": round(recovery_s, 1),
        "samples": samples[:: max(1, len(samples) // 40)],
    }


def drain_figures(
    kafka: KafkaState, workdir: Path, *, code: Path, rows: int, live_devices: int, live_s: float
) -> dict[str, Any]:
    """bench/drain.py's backlog drain with live traffic, as one suite phase."""
    workdir.mkdir(parents=True)
    return run_drain(
        kafka,
        workdir,
        rows=rows,
        live_devices=live_devices,
        live_rate=10.0,
        live_s=live_s,
        code=code,
    )


_RSS_KEYS = ("gateway_peak_rss_mb", "gateway_rss_mb", "peak_rss_mb", "rss_mb")
_CONNECTED_KEYS = (
    "max_connections_seen",  # bench/fleet_scale.py
    "connected_peak",
    "peak_connected",
    "max_connected",
    "connected",
)
_SCALE_DEVICES = 10_000


def _find(data: Any, keys: tuple[str, ...]) -> float | None:
    """The first of ``keys`` found in ``data`` (searched breadth-first) holding a number."""
    queue = [data]
    while queue:
        item = queue.pop(0)
        if isinstance(item, dict):
            for key in keys:
                value = item.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return float(value)
            queue.extend(item.values())
    return None


def find_scale_json(results_dir: Path) -> Path | None:
    """The newest 10,000-device benchmark result in ``results_dir`` (``*10k*.json`` or
    ``fleet*scale*.json``), if any."""
    found = {*results_dir.glob("*10k*.json"), *results_dir.glob("fleet*scale*.json")}
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def scale_figures(path: Path | None) -> dict[str, Any]:
    """Connected devices and gateway RSS from the 10,000-device benchmark's JSON, if given.

    The RSS counts as the 10k figure only if that run had 10,000 devices connected at once.
    """
    if path is None or not path.exists():
        return {"connected": None, "rss_mb": None, "reason": "not measured in this run"}
    data = json.loads(path.read_text())
    connected, rss = _find(data, _CONNECTED_KEYS), _find(data, _RSS_KEYS)
    source = path.resolve()
    shown = source.relative_to(REPO) if source.is_relative_to(REPO) else source
    out: dict[str, Any] = {"source": str(shown), "connected": connected, "rss_mb": rss}
    if connected is None or rss is None:
        out["reason"] = f"{path} has no connected-devices or RSS figure"
    elif connected < _SCALE_DEVICES:
        out["reason"] = f"{path}: only {connected:,.0f} devices were connected at once"
    return out
