"""QoS1 ingest, side by side: tidegate (durable, into Kafka) vs bare amqtt vs Mosquitto.

``python -m bench.ingest [--runs 3] [--devices 100] [--count 200] [--out FILE.json]``

Each run starts every target fresh (in a rotated order, so drift on a shared machine does
not always hit the same target) and offers it the same simulator load: ``--devices`` devices,
QoS1, ``--count`` messages each, ``--inflight`` un-acked per device, as fast as the window
allows (or ``--rate`` per device). Measured per run and target:

- msg/s: acknowledged messages over the simulator's window (first publish → last PUBACK);
- PUBACK latency p50/p99 (simulator histogram, ±2 %);
- broker CPU µs per message: utime+stime of the broker process from just before the load
  until it is idle again (so work deferred past the last PUBACK counts: tidegate's Kafka
  forwarding, amqtt's broadcast backlog), and separately until the last PUBACK;
- broker RSS (current and peak) at the end;
- tidegate only: end-to-end msg/s into Kafka (first publish → admin /status shows every
  message forwarded and the buffer empty), and the Kafka JVM's CPU per message;
- the simulator's own CPU per message (it shares the cores with the broker).

The local Kafka (mutual TLS) is started once, in a temp dir, and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import REPO, Child, cpu_sample, rss_mb, system_cpu
from bench.speed_probe import speed_probe
from bench.targets import AmqttTarget, GatewayTarget, MosquittoTarget, Target, mosquitto_path
from gateway.dev.kafka import KAFKA_VERSION, KafkaState, start_kafka, stop_kafka

__all__ = ["Load", "RunResult", "main", "machine_info"]

_IDLE_WINDOW_S = 0.5
_IDLE_MAX_CPU_S = 0.011
"""A target counts as idle after a 0.5 s window with at most one 10 ms clock tick of CPU."""


@dataclass(frozen=True)
class Load:
    """The simulator load every target gets."""

    devices: int
    count: int
    inflight: int
    rate: float
    payload_size: int

    @property
    def total(self) -> int:
        return self.devices * self.count


@dataclass
class RunResult:
    """One target, one run."""

    target: str
    run: int
    sent: int
    acked: int
    window_s: float
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    steady_p99_ms: float
    """PUBACK p99 of messages sent once every simulated device had connected (no ramp)."""
    cpu_us_per_msg: float
    """Broker CPU from load start until idle again, per acknowledged message."""
    cpu_us_per_msg_at_ack: float
    """Broker CPU from load start until the simulator finished (last PUBACK + disconnect)."""
    rss_mb: float
    peak_rss_mb: float
    sim_cpu_us_per_msg: float
    e2e_msgs_per_s: float | None = None
    kafka_cpu_us_per_msg: float | None = None
    drain_after_last_ack_s: float | None = None
    rows_per_commit: float | None = None
    """tidegate: messages per durable SQLite transaction (group commit), mean over the run."""
    rows_per_kafka_batch: float | None = None
    """tidegate: messages per forwarder batch (one lease, one gathered send)."""
    synchronous: str | None = None
    foreign_cpu_pct: float = 0.0
    """CPU used during the load window by processes other than the broker, the simulator and
    Kafka (other people's work on the shared machine), in % of one core."""
    steal_pct: float = 0.0
    """CPU stolen by the hypervisor during the load window, in % of one core."""
    note: str = ""


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kafka": KAFKA_VERSION,
        "loadavg": os.getloadavg(),
        # This kind of machine varies by a third from one to the next (bench/speed_probe.py).
        "speed_probe": speed_probe(),
    }


