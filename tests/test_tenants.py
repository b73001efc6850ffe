"""Tenants: the device -> tenant map, config rules, the ACL's ``{tenant}``, record routing,
the per-tenant buffer share (real SQLite), and two tenants end to end through a real
gateway process and real Kafka (every topic of both tenants read back)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.commands_in import CommandConsumer
from bridge.records import RecordBuilder
from edge.acl import AclPolicy
from edge.buffer import Buffer, StoredMessage
from edge.commands_model import Rejection, parse_command
from edge.tenant_share import TENANT_SHARE_DROP, TenantShares
from edge.tenants import TenantMap, check_command_tenant, claimed_tenant_mismatch
from gateway.config import BufferConfig, ClassConfig, parse_config
from gateway.dev.kafka import KafkaState
from gateway.dev.kafka_admin import create_topics
from gateway.errors import ConfigError
from tests.fixtures_kafka import topic_name_for
from tests.harness import (
    device_credentials,
    publish_qos1,
    read_topics,
    running_gateway,
    wait_for,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls
from tests.test_commands_e2e import (
    CmdDevice,
    command,
    has,
    results_until,
    send,
    statuses,
    wait_registered,
)

TENANTS = TenantMap(patterns={"acme": ("acme-*",), "globex": ("globex-*", "gx-??")})


# ------------------------------------------------------------------------- pure


def test_tenant_of_by_patterns_default_and_ambiguity() -> None:
    assert TENANTS.tenant_of("acme-1") == "acme"
    assert TENANTS.tenant_of("gx-07") == "globex"
    assert TENANTS.tenant_of("gx-007") is None
    assert TENANTS.resolve("rogue")[1] == "device id matches no tenant's patterns"
    both = TenantMap(patterns={"a": ("x-*",), "b": ("x-1*",)})
    assert both.tenant_of("x-10") is None  # two tenants claim it: nobody gets it
    assert "a, b" in both.resolve("x-10")[1]
    fallback = TenantMap(patterns={"a": ("a-*",)}, default_tenant="shared")
    assert fallback.tenant_of("other") == "shared"
    assert fallback.names == ["a", "shared"]


def test_command_tenant_check() -> None:
    assert claimed_tenant_mismatch(TENANTS, "acme", "acme-1") is None
    assert "another tenant" in str(claimed_tenant_mismatch(TENANTS, "acme", "globex-1"))
    assert "no tenant" in str(claimed_tenant_mismatch(TENANTS, "acme", "rogue"))
    assert "no tg-tenant header" in str(claimed_tenant_mismatch(TENANTS, None, "acme-1"))


def test_acl_tenant_placeholder() -> None:
    acl = AclPolicy.with_extra(
        publish=["t/{tenant}/{device_id}/#"],
        subscribe=["t/{tenant}/broadcast"],
        tenant_of=TENANTS.tenant_of,
    )
    assert acl.may_publish("acme-1", "t/acme/acme-1/x")
    assert not acl.may_publish("acme-1", "t/globex/acme-1/x")
    assert acl.may_subscribe("globex-1", "t/globex/broadcast")
    assert not acl.may_subscribe("globex-1", "t/acme/broadcast")
    assert not acl.may_subscribe("rogue", "t/_unassigned/broadcast")
    assert acl.may_publish("rogue", "d/rogue/up/event")  # the default rules still apply


def _config(**sections: Any) -> Any:
    base: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": ["127.0.0.1:9093"],
            "tls": {"cafile": "ca", "certfile": "c", "keyfile": "k"},
        },
        "classes": {"event": {"kafka_topic": "iot.events.{tenant}"}},
        "tenants": {"devices": {"acme": ["acme-*"]}},
    }
    base.update(sections)
    return parse_config(base, check_files=False)


def test_config_rules_for_placeholders() -> None:
    assert _config().tenants.mode == "topic"
    with pytest.raises(ConfigError, match=r"classes.event.kafka_topic: tenants.mode"):
        _config(classes={"event": {"kafka_topic": "iot.events"}})
    with pytest.raises(ConfigError, match=r"commands.results_topic"):
        _config(commands={"topic": "iot.commands.{gateway_id}.{tenant}"})
    with pytest.raises(ConfigError, match=r"needs tenants.mode"):
        _config(tenants={"mode": "header", "devices": {"acme": ["acme-*"]}})
    with pytest.raises(ConfigError, match=r"needs a \[tenants\] section"):
        _config(tenants=None)
    with pytest.raises(ConfigError, match=r"broker.acl.publish: \{tenant\} needs a \[tenants\]"):
        _config(
            classes={"event": {"kafka_topic": "ev"}},
            broker={"acl": {"enabled": True, "publish": ["t/{tenant}/#"]}},
            tenants=None,
        )
    with pytest.raises(ConfigError, match=r"tenant name '_x'"):
        _config(tenants={"devices": {"_x": ["a"]}})


def test_records_routed_to_the_tenants_topics() -> None:
    builder = RecordBuilder(
        gateway_id="gw",
        class_topics={"event": "ev.{tenant}"},
        content_types={},
        dead_letter_topic="dlq.{tenant}",
        tenants=TENANTS,
    )

    def message(device: str, class_name: str = "event") -> StoredMessage:
        return StoredMessage(1, device, class_name, f"d/{device}/up/event", 1, b"x", 0, 5)

    acme = builder.build(message("acme-1"))
    assert (acme.topic, dict(acme.headers)["tg-tenant"]) == ("ev.acme", b"acme")
    assert builder.build(message("gx-01")).topic == "ev.globex"
    assert builder.build(message("gx-01", "nope")).topic == "dlq.globex"
    orphan = builder.build(message("rogue"))  # reassigned while its backlog waited
    assert orphan.topic == "dlq._unassigned"
    assert dict(orphan.headers)["tg-dead-letter-reason"] == b"device belongs to no tenant"
    assert builder.topics == {"ev.acme", "ev.globex", "dlq.acme", "dlq.globex"}


def test_header_mode_shared_topics_and_command_claims() -> None:
    tenants = TenantMap(patterns=TENANTS.patterns, mode="header")
    builder = RecordBuilder(
        gateway_id="gw",
        class_topics={"event": "ev"},
        content_types={},
        dead_letter_topic="dlq",
        tenants=tenants,
    )
    record = builder.build(StoredMessage(1, "gx-01", "event", "d/gx-01/up/event", 1, b"", 0, 5))
    assert (record.topic, dict(record.headers)["tg-tenant"]) == ("ev", b"globex")
    config = _config(
        classes={"event": {"kafka_topic": "ev"}},
        tenants={"mode": "header", "devices": {"acme": ["acme-*"]}},
        commands={},
    )
    assert config.commands is not None
    consumer = CommandConsumer(
        config.kafka,
        config.commands,
        gateway_id="gw",
        store=None,  # type: ignore[arg-type]  # not used by the tenant check
        on_stored=print,
        tenants=tenants,
    )
    assert consumer._claimed_tenant("any", [("tg-tenant", b"acme")]) == "acme"
    assert consumer._claimed_tenant("any", []) is None
    value = b'{"command_id":"c","device_id":"acme-1","name":"n","ttl_s":5}'
    good = parse_command(b"acme-1", value, timestamp_ms=0, max_params_bytes=100, max_ttl_s=60)
    assert check_command_tenant(tenants, "acme", good) is good
    refused = check_command_tenant(tenants, "globex", good)
    assert isinstance(refused, Rejection)
    assert (refused.tenant, refused.remember) == ("globex", False)


# ------------------------------------------------------- buffer share (real SQLite)

CLASSES = {
    "event": ClassConfig(kafka_topic="e", priority=8),
    "lossy": ClassConfig(kafka_topic="l", priority=1, lossy=True, on_full="drop_oldest"),
}


def _enqueue(buffer: Buffer, device: str, n: int, class_name: str = "event") -> list[Any]:
    return [
        buffer.enqueue(
            device_id=device,
            class_name=class_name,
            topic=f"d/{device}/up/{class_name}",
            qos=1,
            payload=f"{device}-{i}".encode(),
            ingest_ms=1_000 + i,
            priority=5,
        )
        for i in range(n)
    ]


async def test_tenant_buffer_share_blocks_only_that_tenant(tmp_path: Path) -> None:
    buffer = Buffer(tmp_path / "b.sqlite3", BufferConfig(max_rows=200), CLASSES)
    buffer.tenant_shares = TenantShares(TENANTS.tenant_of, max_rows=50, max_bytes=1 << 20)
    async with buffer:
        flood = _enqueue(buffer, "acme-1", 70)
        await asyncio.wait_for(asyncio.gather(*flood[:50]), 10)
        others = _enqueue(buffer, "globex-1", 30) + _enqueue(buffer, "gx-02", 40, "lossy")
        await asyncio.wait_for(asyncio.gather(*others), 10)
        # acme is at its share: its block-class publishes wait (no PUBACK) ...
        assert not any(f.done() for f in flood[50:])
        assert buffer.is_full
        # ... globex's lossy ones past its share were dropped by the tenant policy (20 of
        # them), never evicting another tenant's rows.
        assert buffer.tenant_shares.rows == {"acme": 50, "globex": 50}
        drops = await buffer.list_drops()
        assert [(d.reason, d.device_id) for d in drops] == [(TENANT_SHARE_DROP, "gx-02")] * 20
        # Releasing acme rows gives acme room again.
        leased = [m for m in await buffer.lease(200) if m.device_id == "acme-1"]
        await buffer.release(leased[:20])
        await asyncio.wait_for(asyncio.gather(*flood[50:]), 10)
        assert buffer.tenant_shares.rows["acme"] == 50
    # Counts are rebuilt from the file at open.
    reopened = Buffer(tmp_path / "b.sqlite3", BufferConfig(max_rows=200), CLASSES)
    reopened.tenant_shares = TenantShares(TENANTS.tenant_of, max_rows=50, max_bytes=1 << 20)
    async with reopened:
        assert reopened.tenant_shares.rows == {"acme": 50, "globex": 50}


# ------------------------------------------------------------- end to end (Kafka)


def _connack(port: int, client_id: str) -> int:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc.value)
    client.username_pw_set(*device_credentials(port, client_id))  # authenticated, no tenant
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        wait_for(lambda: codes, 10, "CONNACK")
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


@pytest.mark.kafka
async def test_two_tenants_never_share_topics(
    tmp_path: Path, kafka: KafkaState, request: pytest.FixtureRequest
) -> None:
    base = topic_name_for(request.node.name)
    templates = {"event": f"{base}.ev.{{tenant}}", "telemetry": f"{base}.tm.{{tenant}}"}
    dlq = f"{base}.dlq.{{tenant}}"
    topics = {
        (kind, tenant): f"{base}.{kind}.{tenant}"
        for kind in ("ev", "tm", "dlq")
        for tenant in ("acme", "globex")
    }
    create_topics(kafka, topics.values(), partitions=2)
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={**templates, "dlq": dlq},
        extra="""
