"""Lifecycle records (pure) and the lifecycle service on a real SQLite buffer (no Kafka)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.records import RecordBuilder
from edge.buffer import Buffer, StoredMessage
from edge.lifecycle import (
    ABNORMAL_REASONS,
    CLEAN,
    CONNECTION_LOST,
    EVENT_CLASS,
    GATEWAY_RESTART,
    GATEWAY_SHUTDOWN,
    HEARTBEAT_CLASS,
    REASONS,
    ConnectionEnded,
    SessionInfo,
    connected_record,
    disconnected_record,
    internal_classes,
)
from edge.tenants import TenantMap
from gateway.config import BufferConfig, ClassConfig, LifecycleConfig, parse_config
from gateway.errors import ConfigError
from gateway.lifecycle_service import LifecycleService
from tests.harness import eventually


def session(device: str = "dev-1", *, will: str | None = "d/dev-1/up/event") -> SessionInfo:
    return SessionInfo(
        device_id=device,
        peer="127.0.0.1:5000",
        clean_session=True,
        keep_alive_s=30,
        auth_method="password",
        tls=False,
        session_present=False,
        will_topic=will,
        will_qos=1,
        will_retain=False,
        took_over=False,
        connected_ms=1_000,
    )


def ended(info: SessionInfo, reason: str = CONNECTION_LOST) -> ConnectionEnded:
    return ConnectionEnded(info.device_id, info, reason, "why", reason != CLEAN, 3_500)


def classes(config: LifecycleConfig) -> dict[str, ClassConfig]:
    return {"event": ClassConfig(kafka_topic="iot.events"), **internal_classes(config)}


def service(buffer: Buffer, config: LifecycleConfig) -> LifecycleService:
    return LifecycleService(
        config,
        gateway_id="gw-1",
        buffer=buffer,
        kafka_state=lambda: {"connected": True, "breaker": "closed"},
        started_at=time.time(),
    )


def test_records() -> None:
    info = session()
    assert connected_record("gw-1", info) == {
        "schema": 1,
        "type": "connected",
        "gateway_id": "gw-1",
        "device_id": "dev-1",
        "ts_ms": 1_000,
        "took_over": False,
        "session": {
            "peer": "127.0.0.1:5000",
            "clean_session": True,
            "keep_alive_s": 30,
            "auth_method": "password",
            "tls": False,
            "session_present": False,
            "will": {"topic": "d/dev-1/up/event", "qos": 1, "retain": False},
        },
    }
    gone = disconnected_record("gw-1", ended(info))
    assert gone["reason"] == CONNECTION_LOST
    assert gone["abnormal"] is True
    assert gone["will_published"] is True
    assert gone["duration_s"] == 2.5
    assert gone["connected_ms"] == 1_000
    restart = disconnected_record(
        "gw-1", ConnectionEnded("dev-2", None, GATEWAY_RESTART, "crash", False, 5)
    )
    assert restart["session"] is None
    assert restart["duration_s"] is None
    assert restart["abnormal"] is True
    assert session(will=None).as_dict()["will"] is None
    # Only DISCONNECT and an operator's shutdown are normal ends.
    assert set(REASONS) - ABNORMAL_REASONS == {CLEAN, GATEWAY_SHUTDOWN}


def test_internal_classes_cannot_be_configured_by_devices() -> None:
    config = LifecycleConfig(topic="lc", heartbeat_topic="hb", priority=7, heartbeat_ttl_s=60)
    internal = internal_classes(config)
    assert internal[EVENT_CLASS].kafka_topic == "lc"
    assert internal[HEARTBEAT_CLASS].kafka_topic == "hb"
    assert internal[HEARTBEAT_CLASS].ttl_s == 60
    assert internal[EVENT_CLASS].ttl_s is None
    assert all(c.priority == 7 and c.on_full == "drop_oldest" for c in internal.values())
    assert all(name.startswith("!") for name in internal)  # never a configurable class name


async def test_events_and_heartbeats_are_ordered_buffer_rows(tmp_path: Path) -> None:
    config = LifecycleConfig()
    async with Buffer(tmp_path / "b.sqlite3", BufferConfig(), classes(config)) as buffer:
        lifecycle = service(buffer, config)
        first = session()
        lifecycle.connection_started(first)
        lifecycle.connection_ended(ended(first))
        lifecycle.connection_started(session())
        await buffer.enqueue_marker()
        lifecycle.beat()
        await buffer.enqueue_marker()
        rows = await buffer.lease(100)
        events = [r for r in rows if r.class_name == EVENT_CLASS]
        assert [json.loads(r.payload)["type"] for r in events] == [
            "connected",
            "disconnected",
            "connected",
        ]
        assert {r.device_id for r in events} == {"dev-1"}
        (beat,) = [r for r in rows if r.class_name == HEARTBEAT_CLASS]
        assert beat.device_id == "gw-1"
        assert beat.topic == ""
        body: dict[str, Any] = json.loads(beat.payload)
        assert body["devices_connected"] == 1
        assert body["buffer"]["rows"] == 3  # the events, committed before it
        assert body["kafka"] == {"connected": True, "breaker": "closed"}
        # The heartbeat's key is the gateway, not a device: the registry stays clean.
        assert [d.device_id for d in await buffer.devices()] == ["dev-1"]
        assert lifecycle.status()["events"] == {"connected": 2, "disconnected": 1}


async def test_stale_heartbeats_expire_into_the_ledger_events_stay(tmp_path: Path) -> None:
    config = LifecycleConfig(heartbeat_ttl_s=0.2)
    async with Buffer(tmp_path / "b.sqlite3", BufferConfig(), classes(config)) as buffer:
        lifecycle = service(buffer, config)
        for _ in range(3):
            lifecycle.beat()
        lifecycle.connection_started(session())
        await buffer.enqueue_marker()

        async def swept() -> list[Any] | None:
            rows = await buffer.lease(100)  # sweeps expired rows (at most once a second)
            gone = buffer.stats.class_dropped.get(HEARTBEAT_CLASS, 0) == 3
            return rows if gone else None

        rows = await eventually(swept, "stale heartbeats to expire", deadline_s=5)
        assert [r.class_name for r in rows] == [EVENT_CLASS]
        drops = await buffer.list_drops(after_id=0, limit=10)
        assert [(d.class_name, d.reason, d.device_id) for d in drops] == [
            (HEARTBEAT_CLASS, "expired", "gw-1")
        ] * 3
        assert lifecycle.status()["dropped"] == {"events": 0, "heartbeats": 3}


async def test_devices_left_connected_by_a_crash_are_reported_at_start(tmp_path: Path) -> None:
    config = LifecycleConfig()
    path = tmp_path / "b.sqlite3"
    async with Buffer(path, BufferConfig(), classes(config)) as buffer:
        buffer.device_connected("dev-1", "127.0.0.1:1")
        buffer.device_connected("dev-2", "127.0.0.1:2")
        await buffer.enqueue_marker()
    # Closed without the devices' disconnects, as after kill -9.
    buffer = Buffer(path, BufferConfig(), classes(config))
    lifecycle = service(buffer, config)
    async with buffer:
        await buffer.enqueue_marker()
        rows = await buffer.lease(100)
        bodies = [json.loads(r.payload) for r in rows]
        assert sorted((b["device_id"], b["reason"]) for b in bodies) == [
            ("dev-1", GATEWAY_RESTART),
            ("dev-2", GATEWAY_RESTART),
        ]
        assert not any(d.connected for d in await buffer.devices())
        await buffer.release(rows)
    assert lifecycle.status()["disconnect_reasons"] == {GATEWAY_RESTART: 2}
    # Nothing was left connected this time: no events at the next start.
    buffer = Buffer(path, BufferConfig(), classes(config))
    service(buffer, config)
    async with buffer:
        assert await buffer.lease(100) == []


async def test_events_in_a_full_buffer_are_dropped_and_recorded(tmp_path: Path) -> None:
    """The documented limit: a buffer full of lossless rows has no room for events either;
    they are dropped by policy (ledger, counter), never block or grow memory."""
    config = LifecycleConfig()
    path = tmp_path / "b.sqlite3"
    async with Buffer(path, BufferConfig(max_rows=100), classes(config)) as buffer:
        for i in range(100):
            buffer.enqueue(
                device_id="dev-x",
                class_name="event",
                topic="d/dev-x/up/event",
                qos=1,
                payload=b"%d" % i,
                ingest_ms=1,
                priority=5,
            )
        await buffer.enqueue_marker()
        assert buffer.stats.rows == 100
        lifecycle = service(buffer, config)
        lifecycle.connection_started(session())
        await buffer.enqueue_marker()
        assert buffer.stats.class_dropped == {EVENT_CLASS: 1}
        (drop,) = await buffer.list_drops(after_id=0, limit=10)
        assert (drop.class_name, drop.device_id, drop.reason) == (
            EVENT_CLASS,
            "dev-1",
            "buffer full: drop_oldest",
        )
        assert buffer.stats.blocked_writes == 0


def test_config_section_errors_name_the_field(tmp_path: Path) -> None:
    kafka = {
        "bootstrap_servers": ["127.0.0.1:9093"],
        "tls": {"cafile": "ca", "certfile": "c", "keyfile": "k"},
    }
    parsed = parse_config({"kafka": kafka}, check_files=False)
    assert parsed.lifecycle is None  # no section: off
    parsed = parse_config({"kafka": kafka, "lifecycle": {}}, check_files=False)
    assert parsed.lifecycle == LifecycleConfig()
    assert parsed.lifecycle.heartbeat_period_s == 30.0
    with pytest.raises(ConfigError) as raised:
        parse_config(
            {"kafka": kafka, "lifecycle": {"heartbeat_period_s": 0, "topik": "x"}},
            check_files=False,
        )
    fields = {path for path, _ in raised.value.errors}
    assert fields == {"lifecycle.heartbeat_period_s", "lifecycle.topik"}


def test_tenants_events_follow_the_device_heartbeats_belong_to_the_gateway() -> None:
    config = LifecycleConfig(topic="lc.{tenant}", heartbeat_topic="hb")
    internal = internal_classes(config)
    builder = RecordBuilder(
        gateway_id="gw-1",
        class_topics={n: c.kafka_topic for n, c in internal.items()},
        content_types={n: c.content_type for n, c in internal.items()},
        dead_letter_topic="dlq.{tenant}",
        tenants=TenantMap(patterns={"acme": ("acme-*",)}),
    )
    event = builder.build(StoredMessage(1, "acme-7", EVENT_CLASS, "", 1, b"{}", 5, 9))
    assert event.topic == "lc.acme"
    assert ("tg-tenant", b"acme") in event.headers
    beat = builder.build(StoredMessage(2, "gw-1", HEARTBEAT_CLASS, "", 1, b"{}", 5, 9))
    assert beat.topic == "hb"
    assert not any(name == "tg-tenant" for name, _ in beat.headers)
    with pytest.raises(ValueError, match="heartbeat_topic"):
        LifecycleConfig(topic="lc.{tenant}")


def test_tenant_topic_mode_needs_a_tenant_lifecycle_topic() -> None:
    kafka = {
        "bootstrap_servers": ["127.0.0.1:9093"],
        "tls": {"cafile": "ca", "certfile": "c", "keyfile": "k"},
    }
    base = {
        "kafka": kafka,
        "classes": {"event": {"kafka_topic": "ev.{tenant}"}},
        "routing": {"dead_letter_topic": "dlq.{tenant}"},
        "tenants": {"devices": {"acme": ["acme-*"]}},
    }
    with pytest.raises(ConfigError, match=r"lifecycle\.topic"):
        parse_config({**base, "lifecycle": {}}, check_files=False)
    parsed = parse_config(
        {**base, "lifecycle": {"topic": "lc.{tenant}", "heartbeat_topic": "hb"}},
        check_files=False,
    )
    assert parsed.lifecycle is not None
