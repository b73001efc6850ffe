"""10,000 simulated devices connected at once to the real gateway (issue 6, "Simulator at scale").

``python -m bench.fleet_scale [--profile configs/sim/scale-10k.toml] [--duration 240]
[--out docs/bench-results/fleet-scale-10k.json]``

One gateway (password authentication, anonymous devices refused, forwarding to a local Kafka
over mutual TLS) and one ``tidegate sim --profile`` run whose device types connect in waves
(1,000, +4,000, +5,000 by default) and then hold at about one message per device per minute.
Sampled once a second: the gateway's ESTABLISHED MQTT connections (``/proc/net/tcp``), its RSS
and CPU, and the simulator's RSS (all its worker processes). Reported:

- gateway RSS on each connection plateau (the last sample with that many devices connected),
  and its peak;
- connect time of the whole fleet (simulator: start → last device's first CONNACK) and of
  the last wave (its start → every device connected);
- gateway CPU while the waves connect and while 10,000 devices hold at ~1 msg/min;
- the simulator's counters, and ``tidegate verify`` on its merged ack ledger.

Bounded: every wait has a deadline and ``--time-box`` (default 900 s) caps the run; the
gateway, the simulator and a Kafka started here are stopped by their own pid.

Passwords: every device shares one password. To keep 10,000 CONNECTs from costing 10,000
full scrypt checks (n=2^14, tens of ms each, in the gateway's worker threads), the password
file written here hashes with ``--scrypt-n`` (default 2^10); the gateway verifies whatever
parameters the file names. The connect times below therefore measure the broker, not scrypt.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import REPO, Child, cpu_sample, rss_mb, wait_for
from device_sim.options import device_id
from device_sim.profile import load_profile
from gateway.dev.kafka import KafkaState, read_state, start_kafka, stop_kafka

__all__ = ["Sample", "cheap_password_entries", "count_established", "main"]

PASSWORD = "fleet-scale-password"


@dataclass(frozen=True)
class Sample:
    """One look at the gateway and the simulator."""

    t_s: float
    """Seconds since the simulator started."""
    connections: int
    gateway_rss_mb: float
    gateway_cpu_s: float
    sim_rss_mb: float
    sim_cpu_s: float = 0.0
    """CPU seconds of the simulator and its workers so far."""
    load_1m: float = 0.0
    """The machine's 1-minute load average (other work shares the cores)."""


def cheap_password_entries(ids: list[str], password: str, scrypt_n: int) -> str:
    """Password-file text giving every id ``password``, hashed once with scrypt n=``scrypt_n``.

    One salt for all lines is fine for a benchmark fleet sharing one password; a real fleet
    uses ``tidegate devices add`` (a fresh salt and n=2^14 per device).
    """
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=scrypt_n, r=8, p=1, maxmem=64 << 20, dklen=32
    )
    b64 = base64.b64encode
    encoded = f"scrypt${scrypt_n}$8$1${b64(salt).decode()}${b64(digest).decode()}"
    return "".join(f"{i}:{encoded}\n" for i in ids)


def count_established(port: int) -> int:
    """ESTABLISHED TCP connections whose local port is ``port`` (IPv4, from /proc/net/tcp)."""
    suffix = f":{port:04X}"
    n = 0
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split(None, 4)
            if fields[3] == "01" and fields[1].endswith(suffix):
                n += 1
    return n


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the simulator's spawned workers)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return out


def _tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in _descendants(pid):
        try:
            total += cpu_sample(p).total_s
        except OSError:
            continue
    return total


def _tree_rss_mb(pid: int) -> float:
    total = 0.0
    for p in _descendants(pid):
        try:
            total += rss_mb(p)[0]
        except OSError:
            continue
    return total


def _gateway_config(directory: Path, kafka: KafkaState, passwords: Path) -> Path:
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[gateway]
id = "gw-fleet-scale"
data_dir = "{directory / "data"}"

[[broker.listeners]]
name = "tcp"
host = "127.0.0.1"
port = 0

[broker]
allow_anonymous = false
password_file = "{passwords}"

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


