"""Process plumbing shared by the benchmarks: CPU and memory from /proc, ports, child processes.

Everything here is bounded: waits have deadlines, children are stopped by their own pid
(SIGTERM, then SIGKILL after a grace period), never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

__all__ = [
    "REPO",
    "Child",
    "CpuSample",
    "cpu_sample",
    "free_port",
    "port_open",
    "rss_mb",
    "system_cpu",
    "wait_for",
    "wait_port",
]

REPO = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")
_T = TypeVar("_T")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds a process used so far (all its threads), and when we looked."""

    user_s: float
    system_s: float
    at: float
    """time.monotonic() of the sample."""

    @property
    def total_s(self) -> float:
        return self.user_s + self.system_s


def cpu_sample(pid: int) -> CpuSample:
    """utime + stime of ``pid`` from /proc/<pid>/stat (clock ticks, usually 10 ms)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return CpuSample(
        user_s=int(fields[11]) / _TICKS, system_s=int(fields[12]) / _TICKS, at=time.monotonic()
    )


def system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all cores, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / _TICKS, steal / _TICKS


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of ``pid`` in MiB, from /proc/<pid>/status."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (callers retry if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], _T | None], timeout_s: float, what: str) -> _T:
    """Poll ``predicate`` every 50 ms until it returns something truthy, or raise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)  # polling a condition; the deadline bounds it


def port_open(port: int) -> bool:
    """Something accepts TCP connections on loopback ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Child:
    """A process we started, in its own session, with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, cwd: Path = REPO) -> None:
        self.name = name
        self.log = log
        handle: IO[bytes] = log.open("ab")
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            handle.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> bool:
        """True while running; raises with the log tail if the process has exited."""
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
        return True

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; idempotent."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=10)


def wait_port(child: Child, port: int, timeout_s: float = 30.0) -> None:
    """Wait until ``child`` accepts TCP connections on ``port`` (or fails)."""
    wait_for(lambda: child.check_alive() and port_open(port), timeout_s, f"{child.name} :{port}")