[tenants]
mode = "topic"

[tenants.devices]
acme = ["acme-*"]
globex = ["globex-*"]
""",
    )
    devices = ["acme-1", "acme-2", "globex-1"]
    with running_gateway(config) as gateway:
        port = gateway.mqtt_port
        assert _connack(port, "rogue-1") == 135  # CONNACK 5: no tenant, refused
        for device in devices:
            # Identical topic suffixes for every device and tenant.
            publish_qos1(
                port,
                device,
                [(f"d/{device}/up/event", f"{device}:event:{i}".encode()) for i in range(5)]
                + [(f"d/{device}/up/telemetry", f"{device}:telemetry".encode())]
                + [(f"d/{device}/up/unknown", f"{device}:unrouted".encode())],
            )
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "drain")
        gateway.wait_status(lambda s: s["buffer"]["dead_letters"] == 0, 60, "dead letters")
        status = gateway.status()
        assert status["tenants"]["names"] == ["acme", "globex"]
        assert status["security"]["auth_failures"] == 1
        audit = (gateway.data_dir / "audit.jsonl").read_text()
        assert "no tenant: device id matches no tenant's patterns" in audit
        assert '"device":"rogue-1"' in audit

    for (kind, tenant), topic in topics.items():
        records = await read_topics(kafka.bootstrap, _tls(kafka), [topic])
        owners = {r.key.decode() for r in records if r.key is not None}
        assert owners, f"{topic}: nothing arrived"
        assert all(owner.startswith(f"{tenant}-") for owner in owners), (topic, owners)
        assert {r.headers["tg-tenant"] for r in records} == {tenant.encode()}
        suffix = {"ev": "event", "tm": "telemetry", "dlq": "unrouted"}[kind]
        expected = {
            f"{d}:{suffix}".encode() if kind != "ev" else f"{d}:event:{i}".encode()
            for d in devices
            if d.startswith(tenant)
            for i in range(5)
        }
        assert {r.value for r in records} == expected, topic
        assert not any(b"rogue" in r.value for r in records)


@pytest.mark.kafka
async def test_commands_reach_only_their_tenants_devices(
    tmp_path: Path, kafka: KafkaState, request: pytest.FixtureRequest
) -> None:
    base = topic_name_for(request.node.name)
    names = {
        (kind, tenant): f"{base}.{kind}.{tenant}"
        for kind in ("ev", "cmd", "res")
        for tenant in ("acme", "globex")
    }
    create_topics(kafka, names.values(), partitions=1)
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": f"{base}.ev.{{tenant}}"},
        extra=f"""