def _plateaus(samples: list[Sample], levels: list[int]) -> dict[str, Any]:
    """Per level: RSS at the last sample with ``level`` (±1 %) devices connected."""
    out: dict[str, Any] = {}
    for level in levels:
        near = [s for s in samples if abs(s.connections - level) <= max(5, level // 100)]
        if near:
            last = near[-1]
            out[str(level)] = {"t_s": last.t_s, "gateway_rss_mb": round(last.gateway_rss_mb, 1)}
    return out


def _share(samples: list[Sample], field: str, start_s: float, end_s: float) -> float | None:
    """CPU of ``field`` over [start_s, end_s] in % of one core."""
    window = [s for s in samples if start_s <= s.t_s <= end_s]
    if len(window) < 2 or window[-1].t_s <= window[0].t_s:
        return None
    used: float = getattr(window[-1], field) - getattr(window[0], field)
    return round(100 * used / (window[-1].t_s - window[0].t_s), 1)


def run(args: argparse.Namespace, root: Path, kafka: KafkaState) -> dict[str, Any]:
    """Gateway + simulator, sampled; returns the result record."""
    profile = load_profile(args.profile)
    ids = [device_id(profile.type_of(i)[0].id_prefix, i) for i in range(profile.devices)]
    passwords = root / "devices.passwd"
    passwords.write_text(cheap_password_entries(ids, PASSWORD, args.scrypt_n))
    passwords.chmod(0o600)
    gw_dir = root / "gateway"
    gw_dir.mkdir()
    config = _gateway_config(gw_dir, kafka, passwords)
    gateway = Child(
        "gateway",
        [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
        gw_dir / "gateway.log",
    )
    sim: Child | None = None
    samples: list[Sample] = []
    try:

        def ready() -> dict[str, Any] | None:
            gateway.check_alive()
            try:
                data: dict[str, Any] = json.loads((gw_dir / "data/runtime.json").read_text())
            except (OSError, ValueError):
                return None
            return data if data.get("pid") == gateway.pid else None

        runtime = wait_for(ready, 60, "the gateway's runtime.json")
        port = int(runtime["mqtt"][0]["port"])
        idle_rss = rss_mb(gateway.pid)[0]
        summary, ledger = root / "sim.json", root / "acks.jsonl"
        argv = [
            sys.executable, "-m", "device_sim", "sim",
            "--profile", str(args.profile), "--port", str(port),
            "--duration", str(args.duration), "--json", str(summary),
            "--ledger", str(ledger), "--quiet",
        ]  # fmt: skip
        # The password goes through the environment (the simulator's envvar), never argv.
        os.environ["TIDEGATE_SIM_PASSWORD"] = PASSWORD
        started = time.monotonic()
        sim = Child("sim", argv, root / "sim.log")
        deadline = started + args.time_box
        while sim.alive() and time.monotonic() < deadline:
            gateway.check_alive()
            t = time.monotonic() - started
            samples.append(
                Sample(
                    t_s=round(t, 2),
                    connections=count_established(port),
                    gateway_rss_mb=rss_mb(gateway.pid)[0],
                    gateway_cpu_s=cpu_sample(gateway.pid).total_s,
                    sim_rss_mb=_tree_rss_mb(sim.pid),
                    sim_cpu_s=_tree_cpu_s(sim.pid),
                    load_1m=os.getloadavg()[0],
                )
            )
            time.sleep(1.0)  # sampling period; the loop is bounded by the deadline
        timed_out = sim.alive()
        sim.stop(grace_s=30)
        sim_result: dict[str, Any] = (
            json.loads(summary.read_text()) if summary.exists() else {"error": "no summary"}
        )
        peak_gateway = rss_mb(gateway.pid)[1]
        verdict = _verify(config, ledger) if ledger.exists() and not args.no_verify else None
    finally:
        if sim is not None:
            sim.stop()
        gateway.stop()
    return _result(args, profile, samples, sim_result, idle_rss, peak_gateway, verdict, timed_out)


def _verify(config: Path, ledger: Path) -> dict[str, Any]:
    import subprocess

    out = subprocess.run(
        [
            *(sys.executable, "-m", "device_sim", "verify", "-c", str(config)),
            *("--ledger", str(ledger), "--wait", "60", "--timeout", "120"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=400,
        check=False,
    )
    total = [line for line in out.stdout.splitlines() if line.startswith("acknowledged=")]
    return {"exit_code": out.returncode, "total": total[-1] if total else out.stdout[-500:]}


def _result(  # noqa: PLR0917 (one call site, all facts of one run)
    args: argparse.Namespace,
    profile: Any,
    samples: list[Sample],
    sim: dict[str, Any],
    idle_rss: float,
    peak_gateway: float,
    verdict: dict[str, Any] | None,
    timed_out: bool,
) -> dict[str, Any]:
    levels, total = [], 0
    for kind in profile.device_types:
        total += kind.count
        levels.append(total)
    last = profile.device_types[-1]
    full = [s for s in samples if s.connections >= total]
    all_connected_at = full[0].t_s if full else None
    hold = [s for s in samples if s.connections >= total * 0.99]
    return {
        "devices": total,
        "profile": str(args.profile),
        "duration_s": args.duration,
        "scrypt_n": args.scrypt_n,
        "timed_out": timed_out,
        "max_connections_seen": max((s.connections for s in samples), default=0),
        "all_connected_at_s": all_connected_at,
        "last_wave_connect_s": None
        if all_connected_at is None
        else round(all_connected_at - last.connect_after_s, 1),
        "gateway_idle_rss_mb": round(idle_rss, 1),
        "gateway_rss_by_connected": _plateaus(samples, levels),
        "gateway_peak_rss_mb": round(peak_gateway, 1),
        "gateway_cpu_pct_connecting": _share(
            samples, "gateway_cpu_s", 0.0, all_connected_at or 0.0
        ),
        "gateway_cpu_pct_holding": _share(
            samples, "gateway_cpu_s", hold[0].t_s if hold else 0, hold[-1].t_s if hold else 0
        ),
        "hold_s": round(hold[-1].t_s - hold[0].t_s, 1) if hold else 0,
        "sim_peak_rss_mb_all_workers": round(max((s.sim_rss_mb for s in samples), default=0), 1),
        "sim_cpu_pct_connecting": _share(samples, "sim_cpu_s", 0.0, all_connected_at or 0.0),
        "load_avg_1m_max": round(max((s.load_1m for s in samples), default=0), 1),
        "sim": sim,
        "verify": verdict,
        "samples": [asdict(s) for s in samples],
    }


def markdown(result: dict[str, Any]) -> str:
    """The docs/benchmarks.md table for one run."""
    rows = [
        ("devices connected at once (max seen)", f"{result['max_connections_seen']:,}"),
        ("fleet connect time (sim: start → last first CONNACK)",
         f"{result['sim'].get('counters', {}).get('connect_time_s', 0):.1f} s"),
        ("last wave connected in", f"{result['last_wave_connect_s']} s"),
        ("gateway RSS idle (no devices)", f"{result['gateway_idle_rss_mb']} MB"),
    ]  # fmt: skip
    for level, value in result["gateway_rss_by_connected"].items():
        rows.append((f"gateway RSS, {int(level):,} connected", f"{value['gateway_rss_mb']} MB"))
    rows += [
        ("gateway peak RSS", f"{result['gateway_peak_rss_mb']} MB"),
        ("gateway CPU while connecting", f"{result['gateway_cpu_pct_connecting']} %"),
        (f"gateway CPU holding {result['devices']:,} (~1 msg/min each, {result['hold_s']} s)",
         f"{result['gateway_cpu_pct_holding']} %"),
        ("simulator RSS, all workers", f"{result['sim_peak_rss_mb_all_workers']} MB"),
        ("simulator CPU while connecting", f"{result['sim_cpu_pct_connecting']} %"),
        ("machine load average (1 min, max)", f"{result['load_avg_1m_max']}"),
    ]  # fmt: skip
    if result["verify"] is not None:
        rows.append(
            ("verify", f"exit {result['verify']['exit_code']}: {result['verify']['total']}")
        )
    return "\n".join(["| what | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_scale", description=__doc__)
    parser.add_argument("--profile", type=Path, default=REPO / "configs/sim/scale-10k.toml")
    parser.add_argument("--duration", type=float, default=240.0, help="publishing phase, s")
    parser.add_argument("--scrypt-n", type=int, default=1 << 10)
    parser.add_argument("--time-box", type=float, default=900.0, help="hard cap, s")
    parser.add_argument("--kafka-state", type=Path, default=os.environ.get("TIDEGATE_KAFKA_STATE"))
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        root = Path(tmp)
        own_kafka = args.kafka_state is None
        kafka = (
            start_kafka(root / "kafka", root / "pki")
            if own_kafka
            else read_state(Path(args.kafka_state))
        )
        try:
            result = run(args, root, kafka)
        finally:
            if own_kafka:
                stop_kafka(kafka.state_file)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    ok = not result["timed_out"] and result["max_connections_seen"] >= result["devices"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
