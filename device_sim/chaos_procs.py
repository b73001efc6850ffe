"""Child processes of the chaos harness: the gateway (``tidegate run``) and simulator fleets
(``python -m device_sim sim``), each in its own session so signals reach only what we mean.

Every process is tracked by its PID and stopped by that PID only; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gateway.errors import TidegateError

__all__ = ["ChaosProcessError", "GatewayRunner", "SimRunner", "run_cli"]

_REPO = Path(__file__).resolve().parents[1]


class ChaosProcessError(TidegateError):
    """A child process could not be started or misbehaved."""


def _source_env(src: Path | None) -> tuple[Path, dict[str, str] | None]:
    """Working directory and environment to run code from ``src`` (default: this checkout).

    ``python -m`` puts the working directory first on ``sys.path``, ahead of the editable
    install's finder, so a snapshot of another commit (``git archive``) runs as itself.
    """
    if src is None:
        return _REPO, None
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    return src, env


def _spawn(argv: list[str], log: Path, src: Path | None = None) -> subprocess.Popen[bytes]:
    cwd, env = _source_env(src)
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


async def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait for ``proc`` to exit (in a thread, bounded); SIGKILL it at the deadline."""
    try:
        await asyncio.to_thread(proc.wait, max(0.0, timeout_s))
    except subprocess.TimeoutExpired:
        _kill(proc)


def run_cli(
    args: list[str], *, timeout_s: float = 60.0, src: Path | None = None
) -> tuple[int, str]:
    """``python -m gateway.cli ARGS`` (from ``src`` if given) to completion; returns
    (exit code, output)."""
    cwd, env = _source_env(src)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout_s:.0f}s"
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


class GatewayRunner:
    """The gateway under test: started, SIGKILLed and restarted many times on one data dir."""

    def __init__(self, config: Path, data_dir: Path, log: Path, src: Path | None = None) -> None:
        self.config = config
        self.src = src
        """Source tree to run the gateway from (None: this checkout)."""
        self.data_dir = data_dir
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime: dict[str, Any] = {}
        self.starts = 0

    @property
    def running(self) -> bool:
        """The process exists and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def mqtt_port(self) -> int:
        """The MQTT port of the current process (port 0 in the config: new on each start)."""
        return int(self.runtime["mqtt"][0]["port"])

    async def start(self, timeout_s: float = 60.0) -> float:
        """Start ``tidegate run`` and wait until it wrote its runtime file; returns seconds."""
        if self.running:
            raise ChaosProcessError("gateway is already running")
        started = time.monotonic()
        proc = _spawn(
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(self.config)], self.log
        )
        self.proc = proc
        self.starts += 1
        runtime_file = self.data_dir / "runtime.json"
        deadline = started + timeout_s
        while True:
            if proc.poll() is not None:
                raise ChaosProcessError(
                    f"gateway exited with {proc.returncode} during start; log {self.log}:\n"
                    + _tail(self.log)
                )
            with contextlib.suppress(OSError, ValueError):
                runtime = json.loads(runtime_file.read_text())
                if runtime.get("pid") == proc.pid:
                    self.runtime = runtime
                    return time.monotonic() - started
            if time.monotonic() > deadline:
                _kill(proc)
                raise ChaosProcessError(f"gateway did not start within {timeout_s:.0f}s")
            await asyncio.sleep(0.05)  # polling a file with a deadline

    def kill9(self) -> None:
        """SIGKILL the gateway process (not its group: it has no children worth sparing)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL if needed; returns the exit code."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        await _wait_exit(proc, timeout_s)
        return proc.returncode

    def cleanup(self) -> None:
        """Make sure the process is gone (by PID)."""
        _kill(self.proc)

    async def get(self, path: str, timeout_s: float = 3.0) -> tuple[int, bytes] | None:
        """GET the admin API; None if the gateway does not answer."""
        if not self.running or not self.runtime:
            return None
        admin = self.runtime["admin"]
        url = f"http://{admin['host']}:{admin['port']}{path}"

        def fetch() -> tuple[int, bytes] | None:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:
                    return int(response.status), bytes(response.read())
            except urllib.error.HTTPError as exc:
                return int(exc.code), b""
            except (OSError, ValueError):
                return None

        return await asyncio.to_thread(fetch)

    async def status(self) -> dict[str, Any] | None:
        """``GET /status`` as a dict; None if the gateway does not answer."""
        got = await self.get("/status")
        if got is None or got[0] != 200:
            return None
        with contextlib.suppress(ValueError):
            value: dict[str, Any] = json.loads(got[1])
            return value
        return None

    async def buffer_rows(self) -> int | None:
        """``buffer.rows`` from the status; None if unknown."""
        status = await self.status()
        return None if status is None else int(status["buffer"]["rows"])


class SimRunner:
    """One ``python -m device_sim sim`` fleet writing an ack ledger and a JSON summary."""

    def __init__(self, name: str, work_dir: Path, args: list[str]) -> None:
        self.name = name
        self.ledger = work_dir / f"{name}.acks.jsonl"
        self.summary_path = work_dir / f"{name}.sim.json"
        self.log = work_dir / f"{name}.sim.log"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SimRunner:
        """Launch the fleet (returns at once)."""
        argv = [
            sys.executable,
            "-m",
            "device_sim",
            "sim",
            *self.args,
            "--ledger",
            str(self.ledger),
            "--json",
            str(self.summary_path),
            "--quiet",
        ]
        self.proc = _spawn(argv, self.log)
        return self

    @property
    def running(self) -> bool:
        """Still publishing or draining."""
        return self.proc is not None and self.proc.poll() is None

    async def wait(self, timeout_s: float) -> int | None:
        """Wait for the fleet to exit (bounded); kill it at the deadline. Returns its code."""
        proc = self.proc
        if proc is None:
            return None
        await _wait_exit(proc, timeout_s)
        return proc.returncode

    def summary(self) -> dict[str, Any]:
        """The fleet's JSON summary ({} if it wrote none)."""
        with contextlib.suppress(OSError, ValueError):
            value: dict[str, Any] = json.loads(self.summary_path.read_text())
            return value
        return {}

    def cleanup(self) -> None:
        """Make sure the process is gone (by PID)."""
        _kill(self.proc)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