def _run_sim(
    code: Path, port: int, load: Load, out: Path, *, seed: int, timeout_s: float
) -> tuple[dict[str, Any], float]:
    """Run the simulator as a child process; return its JSON summary and its CPU seconds."""
    argv = [
        sys.executable, "-m", "device_sim", "sim",
        "--port", str(port),
        "--devices", str(load.devices),
        "--count", str(load.count),
        "--inflight", str(load.inflight),
        "--rate", str(load.rate),
        "--payload-size", str(load.payload_size),
        "--seed", str(seed),
        "--max-time", str(int(timeout_s)),
        "--drain-timeout", "30",
        "--json", str(out),
        "--quiet",
    ]  # fmt: skip
    sim = Child("simulator", argv, out.with_suffix(".log"), cwd=code)
    pid = 0
    deadline = time.monotonic() + timeout_s + 60
    try:
        while time.monotonic() < deadline:
            # wait4 gives this child's own rusage: the simulator's CPU, threads included.
            pid, status, usage = os.wait4(sim.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)  # polling a child; the deadline bounds it
    finally:
        # Timeout or Ctrl-C: the simulator runs in its own session, so stop it here
        # (a no-op once it has been reaped).
        if not pid:
            sim.stop()
    if not pid:
        raise TimeoutError("simulator did not finish in time")
    sim.proc.returncode = os.waitstatus_to_exitcode(status)
    if not out.exists():
        raise RuntimeError(
            f"simulator failed ({sim.proc.returncode}): {sim.log.read_text()[-2000:]}"
        )
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary, usage.ru_utime + usage.ru_stime


