"""Store-and-forward under pressure, end to end: a real gateway process, real devices, and
a real Kafka that is frozen (SIGSTOP) to play an outage without losing its data."""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edge.schema import APPLICATION_ID, SCHEMA_V1
from gateway.dev.kafka import KafkaState
from tests.harness import (
    Publisher,
    device_credentials,
    eventually,
    frozen_kafka,
    per_device_sequences,
    read_topics,
    rss_bytes,
    run_cli,
    running_gateway,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls

pytestmark = pytest.mark.kafka


def _topics(factory: Any, *classes: str) -> dict[str, str]:
    return {name: factory(name) for name in classes}


async def test_overflow_with_kafka_down_bounded_memory_drops_recorded_then_drains(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    topics = _topics(kafka_topic_factory, "event", "telemetry")
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics=topics,
        send_deadline_s=5.0,
        extra="""
[buffer]
max_bytes = 3_145_728            # 3 MiB: the whole file, dead letters and ledger included
block_timeout_s = 600            # keep blocked devices connected for this test
""",
    )
    config.write_text(
        config.read_text().replace(
            f'[classes.telemetry]\nkafka_topic = "{topics["telemetry"]}"',
            f'[classes.telemetry]\nkafka_topic = "{topics["telemetry"]}"\n'
            'lossy = true\non_full = "drop_oldest"',
        )
    )
    payload = 400  # bytes: a few MB fill in seconds
    with running_gateway(config) as gateway:
        pid = gateway.runtime["pid"]
        baseline = rss_bytes(pid)
        with frozen_kafka(kafka.brokers):
            events = Publisher(gateway.mqtt_port, [f"ev-{i}" for i in range(5)], "event")
            telemetry = Publisher(gateway.mqtt_port, [f"tm-{i}" for i in range(5)], "telemetry")
            events.payload_padding = telemetry.payload_padding = payload
            events.start(per_device=4000)
            telemetry.start(per_device=4000)
            gateway.wait_status(lambda s: s["buffer"]["full"], 120, "the buffer to fill")
            acked_when_full = events.total_acked()
            peak = baseline

            def overflowed() -> bool:
                """RSS sampled on every poll until all lossy telemetry went through the
                full buffer (acknowledged, its oldest rows dropped)."""
                nonlocal peak
                peak = max(peak, rss_bytes(pid))
                return telemetry.total_acked() == 5 * 4000

            await eventually(overflowed, "the telemetry to overflow the full buffer", 120)
            status = gateway.status()
            # QoS1 events are blocked: no PUBACK while the buffer is full.
            assert events.total_acked() <= acked_when_full + 5 * 64
            assert status["buffer"]["full"]
            # Lossy telemetry keeps flowing by dropping its oldest, and says so.
            assert status["buffer"]["dropped"].get("buffer full: drop_oldest", 0) > 0
            # Page-level accounting: allow one commit's worth of estimate error.
            assert status["buffer"]["used_bytes"] <= 3_145_728 + 128 * 1024
        assert peak <= baseline + 64 * 1024 * 1024, f"RSS grew {(peak - baseline) >> 20} MiB"
        # Kafka is back: everything retained drains and acknowledgements resume.
        events.wait_done(240)
        telemetry.wait_done(240)
        assert events.total_acked() == 5 * 4000
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 240, "the backlog to drain")
        dropped = gateway.status()["buffer"]["dropped"].get("buffer full: drop_oldest", 0)
    arrived_events = per_device_sequences(
        await read_topics(kafka.bootstrap, _tls(kafka), [topics["event"]], deadline_s=120)
    )
    for device, seqs in events.acked.items():
        assert sorted(set(arrived_events[device])) == sorted(seqs), device
    arrived = per_device_sequences(
        await read_topics(kafka.bootstrap, _tls(kafka), [topics["telemetry"]], deadline_s=120)
    )
    missing = sum(len(set(seqs) - set(arrived.get(d, []))) for d, seqs in telemetry.acked.items())
    assert 0 < missing <= dropped  # every telemetry loss is a recorded drop


