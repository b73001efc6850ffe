"""Publish → Kafka latency against offered rate: where the knee is, and why.

The suite measures the latency target at one point, half of tidegate's saturated end-to-end
rate. This runs the same phases (bench/suite_phases.py) at a list of fractions of that rate,
on one gateway, in one run, and records for each point what the machine was doing: the
gateway's and the simulator's CPU per message and the whole machine's busy share. A latency
that only grows once the machine's cores are used up is a queue behind the CPU, not a stall
in the gateway.

    python -m bench.latency_curve --kafka-state var/kafka/state.json \
        --fractions 0.2,0.3,0.4,0.5 --reps 2 --out docs/bench-results/latency-curve.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest import machine_info, prepare_code
from bench.suite_phases import Params, latency_phase, rss_of, saturate_phase
from bench.suite_systems import make_system
from gateway.dev.kafka import read_state

CORES = os.cpu_count() or 1


def _point(figures: dict[str, Any], fraction: float) -> dict[str, Any]:
    rate = figures.get("msgs_per_s") or 0.0
    keys = (
        "offered_rate", "msgs_per_s", "kafka_p50_ms", "kafka_p99_ms", "puback_p99_ms",
        "publish_to_ingest_p50_ms", "publish_to_ingest_p99_ms", "ingest_to_kafka_p50_ms",
        "ingest_to_kafka_p99_ms", "puback_steady_p99_ms", "cpu_us_per_msg",
        "generator_cpu_us_per_msg", "other_cpu_pct", "machine_busy_pct", "loss_pct",
    )  # fmt: skip
    point = {"fraction": fraction} | {k: figures.get(k) for k in keys}
    # Cores the gateway and the simulator need at this rate (CPU per message x rate).
    point["gateway_cores"] = round((figures.get("cpu_us_per_msg") or 0) * rate / 1e6, 2)
    point["generator_cores"] = round((figures.get("generator_cpu_us_per_msg") or 0) * rate / 1e6, 2)
    return point


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tidegate-latency-curve-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    kafka = read_state(args.kafka_state)
    code, code_info = prepare_code(args.code, root / "code")
    p = Params(
        devices=args.devices, rate_per_device=1, fixed_s=0, saturate_s=args.saturate_s,
        inflight=20, latency_s=args.latency_s, sim_processes=args.sim_processes,
    )  # fmt: skip
    fractions: list[float] = args.fractions
    reps: list[dict[str, Any]] = []
    started = time.monotonic()
    for rep in range(args.reps):
        workdir = root / f"rep{rep}"
        workdir.mkdir()
        system = make_system("tidegate", workdir, kafka=kafka, code=code, mosquitto="", rep=rep)
        try:
            if args.max_rate:  # given: no saturate phase (A/B runs at one fixed rate)
                saturated, e2e = {}, float(args.max_rate)
            else:
                saturated = saturate_phase(system, code, workdir, p, rep)
                e2e = float(saturated["e2e_msgs_per_s"])
            points = []
            # Highest rate first, so every point runs on a warm gateway (each phase waits
            # until the gateway is idle, so no point inherits another's backlog).
            for i, fraction in enumerate(sorted(fractions, reverse=True)):
                figures = latency_phase(
                    system, code, workdir, p, rep * 100 + i, rate=e2e * fraction
                )
                points.append(_point(figures, fraction))
                print(json.dumps(points[-1]), file=sys.stderr, flush=True)
            rss = rss_of(system)
        finally:
            system.stop()
        reps.append({"e2e_msgs_per_s": e2e, "saturate": saturated, "points": points, "rss": rss})
    return {
        "command": " ".join(["python -m bench.latency_curve", *sys.argv[1:]]),
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine_info(),
        "code": code_info,
        "params": {
            "devices": p.devices,
            "latency_s": p.latency_s,
            "saturate_s": p.saturate_s,
            "sim_processes": p.sim_processes,
            "max_rate": args.max_rate,
        },
        "reps": reps,
        "median": _medians(reps, fractions),
    }


def _medians(reps: list[dict[str, Any]], fractions: list[float]) -> list[dict[str, Any]]:
    out = []
    for fraction in sorted(fractions):
        points = [pt for r in reps for pt in r["points"] if pt["fraction"] == fraction]
        row: dict[str, Any] = {"fraction": fraction}
        for key in points[0]:
            values = [pt[key] for pt in points if isinstance(pt.get(key), int | float)]
            if key != "fraction" and values:
                row[key] = round(statistics.median(values), 2)
        out.append(row)
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        "| share of max | msg/s | Kafka p50 / p99 ms | of which publish → gateway read p50 / p99"
        " | gateway read → Kafka p50 / p99 | PUBACK p99 ms | gateway µs/msg (cores)"
        f" | simulator µs/msg (cores) | machine busy (of {CORES * 100} %) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in result["median"]:
        lines.append(
            f"| {row['fraction']:.0%} | {row.get('msgs_per_s', 0):,.0f}"
            f" | {row.get('kafka_p50_ms')} / {row.get('kafka_p99_ms')}"
            f" | {row.get('publish_to_ingest_p50_ms')} / {row.get('publish_to_ingest_p99_ms')}"
            f" | {row.get('ingest_to_kafka_p50_ms')} / {row.get('ingest_to_kafka_p99_ms')}"
            f" | {row.get('puback_p99_ms')}"
            f" | {row.get('cpu_us_per_msg')} ({row.get('gateway_cores')})"
            f" | {row.get('generator_cpu_us_per_msg')} ({row.get('generator_cores')})"
            f" | {row.get('machine_busy_pct')} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kafka-state", type=Path, required=True)
    parser.add_argument("--fractions", default="0.2,0.3,0.4,0.5")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--latency-s", type=float, default=30)
    parser.add_argument("--saturate-s", type=float, default=60)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--sim-processes", type=int, default=1)
    parser.add_argument(
        "--max-rate", type=float, help="take this as the maximum (msg/s) instead of measuring it"
    )
    parser.add_argument("--code", default="HEAD", help="git ref, or 'worktree'")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        args.fractions = sorted({float(f) for f in args.fractions.split(",") if f.strip()})
    except ValueError:
        parser.error(f"--fractions: comma-separated numbers, got {args.fractions!r}")
    if not args.fractions or not all(0 < f <= 1 for f in args.fractions):
        parser.error("--fractions: shares of the maximum rate, each in (0, 1]")
    if not 1 <= args.reps <= 20 or not 1 <= args.devices <= 2000 or args.latency_s <= 0:
        parser.error("--reps 1..20, --devices 1..2000, --latency-s > 0")
    if args.max_rate is not None and args.max_rate <= 0:
        parser.error("--max-rate: msg/s > 0")
    if not args.kafka_state.is_file():
        parser.error(f"--kafka-state: no such file {args.kafka_state} (tidegate dev kafka up)")
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