def prepare_code(ref: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """The source tree the measured processes run from, and what it is.

    ``worktree``: the repository as it is on disk (other people's edits in progress
    included). Any other value is a git ref, exported with ``git archive`` to ``dest`` (plus
    this bench/ directory), so a run measures one known commit whatever else is being edited.
    """
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if ref == "worktree":
        return REPO, {"code": "worktree", "head": head.stdout.strip(), "dirty": bool(dirty)}
    commit = subprocess.run(
        [*git, "rev-parse", f"{ref}^{{commit}}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run([*git, "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    shutil.copytree(Path(__file__).parent, dest / "bench", dirs_exist_ok=True)
    return dest, {"code": ref, "commit": commit}


def _wait_idle(pid: int, timeout_s: float = 30.0) -> bool:
    """Wait until ``pid`` used at most one clock tick of CPU over a 0.5 s window."""
    deadline = time.monotonic() + timeout_s
    before = cpu_sample(pid)
    while time.monotonic() < deadline:
        time.sleep(_IDLE_WINDOW_S)  # measuring a window of CPU time, not waiting on an event
        after = cpu_sample(pid)
        if after.total_s - before.total_s <= _IDLE_MAX_CPU_S:
            return True
        before = after
    return False


def run_one(
    target: Target,
    run: int,
    load: Load,
    workdir: Path,
    *,
    kafka: KafkaState | None,
    code: Path,
) -> RunResult:
    """Start ``target``, offer it the load, measure, stop it."""
    child: Child
    try:
        # Inside the try: a start that fails half-way (process up, never ready) is stopped too.
        child, port = target.start(workdir)
        _wait_idle(child.pid, 10)
        kafka_pid = kafka.brokers[0].pid if kafka is not None else None
        kafka_before = cpu_sample(kafka_pid) if kafka_pid else None
        before = cpu_sample(child.pid)
        busy_before, steal_before = system_cpu()
        summary, sim_cpu_s = _run_sim(
            code, port, load, workdir / f"sim-{target.name}-{run}.json", seed=run, timeout_s=180
        )
        at_ack = cpu_sample(child.pid)
        busy_after, steal_after = system_cpu()
        kafka_at_ack = cpu_sample(kafka_pid) if kafka_pid else None
        ours = (at_ack.total_s - before.total_s) + sim_cpu_s
        if kafka_at_ack is not None and kafka_before is not None:
            ours += kafka_at_ack.total_s - kafka_before.total_s
        load_s = at_ack.at - before.at
        counters = summary["counters"]
        acked = int(counters["acked"])
        drain = target.drain(acked, timeout_s=120)
        idle = _wait_idle(child.pid)
        after = cpu_sample(child.pid)
        current_rss, peak_rss = rss_mb(child.pid)
        lat = summary["puback_latency_ms"]
        per_msg = 1e6 / max(1, acked)
        result = RunResult(
            target=target.name,
            run=run,
            sent=int(counters["sent"]),
            acked=acked,
            window_s=round(float(summary["send_window_s"]), 3),
            msgs_per_s=round(float(summary["msgs_per_s"]), 1),
            p50_ms=float(lat["p50"]),
            p99_ms=float(lat["p99"]),
            max_ms=float(lat["max"]),
            steady_p99_ms=float(summary["puback_latency_steady_ms"]["p99"]),
            cpu_us_per_msg=round((after.total_s - before.total_s) * per_msg, 1),
            cpu_us_per_msg_at_ack=round((at_ack.total_s - before.total_s) * per_msg, 1),
            rss_mb=round(current_rss, 1),
            peak_rss_mb=round(peak_rss, 1),
            sim_cpu_us_per_msg=round(sim_cpu_s * per_msg, 1),
            foreign_cpu_pct=round(max(0.0, busy_after - busy_before - ours) / load_s * 100, 1),
            steal_pct=round((steal_after - steal_before) / load_s * 100, 1),
            note="" if idle else "did not become idle within 30 s",
        )
        if drain is not None:
            span = drain.done_wall - float(counters["first_send_wall"])
            result.e2e_msgs_per_s = round(acked / span, 1)
            result.drain_after_last_ack_s = round(
                drain.done_wall - float(counters["last_ack_wall"]), 3
            )
            result.rows_per_commit = round(drain.rows_committed / max(1, drain.commits), 1)
            result.rows_per_kafka_batch = round(drain.forwarded / max(1, drain.batches), 1)
            result.synchronous = drain.synchronous
        if kafka_pid and kafka_before is not None and drain is not None:
            kafka_after = cpu_sample(kafka_pid)
            result.kafka_cpu_us_per_msg = round(
                (kafka_after.total_s - kafka_before.total_s) * per_msg, 1
            )
        if acked != load.total:
            result.note = f"{result.note}; only {acked}/{load.total} acknowledged".strip("; ")
        return result
    finally:
        target.stop()


_METRICS = (
    "msgs_per_s",
    "p50_ms",
    "p99_ms",
    "steady_p99_ms",
    "cpu_us_per_msg",
    "cpu_us_per_msg_at_ack",
    "rss_mb",
    "peak_rss_mb",
    "sim_cpu_us_per_msg",
    "e2e_msgs_per_s",
    "kafka_cpu_us_per_msg",
    "drain_after_last_ack_s",
    "rows_per_commit",
    "rows_per_kafka_batch",
    "foreign_cpu_pct",
    "steal_pct",
)


def medians(results: list[RunResult]) -> dict[str, dict[str, float]]:
    """Target → metric → median over runs (metrics a target does not have are left out)."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r.target for r in results):
        rows = [r for r in results if r.target == name]
        out[name] = {}
        for metric in _METRICS:
            values = [getattr(r, metric) for r in rows if getattr(r, metric) is not None]
            if values:
                out[name][metric] = round(statistics.median(values), 2)
    return out


def ratios(med: dict[str, dict[str, float]], base: str) -> dict[str, dict[str, float]]:
    """Each target's median msg/s and CPU µs/msg divided by ``base``'s."""
    if base not in med:
        return {}
    ref = med[base]
    return {
        name: {
            "msgs_per_s": round(m["msgs_per_s"] / ref["msgs_per_s"], 2),
            "cpu_us_per_msg": round(m["cpu_us_per_msg"] / ref["cpu_us_per_msg"], 2),
        }
        for name, m in med.items()
    }


def markdown(results: list[RunResult], med: dict[str, dict[str, float]]) -> str:
    """Tables for docs/benchmarks.md: medians, then every run."""

    def fmt(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [
        "| target | msg/s | PUBACK p50 ms | p99 ms | p99 once connected | CPU µs/msg "
        "| (at last ack) | RSS MB (peak) | sim CPU µs/msg | e2e msg/s | Kafka CPU µs/msg "
        "| other CPU % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, m in med.items():
        lines.append(
            f"| {name} | {fmt(m['msgs_per_s'])} | {fmt(m['p50_ms'], 1)} | {fmt(m['p99_ms'], 1)} "
            f"| {fmt(m['steady_p99_ms'], 1)} | {fmt(m['cpu_us_per_msg'])} "
            f"| {fmt(m['cpu_us_per_msg_at_ack'])} "
            f"| {fmt(m['rss_mb'])} ({fmt(m['peak_rss_mb'])}) | {fmt(m['sim_cpu_us_per_msg'])} "
            f"| {fmt(m.get('e2e_msgs_per_s'))} | {fmt(m.get('kafka_cpu_us_per_msg'))} "
            f"| {fmt(m['foreign_cpu_pct'])} |"
        )
    lines += [
        "",
        "| target | run | acked | msg/s | p50 ms | p99 ms | CPU µs/msg | at ack | RSS MB "
        "| e2e msg/s | drain s | other CPU % | note |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in sorted(results, key=lambda r: (r.target, r.run)):
        lines.append(
            f"| {r.target} | {r.run} | {r.acked} | {fmt(r.msgs_per_s)} | {fmt(r.p50_ms, 1)} "
            f"| {fmt(r.p99_ms, 1)} | {fmt(r.cpu_us_per_msg)} | {fmt(r.cpu_us_per_msg_at_ack)} "
            f"| {fmt(r.rss_mb)} | {fmt(r.e2e_msgs_per_s)} | {fmt(r.drain_after_last_ack_s, 2)} "
            f"| {fmt(r.foreign_cpu_pct)} | {r.note} |"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="QoS1 ingest: tidegate vs amqtt vs Mosquitto")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--count", type=int, default=200, help="messages per device")
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.0, help="msg/s per device; 0 = max")
    parser.add_argument("--payload-size", type=int, default=64)
    parser.add_argument(
        "--targets",
        default="tidegate,amqtt-default,amqtt-anonymous,mosquitto",
        help="comma-separated subset of the default; tidegate@REF adds a gateway at a git ref",
    )
    parser.add_argument(
        "--code",
        default="HEAD",
        help="git ref to measure (exported to a temp dir), or 'worktree' for the files on disk",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 20 or not 1 <= args.devices <= 2000 or not 1 <= args.count <= 10_000:
        parser.error("--runs 1..20, --devices 1..2000, --count 1..10000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    load = Load(args.devices, args.count, args.inflight, args.rate, args.payload_size)
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    notes: list[str] = []
    started = time.monotonic()
    machine = machine_info()
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-") as tmp:
        root = Path(tmp)
        code, main_code = prepare_code(args.code, root / "code")
        code_info: dict[str, Any] = {"default": main_code}
        kafka: KafkaState | None = None
        try:
            targets: list[Target] = []
            for name in wanted:
                if name == "tidegate" or name.startswith("tidegate@"):
                    # tidegate@REF measures another commit of the gateway (A/B in one run);
                    # the simulator and the peers always run from --code.
                    ref = name.partition("@")[2]
                    gw_code = code
                    if ref:
                        gw_code, info = prepare_code(ref, root / f"code-{len(code_info)}")
                        code_info[name] = info
                    if kafka is None:
                        kafka = start_kafka(root / "kafka", root / "pki")
                    targets.append(GatewayTarget(kafka, gw_code, name=name))
                elif name.startswith("amqtt-"):
                    targets.append(AmqttTarget(plugins=name.removeprefix("amqtt-"), code=code))
                elif name == "mosquitto":
                    binary = mosquitto_path()
                    if binary is None:
                        notes.append("mosquitto is not installed: skipped")
                    else:
                        targets.append(MosquittoTarget(binary))
                else:
                    raise SystemExit(f"unknown target {name!r}")
            for run in range(args.runs):
                shift = run % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    workdir = root / f"run{run}-{target.name}"
                    workdir.mkdir()
                    result = run_one(target, run, load, workdir, kafka=kafka, code=code)
                    results.append(result)
                    print(json.dumps(asdict(result)), file=sys.stderr, flush=True)
        finally:
            if kafka is not None:
                stop_kafka(kafka.state_file)
    med = medians(results)
    report = {
        "benchmark": "ingest",
        "command": " ".join(["python -m bench.ingest", *(argv or sys.argv[1:])]),
        "machine": machine,
        "loadavg_at_end": os.getloadavg(),
        "code": code_info,
        "load": asdict(load) | {"qos": 1, "total": load.total},
        "elapsed_s": round(time.monotonic() - started, 1),
        "medians": med,
        "ratios_vs_amqtt_default": ratios(med, "amqtt-default"),
        "ratios_vs_amqtt_anonymous": ratios(med, "amqtt-anonymous"),
        "runs": [asdict(r) for r in results],
        "notes": notes,
    }
    if args.out is not None:
        out = args.out if args.out.is_absolute() else REPO / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(results, med))
    print(json.dumps({k: report[k] for k in ("ratios_vs_amqtt_default", "notes", "elapsed_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
