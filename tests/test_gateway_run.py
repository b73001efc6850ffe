"""`tidegate run` / `tidegate status` as an operator uses them, and bad input at the edges."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import cbor2
import pytest

from bench.drain import fill_backlog
from gateway.dev.kafka import KafkaState
from gateway.gc_tuning import FULL_EVERY
from tests.harness import (
    REPO,
    read_topics,
    run_cli,
    running_gateway,
    sim_args,
    wait_for,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls
from tests.harness import publish_qos1 as _publish

pytestmark = pytest.mark.kafka


def _get(gateway_runtime: dict[str, Any], path: str) -> Any:
    admin = gateway_runtime["admin"]
    with urllib.request.urlopen(f"http://{admin['host']}:{admin['port']}{path}", timeout=5) as r:
        return json.loads(r.read())


async def test_garbage_payloads_and_unrouted_topics_reach_kafka_unchanged(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    events, dlq = kafka_topic_factory("events"), kafka_topic_factory("dlq")
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": events, "dlq": dlq}
    )
    garbage = [bytes(range(256)), b"", b"\xff" * 70_000]
    with running_gateway(config) as gateway:
        _publish(
            gateway.mqtt_port,
            "dev-g",
            [("d/dev-g/up/event", g) for g in garbage]
            + [("d/dev-g/up/nosuchclass", b"lost?"), ("d/other/up/event", b"spoof")],
        )
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "drain")
    records = await read_topics(kafka.bootstrap, _tls(kafka), [events])
    assert [r.value for r in records] == garbage
    assert {r.key for r in records} == {b"dev-g"}
    dead = await read_topics(kafka.bootstrap, _tls(kafka), [dlq])
    reasons = {r.value: r.headers["tg-dead-letter-reason"] for r in dead}
    assert set(reasons) == {b"lost?", b"spoof"}
    assert all(r.headers["tg-class"] == b"!unrouted" for r in dead)


def test_status_command_and_device_registry(tmp_path: Path, kafka: KafkaState) -> None:
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": "iot.events"}
    )
    with running_gateway(config) as gateway:
        meta = cbor2.dumps({"type": "thermostat", "firmware_version": "2.4.1"})
        _publish(gateway.mqtt_port, "dev-reg", [("d/dev-reg/meta", meta)])
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "status", "-c", str(config)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert result.returncode == 0, result.stderr
        assert f"127.0.0.1:{gateway.mqtt_port}" in result.stdout
        assert "synchronous FULL" in result.stdout
        assert "rows" in result.stdout
        raw = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "status", "-c", str(config), "--json"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
            check=True,
        )
        status = json.loads(raw.stdout)
        assert set(status) >= {"listeners", "buffer", "kafka"}
        assert "oldest_age_s" in status["buffer"]
        # The running gateway froze its start-up state and spaced full collections out
        # (gateway/gc_tuning.py).
        assert status["gc"]["frozen_objects"] > 10_000
        assert status["gc"]["full_collection_every"] == FULL_EVERY
        devices = wait_for(
            lambda: [d for d in _get(gateway.runtime, "/devices")["devices"] if not d["connected"]],
            10,
            "the device to be recorded as disconnected",
        )
        (device,) = devices
        assert device["device_id"] == "dev-reg"
        assert device["device_type"] == "thermostat"
        assert device["firmware_version"] == "2.4.1"
        assert device["first_seen_ms"] <= device["last_seen_ms"]
    # With the gateway gone, status says so clearly (exit 1, no traceback).
    gone = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "status", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert gone.returncode == 1
    assert "no running gateway" in gone.stderr
    assert "Traceback" not in gone.stderr


def test_corrupt_buffer_refuses_to_start_and_keeps_the_file(
    tmp_path: Path, kafka: KafkaState
) -> None:
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": "iot.events"}
    )
    buffer = tmp_path / "data" / "buffer.sqlite3"
    buffer.parent.mkdir(parents=True)
    junk = b"SQLite format 3\x00" + b"\x13" * 8000
    buffer.write_bytes(junk)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "refusing to start" in result.stderr or "not a tidegate buffer" in result.stderr
    assert "Traceback" not in result.stderr
    assert buffer.read_bytes() == junk


def test_second_gateway_on_the_same_data_dir_is_refused(tmp_path: Path, kafka: KafkaState) -> None:
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": "iot.events"}
    )
    with running_gateway(config):
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "another gateway is running" in result.stderr


async def test_a_trickle_shares_kafka_batches_and_every_message_arrives(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    """Without a backlog the forwarder leases at most once per ``kafka.forward_linger_ms``:
    a trickle (5 devices x 20 msg/s, a group commit of 1-2 rows every few ms) goes to Kafka
    in a few batches, not one per commit, and nothing is lost."""
    events = kafka_topic_factory("events")
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": events},
        kafka_extra="forward_linger_ms = 250\n",
    )
    summary = tmp_path / "sim.json"
    with running_gateway(config) as gateway:
        sim = run_cli(
            "sim", *sim_args(gateway.mqtt_port, 5), "--rate", "20", "--duration", "2",
            "--classes", "event", "--quiet", "--json", str(summary), timeout=120,
        )  # fmt: skip
        assert sim.returncode == 0, sim.stdout[-2000:] + sim.stderr[-2000:]
        status = gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "drain")
    acked = json.loads(summary.read_text())["counters"]["acked"]
    forwarded, batches = status["kafka"]["forwarded"], status["kafka"]["batches"]
    assert forwarded == acked >= 150, (forwarded, acked)
    # ~2.2 s of publishing at one lease per 250 ms: about 10 batches. One batch per commit
    # (the behaviour without pacing) would be well over 100.
    assert batches <= 25, (batches, forwarded, status["buffer"]["commits"])
    records = await read_topics(kafka.bootstrap, _tls(kafka), [events])
    assert len({r.value for r in records}) == len(records) == acked


@pytest.mark.parametrize("send_workers", [1, 0], ids=["send-worker", "in-process"])
async def test_a_backlog_drains_with_deletes_behind_the_sends_each_row_once_in_order(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any, send_workers: int
) -> None:
    """With a backlog the delete of a batch runs while the next batch (leased and built or
    staged ahead) goes to Kafka. Nothing is leased twice: without faults every row arrives
    exactly once, and each device's rows arrive in row order. The same in one process
    (``kafka.send_workers = 0``) and with the default send worker (which may start only
    after part of this small backlog went in-process; tests/test_send_worker.py holds a
    backlog until it runs)."""
    telemetry = kafka_topic_factory("telemetry")
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"telemetry": telemetry},
        extra="[buffer]\nlease_batch = 100\n",
        kafka_extra=f"send_workers = {send_workers}\n",
    )
    rows, devices = 3000, 20
    (tmp_path / "data").mkdir()
    await asyncio.to_thread(fill_backlog, tmp_path / "data" / "buffer.sqlite3", rows, devices)
    with running_gateway(config) as gateway:
        status = gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "the backlog drained")
    assert status["kafka"]["forwarded"] == rows
    assert status["kafka"]["releases_overlapped"] >= rows // 100 // 2, status["kafka"]
    worker = status["kafka"]["send_worker"]
    assert (worker or {}).get("children", 0) == send_workers
    records = await read_topics(kafka.bootstrap, _tls(kafka), [telemetry])
    ids = [int(r.headers["tg-message-id"].split(b":")[1]) for r in records]
    first = min(ids)  # row ids start from a clock-seeded counter
    assert sorted(ids) == list(range(first, first + rows))  # each row once
    by_device: dict[bytes | None, list[int]] = {}
    for record, row_id in zip(records, ids, strict=True):
        by_device.setdefault(record.key, []).append(row_id)
    assert len(by_device) == devices
    assert all(seq == sorted(seq) for seq in by_device.values())
