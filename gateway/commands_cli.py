"""``tidegate cmd send | status``: produce a command to a gateway's Kafka topic, read its
results back from the results topic (docs/commands.md).

Both talk to Kafka directly with the config's mutual TLS; neither touches the buffer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError as AioKafkaError

from bridge.kafka_security import client_security, explain_login_failure
from bridge.topic_scan import scan_json_topic
from edge.tenants import PLACEHOLDER, TENANT_HEADER, render
from gateway.config import CommandsConfig, GatewayConfig, load_config
from gateway.errors import ConfigError, TidegateError
from gateway.security_setup import tenant_map

__all__ = ["build_command", "cmd_app", "parse_at"]

cmd_app = typer.Typer(help="Downlink commands: send one, show its history.", no_args_is_help=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Gateway config file (TOML).")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"tidegate: {message}", err=True)
    return typer.Exit(code)


def _load(path: Path) -> tuple[GatewayConfig, CommandsConfig]:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    return cfg, cfg.commands or CommandsConfig()


def parse_at(value: str) -> int:
    """``--at``: epoch milliseconds, or an ISO 8601 time (UTC unless it names a zone)."""
    if value.isdigit():
        return int(value)
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"--at: not epoch ms or ISO 8601: {value!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def build_command(
    device: str,
    name: str,
    params: list[str],
    *,
    ttl_s: float,
    priority: int,
    at: str | None,
    command_id: str | None,
) -> dict[str, Any]:
    """The command record's value (``--param k=v``: v is JSON when it parses, else text)."""
    parsed: dict[str, Any] = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected key=value")
        try:
            parsed[key] = json.loads(raw)
        except ValueError:
            parsed[key] = raw
    command: dict[str, Any] = {
        "command_id": command_id or uuid.uuid4().hex,
        "device_id": device,
        "name": name,
        "params": parsed,
        "priority": priority,
        "ttl_s": ttl_s,
    }
    if at is not None:
        command["not_before"] = parse_at(at)
    return command


@cmd_app.command("send")
def send(  # noqa: PLR0917  # typer maps parameters to options
    device: str,
    name: str,
    param: Annotated[list[str] | None, typer.Option("--param", help="key=value")] = None,
    ttl: Annotated[float, typer.Option("--ttl", help="Seconds the command stays valid.")] = 3600,
    at: Annotated[str | None, typer.Option("--at", help="Not before: ISO 8601 or ms.")] = None,
    priority: Annotated[int, typer.Option(min=0, max=9)] = 5,
    command_id: Annotated[str | None, typer.Option("--id", help="Default: random.")] = None,
    config: ConfigOption = Path("configs/dev.toml"),
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", help="Sending tenant (default: the device's)."),
    ] = None,
) -> None:
    """Produce a command for DEVICE to this gateway's command topic; print its id."""
    cfg, commands = _load(config)
    try:
        command = build_command(
            device, name, param or [], ttl_s=ttl, priority=priority, at=at, command_id=command_id
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    topic = commands.kafka_topic(cfg.gateway.id)
    headers: list[tuple[str, bytes]] = []
    tenants = tenant_map(cfg)
    if tenants is not None:
        tenant = tenant or tenants.tenant_of(device)
        if tenant is None:
            raise _fail(f"{device} belongs to no tenant; say which with --tenant")
        topic = render(topic, tenant) if tenants.mode == "topic" else topic
        headers.append((TENANT_HEADER, tenant.encode()))
    try:
        asyncio.run(_produce(cfg, topic, device, json.dumps(command).encode(), headers))
    except (AioKafkaError, OSError, TimeoutError, TidegateError) as exc:
        raise _fail(f"cannot send to Kafka topic {topic}: {exc!r}", code=1) from None
    typer.echo(command["command_id"])


@cmd_app.command("status")
def status(
    command_id: str,
    config: ConfigOption = Path("configs/dev.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="With per-tenant results topics: whose.")
    ] = None,
) -> None:
    """The result records of a command, oldest first (scans the results topic)."""
    cfg, commands = _load(config)
    topic = commands.results_topic
    if PLACEHOLDER in topic:
        if tenant is None:
            raise _fail("the results topics are per tenant: give --tenant")
        topic = render(topic, tenant)
    try:
        found = asyncio.run(_history(cfg, topic, command_id))
    except (AioKafkaError, OSError, TimeoutError, TidegateError) as exc:
        raise _fail(f"cannot read {topic}: {exc!r}", code=1) from None
    if not found:
        typer.echo(f"no results for {command_id}")
        raise typer.Exit(1)
    for item in found:
        if as_json:
            typer.echo(json.dumps(item))
            continue
        when = dt.datetime.fromtimestamp(item["at_ms"] / 1000, dt.UTC).isoformat(
            timespec="milliseconds"
        )
        extra = item.get("reason") or ("" if "output" not in item else json.dumps(item["output"]))
        typer.echo(f"{when}  {item['device_id']}  {item['status']:<9}  {extra}".rstrip())


async def _produce(
    cfg: GatewayConfig, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]
) -> None:
    security = client_security(cfg.kafka)
    producer = AIOKafkaProducer(
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        **security.kwargs(),
        acks="all",
        request_timeout_ms=int(cfg.kafka.request_timeout_s * 1000),
    )
    async with asyncio.timeout(cfg.kafka.request_timeout_s + 10):
        try:
            await producer.start()
        except AioKafkaError as exc:
            await producer.stop()
            await explain_login_failure(cfg.kafka, security, exc)
            raise
        try:
            await producer.send_and_wait(topic, value, key=key.encode(), headers=headers)
        finally:
            await producer.stop()


async def _history(cfg: GatewayConfig, topic: str, command_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    seen: set[str] = set()

    def visit(item: dict[str, Any]) -> None:
        if item.get("command_id") == command_id and item.get("result_id") not in seen:
            seen.add(item["result_id"])  # at-least-once: skip repeats
            found.append(item)

    await scan_json_topic(cfg.kafka, topic, visit)
    return sorted(found, key=lambda r: (r["at_ms"], r["result_id"]))
