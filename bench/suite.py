"""The benchmark suite: Mosquitto, amqtt alone, a naive bridge and tidegate, side by side,
same load, one run. ``python -m bench --quick | --full | --smoke`` (docs/benchmarks.md).

Per repetition every system is started fresh (order rotated per repetition) and goes through
the phases of bench/suite_phases.py; then tidegate alone goes through a Kafka outage and a
backlog drain (bench/suite_tidegate.py). The figures (medians over repetitions), the ratios to
the peers and every target of issue 6 with met / not met go to ``results.json`` (schema in
bench/suite_schema.py), ``results.md`` and ``results.png`` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest import machine_info, prepare_code
from bench.procs import REPO
from bench.suite_phases import (
    Params,
    latency_phase,
    rss_of,
    saturate_phase,
    sim_fixed_phase,
    thirdparty_phase,
)
from bench.suite_report import evaluate_targets, markdown, median_of, ratios, write_chart
from bench.suite_schema import KAFKA_SYSTEMS, SCHEMA, SYSTEMS
from bench.suite_systems import make_system
from bench.suite_tidegate import drain_figures, find_scale_json, outage_figures, scale_figures
from bench.targets import mosquitto_path
from gateway.dev.kafka import KafkaState, read_state, start_kafka, stop_kafka

__all__ = ["PROFILES", "Profile", "main"]


@dataclass(frozen=True)
class Profile:
    params: Params
    reps: int
    outage_s: float
    outage_devices: int
    outage_rate: float
    drain_rows: int
    drain_live_devices: int
    drain_live_s: float
    outage_warm_s: float = 5.0


PROFILES: dict[str, Profile] = {
    # CI: every phase, every system, tiny loads (well under 90 s with a running Kafka).
    "smoke": Profile(
        Params(devices=10, rate_per_device=10, fixed_s=1.5, saturate_s=1.5, inflight=10,
               latency_s=1.5),
        reps=1, outage_s=3, outage_devices=10, outage_rate=100,
        drain_rows=2_000, drain_live_devices=5, drain_live_s=2, outage_warm_s=1.5,
    ),
    # Under 10 minutes: 1,000 msg/s from 100 devices, 3 repetitions of short phases.
    "quick": Profile(
        Params(devices=100, rate_per_device=10, fixed_s=5, saturate_s=4, inflight=20, latency_s=4),
        reps=3, outage_s=30, outage_devices=100, outage_rate=500,
        drain_rows=100_000, drain_live_devices=50, drain_live_s=10,
    ),
    # The sizes: 1,000 devices, a 1,000,000-message backlog, a 30-minute outage.
    "full": Profile(
        Params(devices=1000, rate_per_device=1, fixed_s=30, saturate_s=60, inflight=20,
               latency_s=30),
        reps=3, outage_s=1800, outage_devices=1000, outage_rate=500,
        drain_rows=1_000_000, drain_live_devices=100, drain_live_s=60,
    ),
}  # fmt: skip


def ensure_mosquitto() -> tuple[str, str]:
    """The mosquitto and mosquitto_pub binaries; installs the Debian packages when missing
    (as root), as the README's set-up would."""
    pub = shutil.which("mosquitto_pub")
    broker = mosquitto_path()
    if broker and pub:
        return broker, pub
    if os.geteuid() != 0:
        raise SystemExit("install mosquitto and mosquitto-clients (apt-get) first")
    print("bench: installing mosquitto mosquitto-clients with apt-get", file=sys.stderr)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "mosquitto", "mosquitto-clients"], check=True, env=env
    )
    pub, broker = shutil.which("mosquitto_pub"), mosquitto_path()
    if not (broker and pub):
        raise SystemExit("mosquitto still missing after apt-get install")
    return broker, pub


def _log(message: str) -> None:
    print(f"bench {datetime.now(UTC):%H:%M:%S} {message}", file=sys.stderr, flush=True)


def _one_system(
    name: str, rep: int, root: Path, *, kafka: KafkaState, code: Path, bins: tuple[str, str],
    p: Params,
) -> dict[str, Any]:  # fmt: skip
    """All phases of one system in one repetition."""
    workdir = root / f"rep{rep}-{name}"
    workdir.mkdir(parents=True)
    system = make_system(name, workdir, kafka=kafka, code=code, mosquitto=bins[0], rep=rep)
    out: dict[str, Any] = {}
    try:
        out["thirdparty"] = thirdparty_phase(system, bins[1], p, rep)
        out["fixed"] = sim_fixed_phase(system, code, workdir, p, rep)
        out["saturate"] = saturate_phase(system, code, workdir, p, rep)
        e2e = out["saturate"].get("e2e_msgs_per_s")
        if name in KAFKA_SYSTEMS and e2e:
            out["latency"] = latency_phase(system, code, workdir, p, rep, rate=e2e / 2)
        out["rss"] = rss_of(system)
    finally:
        system.stop()
    return out


