"""Shared setup of the firmware tests: keys, a gateway config with ``[firmware]``, the
status topic read back, and the gateway's device registry."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.dev.kafka import KafkaState
from tests.harness import (
    DEVICE_PASSWORD,
    GatewayProcess,
    eventually,
    kafka_tls,
    provision_devices,
    read_topics,
    write_gateway_config,
)


@dataclass(frozen=True)
class FwSetup:
    config: Path
    key_file: Path
    key: Ed25519PrivateKey
    releases: str
    control: str
    status: str

    @property
    def public(self) -> Ed25519PublicKey:
        return self.key.public_key()


def write_key(path: Path, key: Ed25519PrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    Path(f"{path}.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def fw_setup(
    tmp_path: Path, kafka: KafkaState, topic: Callable[..., str], extra: str = ""
) -> FwSetup:
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "signing.pem"
    write_key(key_file, key)
    releases, status = topic("releases", partitions=1), topic("fwstatus")
    control = topic("control", partitions=1)
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=kafka_tls(kafka),
        topics={"event": topic("events")},
        extra=f"""
[firmware]
releases_topic = "{releases}"
control_topic = "{control}"
status_topic = "{status}"
trusted_keys = ["{key_file}.pub"]
cache_max_bytes = 16777216
tick_interval_s = 0.2
device_chunk_bytes = 32768
{extra}
""",
    )
    return FwSetup(config, key_file, key, releases, control, status)


async def status_records(kafka: KafkaState, topic: str) -> list[dict[str, Any]]:
    """The firmware status topic, each event once, in ``at_ms`` order."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for record in await read_topics(kafka.bootstrap, kafka_tls(kafka), [topic]):
        item = json.loads(record.value)
        if item["event_id"] not in seen:
            seen.add(item["event_id"])
            out.append(item)
    return sorted(out, key=lambda r: (r["at_ms"], int(r["event_id"].rsplit(":", 1)[1])))


async def status_until(
    kafka: KafkaState,
    topic: str,
    done: Callable[[list[dict[str, Any]]], bool],
    what: str,
    within_s: float = 30.0,
) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        records = await status_records(kafka, topic)
        return records if done(records) else None

    result: list[dict[str, Any]] = await eventually(probe, what, within_s, interval=0.3)
    return result


def release_state(records: list[dict[str, Any]], release_id: str) -> str | None:
    states = [r for r in records if r["kind"] == "release" and r["release_id"] == release_id]
    return states[-1]["state"] if states else None


def campaign_state(records: list[dict[str, Any]], campaign_id: str) -> dict[str, Any] | None:
    found = [r for r in records if r["kind"] == "campaign" and r["campaign_id"] == campaign_id]
    return found[-1] if found else None


def registered(gateway: GatewayProcess, device_type: str) -> set[str]:
    admin = gateway.runtime["admin"]
    url = f"http://{admin['host']}:{admin['port']}/devices"
    with urllib.request.urlopen(url, timeout=5) as response:
        devices = json.loads(response.read())["devices"]
    return {d["device_id"] for d in devices if d.get("device_type") == device_type}


def provision(gateway: GatewayProcess, ids: list[str]) -> str:
    """Give ``ids`` the test password at this gateway (anonymous devices are refused);
    return the password."""
    provision_devices(gateway.config.parent / "devices.passwd", ids)
    return DEVICE_PASSWORD
