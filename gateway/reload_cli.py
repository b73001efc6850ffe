"""``tidegate reload``: SIGHUP to the running gateway, then its reload result.

The same as ``kill -HUP <pid>`` (pid from ``<data_dir>/runtime.json``), but it waits for the
gateway to finish the reload (``security.reload`` of ``/status``) and says what happened.
Exit code 0 when the reload was applied, 1 when it failed (the previous configuration is
kept) or no gateway answered.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.config import load_config
from gateway.errors import ConfigError

__all__ = ["reload_command"]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"tidegate: {message}", err=True)
    return typer.Exit(code)


def _reload_state(admin: dict[str, Any]) -> dict[str, Any]:
    url = f"http://{admin['host']}:{admin['port']}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # loopback admin API
            data: dict[str, Any] = json.loads(response.read())["security"]["reload"]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise _fail(f"no running gateway answers at {url}: {exc}") from None
    return data


def reload_command(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The running gateway's config file.")
    ] = Path("configs/dev.toml"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 30.0,
) -> None:
    """Reload the security settings of the running gateway (SIGHUP) and show the result."""
    try:
        cfg = load_config(config, check_files=False)
    except ConfigError as exc:
        raise _fail(str(exc), code=2) from None
    from gateway.app import read_runtime  # here: the CLI's other commands stay light

    runtime = read_runtime(cfg.gateway.data_dir)
    if runtime is None or not runtime.get("admin"):
        raise _fail(f"no running gateway found (no runtime file in {cfg.gateway.data_dir})")
    before = _reload_state(runtime["admin"])
    done = before["reloads"] + before["failures"]
    try:
        os.kill(int(runtime["pid"]), signal.SIGHUP)
    except OSError as exc:
        raise _fail(f"cannot signal pid {runtime['pid']}: {exc}") from None
    deadline = time.monotonic() + timeout
    while True:
        state = _reload_state(runtime["admin"])
        if state["reloads"] + state["failures"] > done:
            break
        if time.monotonic() > deadline:
            raise _fail(f"no reload result within {timeout} s")
        time.sleep(0.1)  # polling the loopback admin API until the deadline
    last = state["last"]
    if not last["ok"]:
        raise _fail(f"reload failed, previous configuration kept: {last['error']}")
    typer.echo(f"reloaded: changed {', '.join(last['changed']) or 'nothing'}")
    for item in last["disconnected"]:
        typer.echo(f"  disconnected {item['device']}: {item['reason']}")
    if last["restart_needed"]:
        typer.echo(f"  not applied, restart needed: {', '.join(last['restart_needed'])}")
