"""Load generators for the suite: a third-party one (``mosquitto_pub``, from the Debian
package ``mosquitto-clients``) and the project's simulator (``python -m device_sim sim``).

``mosquitto_pub`` gives the main figure: a fixed offered rate from a generator nobody here
wrote. One process per device, QoS1, ``--repeat N --repeat-delay D``: each process publishes
N messages about D seconds apart (the next after the previous PUBACK and the delay), so D
devices at 1/D msg/s each make the offered rate. The simulator gives what mosquitto_pub
cannot: PUBACK latency histograms, saturating closed-loop load and envelopes with a publish
timestamp (publish → Kafka latency).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Child

__all__ = ["PubFleetResult", "run_mosquitto_pub", "run_sim"]

_PAYLOAD = "x" * 128


@dataclass(frozen=True)
class PubFleetResult:
    devices: int
    offered: int
    """Messages the processes were told to publish (devices x repeat)."""
    failed_processes: int
    window_s: float
    """First process started → last process exited."""
    generator_cpu_s: float


def run_mosquitto_pub(
    binary: str, port: int, *, devices: int, rate_per_device: float, seconds: float, prefix: str
) -> PubFleetResult:
    """``devices`` mosquitto_pub processes at ``rate_per_device`` for about ``seconds``."""
    repeat = max(1, round(rate_per_device * seconds))
    delay = 1.0 / rate_per_device
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        for i in range(devices):
            device = f"{prefix}{i:05d}"
            argv = [
                binary, "-h", "127.0.0.1", "-p", str(port), "-q", "1",
                "-i", device, "-t", f"d/{device}/up/telemetry", "-m", _PAYLOAD,
                "--repeat", str(repeat), "--repeat-delay", f"{delay:.4f}", "--quiet",
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        deadline = started + seconds * 3 + 60
        failed, cpu_s = 0, 0.0
        pending = {p.pid: p for p in procs}
        while pending and time.monotonic() < deadline:
            # wait4 on our own pids only: the suite has other children (the systems).
            for pid in list(pending):
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if not done:
                    continue
                proc = pending.pop(pid)
                proc.returncode = os.waitstatus_to_exitcode(status)
                failed += proc.returncode != 0
                cpu_s += usage.ru_utime + usage.ru_stime
            time.sleep(0.05)  # polling children; the deadline bounds it
        window = time.monotonic() - started
        failed += len(pending)
        return PubFleetResult(devices, devices * repeat, failed, round(window, 3), cpu_s)
    finally:
        for proc in procs:
            if proc.returncode is None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def run_sim(
    code: Path, port: int, sim_args: list[str], out: Path, *, timeout_s: float
) -> tuple[dict[str, Any], float]:
    """The simulator as a child process: its JSON summary and its own CPU seconds."""
    argv = [
        sys.executable, "-m", "device_sim", "sim", "--port", str(port),
        *sim_args,
        "--max-time", str(int(timeout_s)), "--drain-timeout", "30",
        "--json", str(out), "--quiet",
    ]  # fmt: skip
    sim = Child("simulator", argv, out.with_suffix(".log"), cwd=code)
    pid, status = 0, 0
    usage: Any = None
    deadline = time.monotonic() + timeout_s + 60
    try:
        while time.monotonic() < deadline:
            # wait4 gives this child's own rusage: the simulator's CPU, threads included.
            pid, status, usage = os.wait4(sim.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)  # polling a child; the deadline bounds it
    finally:
        if not pid:
            sim.stop()
    if not pid:
        raise TimeoutError("simulator did not finish in time")
    sim.proc.returncode = os.waitstatus_to_exitcode(status)
    if not out.exists():
        tail = sim.log.read_text()[-2000:]
        raise RuntimeError(f"simulator failed ({sim.proc.returncode}): {tail}")
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary, float(usage.ru_utime + usage.ru_stime)