async def test_events_overtake_a_telemetry_backlog_which_still_progresses(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    topics = _topics(kafka_topic_factory, "telemetry", "event")  # event gets the higher priority
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics=topics,
        extra="[buffer]\nlease_batch = 200\nlease_min_share = 0.1\n",
    )
    with running_gateway(config) as gateway:
        warm = Publisher(gateway.mqtt_port, ["warm"], "telemetry").start(per_device=1)
        warm.wait_done(30)
        gateway.wait_status(lambda s: s["kafka"]["forwarded"] >= 1, 60, "a live producer")
        with frozen_kafka(kafka.brokers):
            older = Publisher(gateway.mqtt_port, ["tm"], "telemetry").start(per_device=2000)
            older.wait_done(60)
            newer = Publisher(gateway.mqtt_port, ["ev"], "event").start(per_device=2000)
            newer.wait_done(60)
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 120, "the backlog to drain")
    records = await read_topics(
        kafka.bootstrap, _tls(kafka), [topics["telemetry"], topics["event"]]
    )
    sent_at: dict[str, list[int]] = {"tm": [], "ev": []}
    for record in records:
        device = json.loads(record.value)["device"]
        if device in sent_at:
            sent_at[device].append(int(record.headers["tg-ingest-ts"]))
    # Kafka's own timestamps say when each record was produced.
    produced: dict[str, list[int]] = {
        "tm": [r.timestamp for r in records if r.key == b"tm"],
        "ev": [r.timestamp for r in records if r.key == b"ev"],
    }
    assert len(produced["ev"]) == 2000
    assert len(produced["tm"]) == 2000
    # Events were ingested later but reached Kafka first ...
    assert min(sent_at["ev"]) >= max(sent_at["tm"])
    assert sorted(produced["ev"])[len(produced["ev"]) // 2] < sorted(produced["tm"])[1000]
    # ... while telemetry still progressed during the event backlog (guaranteed share).
    assert min(produced["tm"]) <= max(produced["ev"])


def _mqtt_connect(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    user, password = (x.encode() for x in device_credentials(port, client_id))
    body = b"\x00\x04MQTT\x04\xc2\x00\x3c"  # clean session, user name and password
    for field in (client_id.encode(), user, password):
        body += struct.pack("!H", len(field)) + field
    sock.sendall(bytes([0x10, len(body)]) + body)
    assert sock.recv(4)[:2] == b"\x20\x02"  # CONNACK
    return sock


def _mqtt_publish_qos1(
    sock: socket.socket, topic: str, packet_id: int, payload: bytes, *, dup: bool
) -> None:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + struct.pack("!H", packet_id) + payload
    assert len(body) < 128
    sock.sendall(bytes([0x32 | (0x08 if dup else 0), len(body)]) + body)


async def test_dup_retransmission_after_a_crash_is_stored_once(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": kafka_topic}
    )
    opaque = b"\x00\x01opaque-not-cbor\xff"
    with running_gateway(config) as gateway:
        sock = _mqtt_connect(gateway.mqtt_port, "dup-dev")
        _mqtt_publish_qos1(sock, "d/dup-dev/up/event", 42, opaque, dup=False)
        gateway.wait_status(lambda s: s["buffer"]["rows_committed"] >= 1, 30, "the commit")
        # The device never saw a PUBACK it trusts (it ignores the socket); the gateway dies.
        gateway.kill9()
        sock.close()
    with running_gateway(config) as gateway:
        sock = _mqtt_connect(gateway.mqtt_port, "dup-dev")
        _mqtt_publish_qos1(sock, "d/dup-dev/up/event", 42, opaque, dup=True)
        _mqtt_publish_qos1(sock, "d/dup-dev/up/event", 43, b"next", dup=False)
        # Both publishes processed (the DUP recognised, "next" stored), then all forwarded.
        gateway.wait_status(
            lambda s: (
                s["buffer"]["duplicates_suppressed"] >= 1
                and s["buffer"]["rows_committed"] >= 1
                and s["buffer"]["rows"] == 0
            ),
            60,
            "both publishes handled and forwarded",
        )
        status = gateway.status()
        sock.close()
    assert status["buffer"]["duplicates_suppressed"] == 1
    records = await read_topics(kafka.bootstrap, _tls(kafka), [kafka_topic])
    assert Counter(r.value for r in records) == Counter({opaque: 1, b"next": 1})


async def test_a_version_1_buffer_with_rows_is_migrated_and_every_row_arrives(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": kafka_topic}
    )
    path = tmp_path / "data" / "buffer.sqlite3"
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        for statement in SCHEMA_V1:
            db.execute(statement)
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute("PRAGMA user_version=1")
        db.executemany(
            "INSERT INTO uplink (device_id, class, topic, qos, payload, ingest_ms, priority)"
            " VALUES ('old-dev', 'event', 'd/old-dev/up/event', 1, ?, 1, 8)",
            [(json.dumps({"device": "old-dev", "seq": i}).encode(),) for i in range(1, 301)],
        )
    db.close()
    with running_gateway(config) as gateway:
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "the migrated rows to drain")
    records = await read_topics(kafka.bootstrap, _tls(kafka), [kafka_topic])
    assert per_device_sequences(records)["old-dev"] == list(range(1, 301))


async def test_expired_envelopes_are_not_in_kafka_and_are_in_the_drop_ledger(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    telemetry = kafka_topic_factory("telemetry")
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"telemetry": telemetry}
    )
    config.write_text(
        config.read_text().replace(
            f'kafka_topic = "{telemetry}"', f'kafka_topic = "{telemetry}"\nlossy = true'
        )
    )
    ledger, drops = tmp_path / "acks.jsonl", tmp_path / "drops.jsonl"

    cli = run_cli  # sim runs get device credentials from the harness
    with running_gateway(config) as gateway:
        warm = Publisher(gateway.mqtt_port, ["warm"], "telemetry").start(per_device=1)
        warm.wait_done(30)
        gateway.wait_status(lambda s: s["kafka"]["forwarded"] >= 1, 60, "a live producer")
        with frozen_kafka(kafka.brokers):
            sim = cli(
                "sim", "--port", str(gateway.mqtt_port), "--devices", "5", "--count", "20",
                "--classes", "telemetry", "--ttl", "1", "--ledger", str(ledger), "--quiet",
            )  # fmt: skip
            assert sim.returncode == 0, sim.stdout + sim.stderr
            # Kafka stays away longer than the messages live.
            gateway.wait_status(
                lambda s: (
                    s["buffer"]["oldest_age_s"] is not None and s["buffer"]["oldest_age_s"] > 2.0
                ),
                30,
                "the buffered messages to outlive their ttl_s",
            )
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 120, "the buffer to empty")
        status = gateway.status()
        export = cli("drops", "export", "-c", str(config), "--out", str(drops))
        assert export.returncode == 0, export.stdout + export.stderr
    expired = status["buffer"]["dropped"].get("expired", 0)
    # Most expire; a batch already handed to Kafka before the freeze may still arrive.
    assert expired >= 50
    entries = [json.loads(line) for line in drops.read_text().splitlines() if line.strip()]
    assert sum(e["reason"] == "expired" for e in entries) == expired
    verify = cli(
        "verify", "-c", str(config), "--ledger", str(ledger), "--drops", str(drops),
        "--topic", telemetry,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "acknowledged=100 " in verify.stdout
    assert "missing=0" in verify.stdout
    assert f"dropped={expired}" in verify.stdout
