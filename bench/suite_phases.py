"""The measured phases of one repetition of one system (bench/suite.py runs them in order).

Every phase: wait until the system is idle, sample the CPU of its processes (utime+stime from
/proc), offer the load, wait until the system is idle again (so deferred work counts: Kafka
forwarding, broadcast backlogs, the naive bridge working off Mosquitto's queue), sample again.

- ``thirdparty``: mosquitto_pub processes at a fixed offered rate (the main figure: system
  CPU µs per message); for Kafka systems also how many reached Kafka (loss).
- ``fixed``: the simulator at the same fixed rate: PUBACK latency p50/p99 and CPU.
- ``saturate``: the simulator as fast as ``--inflight`` allows: the maximum PUBACK rate and,
  for Kafka systems, the end-to-end rate (records in Kafka / first publish → last append)
  and loss.
- ``latency``: Kafka systems only, the simulator at half the saturated end-to-end rate:
  publish → Kafka-append latency p50/p99, read from the broker-side record timestamps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.ingest import _wait_idle
from bench.procs import cpu_sample, rss_mb, system_cpu
from bench.suite_kafka import kafka_envelopes
from bench.suite_load import run_mosquitto_pub, run_sim
from bench.suite_systems import System

__all__ = [
    "Params",
    "latency_phase",
    "rss_of",
    "saturate_phase",
    "sim_fixed_phase",
    "thirdparty_phase",
]


@dataclass(frozen=True)
class Params:
    """Load shapes of a profile (bench/suite.py has smoke, quick and full)."""

    devices: int
    rate_per_device: float
    """Fixed-rate phases: devices x rate_per_device is the offered rate."""
    fixed_s: float
    saturate_s: float
    inflight: int
    latency_s: float
    payload_size: int = 64
    sim_processes: int = 1
    """Simulator processes the devices are sharded over (one Python process saturates its
    core near 7,000 paced msg/s: bench/latency_curve.py)."""

    @property
    def offered_rate(self) -> float:
        return self.devices * self.rate_per_device


class _Meter:
    """CPU of a system's processes (and the machine) across one phase."""

    def __init__(self, system: System) -> None:
        self.system = system
        for pid in system.pids().values():
            _wait_idle(pid, 20)
        self.before = {role: cpu_sample(pid) for role, pid in system.pids().items()}
        self.busy_before, _ = system_cpu()
        self.started = time.monotonic()

    def settle(self, timeout_s: float = 120) -> dict[str, Any]:
        """Wait for the system to be idle (its work done), then the CPU per role."""
        deadline = time.monotonic() + timeout_s
        while True:
            for pid in self.system.pids().values():
                _wait_idle(pid, max(1.0, deadline - time.monotonic()))
            status = self.system.status()
            rows = status.get("buffer", {}).get("rows", 0)
            if not rows or time.monotonic() > deadline:
                break
        self.system.check_alive()
        after = {role: cpu_sample(pid) for role, pid in self.system.pids().items()}
        busy_after, _ = system_cpu()
        cpu = {r: after[r].total_s - self.before[r].total_s for r in after}
        return {
            "cpu_s": cpu,
            "total_cpu_s": sum(cpu.values()),
            "machine_busy_s": busy_after - self.busy_before,
            "elapsed_s": time.monotonic() - self.started,
        }


def _per_msg_us(seconds: float, messages: int) -> float | None:
    return round(seconds * 1e6 / messages, 1) if messages > 0 else None


def _foreign_pct(cpu: dict[str, Any], ours_s: float) -> float:
    """CPU of everyone else on the machine during the phase, in % of one core."""
    other: float = cpu["machine_busy_s"] - cpu["total_cpu_s"] - ours_s
    elapsed: float = cpu["elapsed_s"]
    return round(max(0.0, other) / max(1e-3, elapsed) * 100, 1)


def thirdparty_phase(system: System, mosquitto_pub: str, p: Params, rep: int) -> dict[str, Any]:
    before_kafka = system.in_kafka()
    meter = _Meter(system)
    fleet = run_mosquitto_pub(
        mosquitto_pub,
        system.port,
        devices=p.devices,
        rate_per_device=p.rate_per_device,
        seconds=p.fixed_s,
        prefix=f"mp{rep}-",
    )
    cpu = meter.settle()
    published = fleet.offered - fleet.failed_processes * max(
        1, round(p.rate_per_device * p.fixed_s)
    )
    out: dict[str, Any] = {
        "generator": "mosquitto_pub",
        "devices": p.devices,
        "offered": fleet.offered,
        "published": published,
        "failed_processes": fleet.failed_processes,
        "msgs_per_s": round(fleet.offered / fleet.window_s, 1),
        "cpu_us_per_msg": _per_msg_us(cpu["total_cpu_s"], published),
        "cpu_us_per_msg_by_process": {
            r: _per_msg_us(s, published) for r, s in cpu["cpu_s"].items()
        },
        "generator_cpu_us_per_msg": _per_msg_us(fleet.generator_cpu_s, published),
        "other_cpu_pct": _foreign_pct(cpu, fleet.generator_cpu_s),
        "phase_s": round(cpu["elapsed_s"], 1),
    }
    if before_kafka is not None:
        delivered = (system.in_kafka() or 0) - before_kafka
        out["in_kafka"] = delivered
        out["loss_pct"] = round(100 * (1 - delivered / max(1, published)), 2)
    return out


def _sim_args(p: Params, prefix: str, *, rate: float, duration_s: float) -> list[str]:
    return [
        "--devices", str(p.devices), "--rate", str(rate), "--duration", str(duration_s),
        "--inflight", str(p.inflight), "--payload-size", str(p.payload_size),
        "--prefix", prefix, "--processes", str(p.sim_processes),
    ]  # fmt: skip