def run_suite(args: argparse.Namespace, profile: Profile, root: Path) -> dict[str, Any]:
    started, started_utc = time.monotonic(), datetime.now(UTC)
    bins = ensure_mosquitto()
    code, code_info = prepare_code(args.code, root / "code")
    p = profile.params
    notes: list[str] = []
    kafka = read_state(args.kafka_state) if args.kafka_state else None
    own_kafka = kafka is None
    if kafka is None:
        _log("starting the local Kafka (mutual TLS)")
        kafka = start_kafka(root / "kafka", root / "pki", topics=())
    raw: dict[str, dict[str, Any]] = {n: {"runs": [], "errors": []} for n in SYSTEMS}
    tidegate: dict[str, Any] = {}
    try:
        for rep in range(profile.reps):
            order = list(SYSTEMS[rep % 4 :] + SYSTEMS[: rep % 4])
            for name in [n for n in order if n in args.systems]:
                _log(f"rep {rep + 1}/{profile.reps}: {name}")
                try:
                    run = _one_system(name, rep, root, kafka=kafka, code=code, bins=bins, p=p)
                    raw[name]["runs"].append(run)
                    _log(json.dumps({name: run}, default=str)[:600])
                except Exception as exc:
                    raw[name]["errors"].append(f"rep {rep}: {type(exc).__name__}: {exc}")
                    _log(traceback.format_exc())
        if not args.skip_drain:
            _log(f"tidegate: backlog drain of {profile.drain_rows:,} messages")
            try:
                tidegate["drain"] = drain_figures(
                    kafka, root / "drain", code=code, rows=profile.drain_rows,
                    live_devices=profile.drain_live_devices, live_s=profile.drain_live_s,
                )  # fmt: skip
            except (Exception, SystemExit) as exc:  # drain.py reports failures as exits
                tidegate["drain"] = {"error": f"{type(exc).__name__}: {exc}"}
                _log(traceback.format_exc())
        if not args.skip_outage:
            outage_s = args.outage_s or profile.outage_s
            _log(f"tidegate: Kafka outage of {outage_s:g} s")
            try:
                tidegate["outage"] = outage_figures(
                    kafka, root / "outage", code=code, mosquitto=bins[0], outage_s=outage_s,
                    devices=profile.outage_devices, rate=profile.outage_rate,
                    warm_s=profile.outage_warm_s,
                )  # fmt: skip
            except (Exception, SystemExit) as exc:  # drain.py reports failures as exits
                tidegate["outage"] = {"error": f"{type(exc).__name__}: {exc}"}
                _log(traceback.format_exc())
    finally:
        if own_kafka:
            stop_kafka(kafka.state_file)
    scale_json = args.scale_json or find_scale_json(REPO / "docs" / "bench-results")
    tidegate["scale_10k"] = scale_figures(scale_json)
    systems: dict[str, Any] = {}
    for name, data in raw.items():
        runs = data["runs"]
        phases = {
            ph: {"median": median_of([r[ph] for r in runs if ph in r]),
                 "runs": [r[ph] for r in runs if ph in r]}
            for ph in ("thirdparty", "fixed", "saturate", "latency")
            if any(ph in r for r in runs)
        }  # fmt: skip
        rss_runs = [r["rss"] for r in runs if "rss" in r]
        systems[name] = {
            "phases": phases,
            "rss": {"median": median_of(rss_runs), "runs": rss_runs},
            "errors": data["errors"],
        }
        notes += [f"{name}: {e}" for e in data["errors"]]
    params = asdict(p) | {
        "offered_rate": p.offered_rate,
        "reps": profile.reps,
        "drain_rows": profile.drain_rows,
        "drain_live_devices": profile.drain_live_devices,
        "outage_s": args.outage_s or profile.outage_s,
        "outage_rate": profile.outage_rate,
    }
    return {
        "schema": SCHEMA,
        "profile": args.profile,
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "started_utc": started_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine_info() | {"loadavg_at_end": os.getloadavg()},
        "code": code_info,
        "params": params,
        "systems": systems,
        "tidegate": tidegate,
        "ratios": ratios(systems),
        "targets": evaluate_targets(systems, tidegate, params),
        "notes": notes,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    size = parser.add_mutually_exclusive_group()
    for name in PROFILES:
        size.add_argument(
            f"--{name}", dest="profile", action="store_const", const=name,
            help={"smoke": "tiny loads, for CI (< 90 s)", "quick": "under 10 minutes",
                  "full": "the issue's sizes (about 70 minutes)"}[name],
        )  # fmt: skip
    parser.set_defaults(profile="quick")
    parser.add_argument("--out", type=Path, help="output dir (default var/bench/<timestamp>)")
    parser.add_argument("--reps", type=int, help="repetitions (default: the profile's)")
    parser.add_argument("--outage-s", type=float, help="Kafka outage length (default: profile's)")
    parser.add_argument("--skip-drain", action="store_true")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS),
        help="comma-separated subset of the systems (a focused rerun; targets that need a "
        "missing system have no figure)",
    )  # fmt: skip
    parser.add_argument("--skip-outage", action="store_true")
    parser.add_argument(
        "--code", default="HEAD",
        help="git ref to measure (exported with git archive), or 'worktree' for the files on disk",
    )  # fmt: skip
    parser.add_argument(
        "--kafka-state", type=Path,
        help="use this running local Kafka (state.json of `tidegate dev kafka up`) "
        "instead of starting one; its brokers are SIGSTOPped during the outage phase",
    )  # fmt: skip
    parser.add_argument(
        "--scale-json", type=Path,
        help="results of the 10,000-device benchmark (bench/fleet_scale.py) to take the 10k "
        "figure from (default: the newest docs/bench-results/*10k*.json or fleet*scale*.json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.reps is not None and not 1 <= args.reps <= 20:
        parser.error("--reps: 1..20")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown or not args.systems:
        parser.error(f"--systems: choose from {', '.join(SYSTEMS)} (got {unknown or 'none'})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    profile = PROFILES[args.profile]
    if args.reps:
        profile = Profile(**(asdict(profile) | {"reps": args.reps, "params": profile.params}))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "var" / "bench" / stamp
    out = out if out.is_absolute() else Path.cwd() / out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-") as tmp:
        results = run_suite(args, profile, Path(tmp))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    write_chart(results, out / "results.png")
    print(markdown(results))
    print(f"bench: results in {out} ({results['elapsed_s']:.0f} s)")
    return 0