[commands]
topic = "{base}.cmd.{{tenant}}"
results_topic = "{base}.res.{{tenant}}"
poll_interval_s = 0.1
retry_interval_s = 1.0

[tenants.devices]
acme = ["acme-*"]
globex = ["globex-*"]
""",
    )
    devices: list[CmdDevice] = []
    try:
        with running_gateway(config) as gateway:
            for device_id in ("acme-1", "globex-1"):
                devices.append(CmdDevice(gateway.mqtt_port, device_id).connect())
                wait_registered(gateway, device_id, True)
            own_a = command("acme-1")
            # acme aims at globex's device with an id globex then uses for its own command.
            cross = command("globex-1", command_id="shared-id", params={"from": "acme"})
            own_g = command("globex-1", command_id="shared-id", params={"from": "globex"})
            await send(kafka, names["cmd", "acme"], own_a, cross)
            acme = await results_until(
                kafka,
                names["res", "acme"],
                lambda r: (
                    has(r, own_a["command_id"], "executed") and has(r, "shared-id", "rejected")
                ),
            )
            await send(kafka, names["cmd", "globex"], own_g)
            globex = await results_until(
                kafka, names["res", "globex"], lambda r: has(r, "shared-id", "executed")
            )
            received = [c for _t, c in devices[1].received]
    finally:
        for device in devices:
            device.disconnect()
    assert statuses(acme, "shared-id") == ["rejected"]
    rejection = acme["shared-id"][0]
    assert rejection["reason"].startswith("device belongs to another tenant")
    assert rejection["output"] == {"tenant": "acme"}
    assert statuses(globex, "shared-id") == ["accepted", "delivered", "executed"]
    assert set(globex) == {"shared-id"}  # nothing of acme's commands in globex's results
    assert set(acme) == {own_a["command_id"], "shared-id"}
    assert [c["params"] for c in received] == [{"from": "globex"}]  # acme's never arrived
