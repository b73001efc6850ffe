"""``tidegate buffer stats | peek | purge``: what the store-and-forward buffer holds.

With a gateway running on the config's data directory, every command goes through its admin
API (with the admin token). With none running, ``stats`` and ``peek`` read the buffer file
directly, read-only; ``purge`` refuses: it must go through the gateway, which records each
purged message in the drop ledger (reason "purged by operator") and keeps its counters right.
Exit codes: 0 done, 1 the operation failed (no gateway for a purge, API error), 2 bad input.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edge.buffer_crypto import BufferKeyError, load_keyring
from edge.buffer_ops import open_read_only, peek_rows, read_stats
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

__all__ = ["buffer_app", "parse_duration"]

buffer_app = typer.Typer(
    help="The store-and-forward buffer: stats, peek at queued messages, purge.",
    no_args_is_help=True,
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Gateway config file (TOML).")]
ClassOption = Annotated[str | None, typer.Option("--class", help="Only this message class.")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="Only this device id.")]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"tidegate: {message}", err=True)
    return typer.Exit(code)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` → seconds; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 1d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _load(path: Path) -> GatewayConfig:
    try:
        return load_config(path, check_files=False)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _check_class(cfg: GatewayConfig, class_name: str | None) -> None:
    if class_name is not None and class_name not in cfg.classes:
        raise _fail(f"--class: unknown class {class_name!r} (known: {', '.join(cfg.classes)})")


def gateway_running(data_dir: Path) -> bool:
    """Whether a gateway holds the data directory's lock (it takes it exclusively)."""
    try:
        fd = os.open(data_dir / "gateway.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we may have taken
    return False


def _admin(cfg: GatewayConfig, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    from gateway.cli import _admin_call  # the CLI's one admin client (token, errors)

    return _admin_call(cfg, method, path, body)


def _offline(cfg: GatewayConfig) -> contextlib.closing[Any]:
    try:
        return contextlib.closing(open_read_only(cfg.buffer_path))
    except (FileNotFoundError, OSError) as exc:
        raise _fail(f"no gateway running and cannot read the buffer: {exc}", 1) from None


@buffer_app.command("stats")
def stats(
    config: ConfigOption = Path("configs/dev.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Rows, bytes and age per class, the busiest devices, dead letters and drops by reason."""
    cfg = _load(config)
    if gateway_running(cfg.gateway.data_dir):
        data = _admin(cfg, "GET", "/buffer/stats")
        data["source"] = "running gateway"
    else:
        with _offline(cfg) as conn:
            data = read_stats(conn, encrypted=cfg.buffer.encryption is not None)
        data["source"] = f"file {cfg.buffer_path} (no gateway running)"
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    _render_stats(data, cfg)


def _render_stats(data: dict[str, Any], cfg: GatewayConfig) -> None:
    from gateway.status_view import fmt_bytes

    console = Console()
    console.print(
        f"buffer: {data['rows']} rows, {fmt_bytes(data['payload_bytes'])} payload, file "
        f"{fmt_bytes(data['used_bytes'])} used (limits: {cfg.buffer.max_rows} rows, "
        f"{fmt_bytes(cfg.buffer.max_bytes)}) — from {data['source']}"
    )
    table = Table("class", "rows", "payload", "oldest", "newest", "policy")
    for name, c in data["classes"].items():
        policy = cfg.classes[name].on_full if name in cfg.classes else "-"
        table.add_row(
            name,
            str(c["rows"]),
            fmt_bytes(c["payload_bytes"]),
            f"{c['oldest_age_s']} s",
            f"{c['newest_age_s']} s",
            str(policy),
        )
    console.print(table)
    if data["top_devices"]:
        devices = Table("device", "rows", "payload", title="devices with most rows")
        for d in data["top_devices"]:
            devices.add_row(d["device_id"], str(d["rows"]), fmt_bytes(d["payload_bytes"]))
        console.print(devices)
    for title, counts in (("dead letters", data["dead_letters"]), ("drops", data["drops"])):
        text = ", ".join(f"{n} {reason}" for reason, n in counts.items()) or "none"
        console.print(f"{title} by reason: {text}")


@buffer_app.command("peek")
def peek(  # noqa: PLR0917  # typer maps parameters to options
    config: ConfigOption = Path("configs/dev.toml"),
    class_name: ClassOption = None,
    device: DeviceOption = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many messages.")] = 10,
    after: Annotated[int, typer.Option(min=0, help="Only row ids above this.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, payloads base64.")] = False,
) -> None:
    """The next queued messages (oldest first): id, device, class, age, size, payload."""
    cfg = _load(config)
    _check_class(cfg, class_name)
    if gateway_running(cfg.gateway.data_dir):
        query: dict[str, Any] = {"limit": limit, "after": after}
        query |= {k: v for k, v in (("class", class_name), ("device", device)) if v is not None}
        items = _admin(cfg, "GET", "/buffer/peek?" + urllib.parse.urlencode(query))["messages"]
    else:
        try:
            keyring = None if cfg.buffer.encryption is None else load_keyring(cfg.buffer.encryption)
        except BufferKeyError as exc:
            raise _fail(f"cannot read the buffer keys: {exc}", 1) from None
        with _offline(cfg) as conn:
            items = peek_rows(
                conn, keyring, class_name=class_name, device_id=device, limit=limit, after_id=after
            )
    if as_json:
        for item in items:
            typer.echo(json.dumps(item))
        return
    if not items:
        typer.echo("no queued messages")
        return
    for item in items:
        shown = "(encrypted)" if item["encrypted"] else (item["preview"] or "(binary)")
        typer.echo(
            f"{item['row_id']}  {item['device_id']}  {item['class']}  {item['age_s']} s  "
            f"{item['payload_bytes']} B  {item['msg_id'] or '-'}  {shown}"
        )


@buffer_app.command("purge")
def purge(
    config: ConfigOption = Path("configs/dev.toml"),
    class_name: ClassOption = None,
    device: DeviceOption = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Ingested longer ago than (90s, 15m, 2h).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Really delete them.")] = False,
) -> None:
    """Delete queued messages for good (each recorded in the drop ledger). Needs at least one
    of --class, --device, --older-than, and --yes; goes through the running gateway."""
    cfg = _load(config)
    _check_class(cfg, class_name)
    try:
        older_s = None if older_than is None else parse_duration(older_than)
    except ValueError as exc:
        raise _fail(f"--older-than: {exc}") from None
    if class_name is None and device is None and older_s is None:
        raise _fail("give at least one of --class, --device, --older-than")
    if not yes:
        raise _fail("purge deletes queued messages for good: add --yes")
    if not gateway_running(cfg.gateway.data_dir):
        raise _fail(
            "no gateway running: purge goes through the running gateway (it records the "
            "drops and keeps its counters right); start it first",
            1,
        )
    body: dict[str, Any] = {"class": class_name, "device": device, "older_than_s": older_s}
    result = _admin(cfg, "POST", "/buffer/purge", {k: v for k, v in body.items() if v is not None})
    typer.echo(
        f"purged {result['purged']} messages ({result['purged_bytes']} bytes); "
        f"{result['skipped_in_flight']} in flight to Kafka skipped"
    )
