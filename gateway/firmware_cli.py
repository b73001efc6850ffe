"""``tidegate fw``: signing keys, publishing releases, campaign operations, campaign status
(docs/firmware.md). All of it talks to Kafka directly with the config's mutual TLS; none of
it touches the buffer (the gateway applies campaign operations from its control topic).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError as AioKafkaError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.kafka_security import client_security
from bridge.topic_scan import scan_json_topic
from device_sim.firmware import FleetSpec, run_firmware_fleet
from edge.firmware_model import (
    FirmwareFormatError,
    key_id,
    load_private_key,
    load_public_key,
    make_manifest,
    release_records,
)
from gateway.app import read_runtime
from gateway.config import FirmwareConfig, GatewayConfig, load_config
from gateway.errors import ConfigError, TidegateError

__all__ = ["fw_app"]

fw_app = typer.Typer(help="Firmware: keys, releases, staged campaigns.", no_args_is_help=True)
campaign_app = typer.Typer(help="Start and steer a staged rollout.", no_args_is_help=True)
fw_app.add_typer(campaign_app, name="campaign")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Gateway config file (TOML).")]
_KAFKA_ERRORS = (AioKafkaError, OSError, TimeoutError, TidegateError)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"tidegate: {message}", err=True)
    return typer.Exit(code)


def _load(path: Path) -> tuple[GatewayConfig, FirmwareConfig]:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if cfg.firmware is None:
        raise _fail(f"{path}: no [firmware] section")
    return cfg, cfg.firmware


@fw_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Argument(help="Private key file to write (PEM, mode 0600).")],
) -> None:
    """Make an Ed25519 signing key: OUT (private) and OUT.pub (public, for trusted_keys)."""
    if out.exists():
        raise _fail(f"{out} exists; not overwritten")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    Path(f"{out}.pub").write_bytes(public)
    typer.echo(f"{out} {out}.pub key_id={key_id(key.public_key())}")


@fw_app.command("publish")
def publish(  # noqa: PLR0917  # typer maps parameters to options
    image: Annotated[Path, typer.Argument(help="Firmware image file.")],
    version: Annotated[str, typer.Option("--version", help="Release version.")],
    device_type: Annotated[str, typer.Option("--device-type", help="Target device type.")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 signing key (PEM).")],
    chunk_bytes: Annotated[
        int, typer.Option("--chunk-bytes", min=1024, help="Kafka record size of a chunk.")
    ] = 256 << 10,
    config: ConfigOption = Path("configs/dev.toml"),
) -> None:
    """Sign IMAGE and publish it to the releases topic (manifest, then chunks); print its id."""
    cfg, firmware = _load(config)
    if chunk_bytes > cfg.kafka.max_request_bytes - 4096:
        raise _fail(f"--chunk-bytes must stay below kafka.max_request_bytes ({chunk_bytes})")
    try:
        data = image.read_bytes()
        manifest = make_manifest(
            data,
            version=version,
            device_type=device_type,
            chunk_bytes=chunk_bytes,
            key=load_private_key(key.read_bytes()),
            created_ms=int(time.time() * 1000),
        )
    except (OSError, FirmwareFormatError) as exc:
        raise _fail(str(exc)) from None
    records = [(manifest.release_id, v, h) for v, h in release_records(manifest, data)]
    try:
        asyncio.run(_produce(cfg, firmware.releases_topic, records))
    except _KAFKA_ERRORS as exc:
        raise _fail(f"cannot publish to {firmware.releases_topic}: {exc!r}", code=1) from None
    typer.echo(manifest.release_id)


def _control(config: Path, value: dict[str, Any]) -> None:
    cfg, firmware = _load(config)
    topic = firmware.control_topic.replace("{gateway_id}", cfg.gateway.id)
    record: tuple[str, bytes, list[tuple[str, bytes]]] = (
        value["campaign_id"],
        json.dumps(value).encode(),
        [],
    )
    try:
        asyncio.run(_produce(cfg, topic, [record]))
    except _KAFKA_ERRORS as exc:
        raise _fail(f"cannot send to {topic}: {exc!r}", code=1) from None
    typer.echo(f"{value['op']} {value['campaign_id']} sent to {topic}")


@campaign_app.command("start")
def campaign_start(  # noqa: PLR0917  # typer maps parameters to options
    campaign: str,
    release: Annotated[str, typer.Option("--release", help="Release id: <type>@<version>.")],
    device: Annotated[
        list[str] | None, typer.Option("--device", help="Target device (default: every")
    ] = None,
    rings: Annotated[
        str | None, typer.Option(help="Cumulative percents, e.g. 1,10,50,100.")
    ] = None,
    failure_threshold: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    config: ConfigOption = Path("configs/dev.toml"),
) -> None:
    """Start CAMPAIGN: roll RELEASE out in rings (default: every registered device of the
    release's type)."""
    value: dict[str, Any] = {"op": "start", "campaign_id": campaign, "release_id": release}
    if device:
        value["devices"] = device
    if rings is not None:
        try:
            value["rings"] = [float(p) for p in rings.split(",")]
        except ValueError:
            raise _fail(f"--rings {rings!r}: comma-separated numbers") from None
    if failure_threshold is not None:
        value["failure_threshold"] = failure_threshold
    _control(config, value)


def _op(op: str) -> None:
    def command(campaign: str, config: ConfigOption = Path("configs/dev.toml")) -> None:
        _control(config, {"op": op, "campaign_id": campaign})

    command.__doc__ = f"{op.capitalize()} CAMPAIGN."
    campaign_app.command(op)(command)


for _name in ("pause", "resume", "abort", "rollback"):
    _op(_name)


@fw_app.command("sim")
def sim(  # noqa: PLR0917  # typer maps parameters to options
    trusted_key: Annotated[
        list[Path], typer.Option("--trusted-key", help="Public key the devices trust (PEM).")
    ],
    devices: Annotated[int, typer.Option(min=1, max=2000)] = 10,
    prefix: Annotated[str, typer.Option(help="Device ids: <prefix>-<n>.")] = "fw",
    device_type: Annotated[str, typer.Option("--device-type")] = "sim",
    version: Annotated[str, typer.Option(help="Version the devices start with.")] = "1.0.0",
    until_version: Annotated[
        str | None, typer.Option(help="Stop once every device runs this version.")
    ] = None,
    drop_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of devices losing power mid-transfer.")
    ] = 0.0,
    fail_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of devices whose install fails.")
    ] = 0.0,
    duration: Annotated[float, typer.Option(min=1, help="Seconds at most.")] = 300.0,
    password: Annotated[
        str | None, typer.Option(help="Devices log in with their id and this password.")
    ] = None,
    host: str = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Default: the running gateway's.")] = None,
    config: ConfigOption = Path("configs/dev.toml"),
) -> None:
    """Simulated devices that take firmware offers (docs/firmware.md), on loopback."""
    if port is None:
        cfg, _fw = _load(config)
        runtime = read_runtime(cfg.gateway.data_dir) or {}
        listeners = runtime.get("mqtt") or []
        if not listeners:
            raise _fail("no running gateway found; give --port")
        port = int(listeners[0]["port"])
    try:
        keys = [load_public_key(p.read_bytes()) for p in trusted_key]
    except (OSError, FirmwareFormatError) as exc:
        raise _fail(str(exc)) from None
    drops, fails = round(devices * drop_rate), round(devices * fail_rate)
    specs = [
        FleetSpec(
            f"{prefix}-{n:04d}",
            drop_at_chunk=1 + n % 8 if n < drops else None,
            fail_install=drops <= n < drops + fails,
        )
        for n in range(devices)
    ]

    def done(fleet: dict[str, Any]) -> bool:
        return until_version is not None and all(
            d.agent.version == until_version and d.final_acked.is_set() for d in fleet.values()
        )

    try:
        fleet = asyncio.run(
            run_firmware_fleet(
                specs,
                host=host,
                port=port,
                device_type=device_type,
                version=version,
                trusted=keys,
                until=done,
                within_s=duration,
                password=password,
            )
        )
    except TimeoutError:
        if until_version is not None:
            raise _fail(f"not every device reached {until_version} in {duration}s", 1) from None
        return
    for device_id, device in sorted(fleet.items()):
        agent = device.agent
        typer.echo(
            f"{device_id} {agent.version} downloaded={agent.downloaded_bytes}"
            f" drops={agent.drops} verified={agent.verified}"
        )