def _sim_phase(
    system: System, code: Path, workdir: Path, *, name: str, args: list[str], timeout_s: float
) -> tuple[dict[str, Any], dict[str, Any], float]:
    meter = _Meter(system)
    summary, sim_cpu_s = run_sim(
        code, system.port, args, workdir / f"sim-{name}.json", timeout_s=timeout_s
    )
    cpu = meter.settle()
    return summary, cpu, sim_cpu_s


def _sim_figures(summary: dict[str, Any], cpu: dict[str, Any], sim_cpu_s: float) -> dict[str, Any]:
    acked = int(summary["counters"]["acked"])
    lat = summary["puback_latency_ms"]
    return {
        "generator": "device_sim",
        "sent": int(summary["counters"]["sent"]),
        "acked": acked,
        "msgs_per_s": round(float(summary["msgs_per_s"]), 1),
        "puback_p50_ms": float(lat["p50"]),
        "puback_p99_ms": float(lat["p99"]),
        # Once every simulated device had connected: the offered rate alone, no connect ramp.
        "puback_steady_p99_ms": float(summary["puback_latency_steady_ms"]["p99"]),
        "cpu_us_per_msg": _per_msg_us(cpu["total_cpu_s"], acked),
        "cpu_us_per_msg_by_process": {r: _per_msg_us(s, acked) for r, s in cpu["cpu_s"].items()},
        "generator_cpu_us_per_msg": _per_msg_us(sim_cpu_s, acked),
        "other_cpu_pct": _foreign_pct(cpu, sim_cpu_s),
        # The whole machine (every core), in % of one core: a queue that grows once this
        # nears 100 x cores is a queue behind the CPU.
        "machine_busy_pct": round(cpu["machine_busy_s"] / max(1e-3, cpu["elapsed_s"]) * 100, 1),
        "phase_s": round(cpu["elapsed_s"], 1),
    }


def sim_fixed_phase(
    system: System, code: Path, workdir: Path, p: Params, rep: int
) -> dict[str, Any]:
    args = _sim_args(p, f"fx{rep}-", rate=p.rate_per_device, duration_s=p.fixed_s)
    summary, cpu, sim_cpu_s = _sim_phase(
        system, code, workdir, name="fixed", args=args, timeout_s=p.fixed_s * 3 + 60
    )
    return _sim_figures(summary, cpu, sim_cpu_s) | {"offered_rate": p.offered_rate}


def saturate_phase(
    system: System, code: Path, workdir: Path, p: Params, rep: int
) -> dict[str, Any]:
    prefix = f"sat{rep}-"
    args = _sim_args(p, prefix, rate=0, duration_s=p.saturate_s)
    summary, cpu, sim_cpu_s = _sim_phase(
        system, code, workdir, name="saturate", args=args, timeout_s=p.saturate_s * 3 + 60
    )
    out = _sim_figures(summary, cpu, sim_cpu_s)
    if system.kafka is not None and system.topic is not None:
        found = kafka_envelopes(system.kafka, system.topic, prefix)
        first_send_ms = float(summary["counters"]["first_send_wall"]) * 1000
        delivered = len(found)
        out["in_kafka"] = delivered
        out["loss_pct"] = round(100 * (1 - delivered / max(1, out["acked"])), 2)
        if found:
            last_append = max(arrival.appended_ms for arrival in found.values())
            out["e2e_msgs_per_s"] = round(
                delivered / max(1e-3, (last_append - first_send_ms) / 1000), 1
            )
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def latency_phase(
    system: System, code: Path, workdir: Path, p: Params, rep: int, *, rate: float
) -> dict[str, Any]:
    """The simulator at ``rate`` msg/s in total; publish → Kafka-append latency."""
    assert system.kafka is not None
    assert system.topic is not None
    prefix = f"lat{rep}-"
    args = _sim_args(p, prefix, rate=max(0.01, rate / p.devices), duration_s=p.latency_s)
    summary, cpu, sim_cpu_s = _sim_phase(
        system, code, workdir, name="latency", args=args, timeout_s=p.latency_s * 3 + 60
    )
    out = _sim_figures(summary, cpu, sim_cpu_s) | {"offered_rate": round(rate, 1)}
    found = kafka_envelopes(system.kafka, system.topic, prefix)
    latencies = [a.appended_ms - a.published_ms for a in found.values()]
    out["in_kafka"] = len(found)
    out["loss_pct"] = round(100 * (1 - len(found) / max(1, out["acked"])), 2)
    if latencies:
        out["kafka_p50_ms"] = _percentile(latencies, 0.50)
        out["kafka_p99_ms"] = _percentile(latencies, 0.99)
        out["kafka_max_ms"] = max(latencies)
    # Where the time went (tidegate's records say when the gateway read each PUBLISH): on
    # the way in (the simulator's send queue, the socket, the gateway's read), or inside.
    read = [(a.ingested_ms, a) for a in found.values() if a.ingested_ms is not None]
    if read:
        way_in = [ingested - a.published_ms for ingested, a in read]
        inside = [a.appended_ms - ingested for ingested, a in read]
        out["publish_to_ingest_p50_ms"] = _percentile(way_in, 0.50)
        out["publish_to_ingest_p99_ms"] = _percentile(way_in, 0.99)
        out["ingest_to_kafka_p50_ms"] = _percentile(inside, 0.50)
        out["ingest_to_kafka_p99_ms"] = _percentile(inside, 0.99)
    return out


def rss_of(system: System) -> dict[str, float]:
    """Current and peak RSS of the system's processes, summed (MiB)."""
    current, peak = 0.0, 0.0
    for pid in system.pids().values():
        c, h = rss_mb(pid)
        current, peak = current + c, peak + h
    return {"rss_mb": round(current, 1), "peak_rss_mb": round(peak, 1)}