@fw_app.command("status")
def status(
    campaign: str,
    config: ConfigOption = Path("configs/dev.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="The latest record as JSON.")] = False,
) -> None:
    """The latest progress of CAMPAIGN (scans the status topic)."""
    cfg, firmware = _load(config)
    try:
        found = asyncio.run(_latest(cfg, firmware.status_topic, campaign))
    except _KAFKA_ERRORS as exc:
        raise _fail(f"cannot read {firmware.status_topic}: {exc!r}", code=1) from None
    if found is None:
        typer.echo(f"no progress records for {campaign}")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(found))
        return
    devices = ", ".join(f"{k} {v}" for k, v in sorted((found.get("devices") or {}).items()))
    typer.echo(
        f"{campaign}: {found['state']}  release {found.get('release_id')}"
        f"  ring {found.get('ring')} of {found.get('rings')}\n"
        f"  devices: {devices or '-'}\n  reason: {found.get('reason') or '-'}"
    )


async def _produce(
    cfg: GatewayConfig, topic: str, records: list[tuple[str, bytes, list[tuple[str, bytes]]]]
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        **client_security(cfg.kafka).kwargs(),
        acks="all",
        enable_idempotence=True,
        max_request_size=cfg.kafka.max_request_bytes,
        request_timeout_ms=int(cfg.kafka.request_timeout_s * 1000),
    )
    async with asyncio.timeout(cfg.kafka.request_timeout_s + 60):
        await producer.start()
        try:
            # One key: one partition, in order (manifest first). Sent one after the other so
            # a failure leaves a prefix, never a gap.
            for key, value, headers in records:
                await producer.send_and_wait(topic, value, key=key.encode(), headers=headers)
        finally:
            await producer.stop()


async def _latest(cfg: GatewayConfig, topic: str, campaign: str) -> dict[str, Any] | None:
    latest: dict[str, Any] | None = None

    def visit(item: dict[str, Any]) -> None:
        nonlocal latest
        if (
            item.get("kind") == "campaign"
            and item.get("campaign_id") == campaign
            and (latest is None or item["at_ms"] >= latest["at_ms"])
        ):
            latest = item

    await scan_json_topic(cfg.kafka, topic, visit)
    return latest
