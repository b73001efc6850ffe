"""Graceful operations (issue 9): SIGTERM under load loses nothing acknowledged; SIGHUP
reloads what can change at runtime."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from gateway.config import GatewayConfig, parse_config
from gateway.dev.kafka import KafkaState
from gateway.reload import merge_config
from gateway.runtime_reload import split_changes
from gateway.shutdown import drain
from tests.harness import (
    GatewayProcess,
    Publisher,
    assert_all_acked_arrived,
    read_topics,
    running_gateway,
    wait_for,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls
from tests.harness import publish_qos1 as _publish


async def test_drain_stops_when_empty_when_stalled_and_at_the_budget() -> None:
    rows = [3]

    def forward() -> int:
        rows[0] = max(0, rows[0] - 1)
        return 3 - rows[0]

    assert (await drain(lambda: rows[0], forward, 5.0)).reason == "empty"
    stalled = await drain(lambda: 7, lambda: 0, 5.0, stall_s=0.2)
    assert (stalled.reason, stalled.rows_after) == ("stalled", 7)
    assert stalled.seconds < 1.0
    counter = iter(range(10**9))
    budget = await drain(lambda: 7, lambda: next(counter), 0.3)
    assert budget.reason == "budget"


@pytest.mark.kafka
async def test_sigterm_under_load_every_acknowledged_message_reaches_kafka(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    deadline = 8.0
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": kafka_topic},
        shutdown_deadline_s=deadline,
        extra='[logging]\nformat = "json"\n',
    )
    devices = [f"term-load-{i:02d}" for i in range(8)]
    gateway = GatewayProcess(config)
    publisher = Publisher(0, devices)
    try:
        gateway.start()
        publisher = Publisher(gateway.mqtt_port, devices).start(per_device=4000, inflight=20)
        # Mid-run: devices are publishing as fast as the gateway acknowledges.
        wait_for(lambda: publisher.total_acked() >= 3000, 60, "3000 PUBACKs")
        elapsed = gateway.terminate(timeout=deadline + 5)
        assert gateway.proc is not None
        assert gateway.proc.returncode == 0, gateway.log()[-3000:]
        assert elapsed <= deadline + 1.0, f"exit took {elapsed:.1f} s"
    finally:
        publisher.stop()
        gateway.stop()
    acked = publisher.total_acked()
    assert acked < 8 * 4000, "the fleet finished before SIGTERM: no load at the stop"
    # The whole run logged JSON lines ([logging] format = "json").
    lines = [json.loads(line) for line in gateway.log().splitlines()]
    messages = [line["message"] for line in lines]
    assert "stopping: closing listeners" in messages
    assert any(re.match(r"stopping: drained \d+ of \d+ buffered rows", m) for m in messages)
    assert {"ts", "level", "logger", "message"} <= set(lines[0])
    with running_gateway(config) as restarted:
        restarted.wait_status(lambda s: s["buffer"]["rows"] == 0, 120, "the buffer to drain")
    records = await read_topics(kafka.bootstrap, _tls(kafka), [kafka_topic], deadline_s=60)
    assert_all_acked_arrived(publisher.acked, records)
    assert len(records) >= acked


def _config(**sections: object) -> GatewayConfig:
    tls = {"cafile": "ca.pem", "certfile": "gw.pem", "keyfile": "gw.key"}
    kafka = {"bootstrap_servers": ["127.0.0.1:9093"], "tls": tls}
    classes = {"event": {"kafka_topic": "iot.events"}, "metric": {"kafka_topic": "iot.metrics"}}
    return parse_config({"kafka": kafka, "classes": classes, **sections}, check_files=False)


def test_reload_applies_routes_limits_and_log_level_and_lists_the_rest() -> None:
    old = _config()
    new = _config(
        classes={
            "event": {"kafka_topic": "iot.events.v2", "priority": 9},
            "metric": {"kafka_topic": "iot.metrics"},
        },
        buffer={"max_rows": 1000, "commit_max_batch": 16},
        logging={"level": "DEBUG", "format": "json"},
        quotas={"messages_per_s": 10.0},
        kafka={**old.kafka.model_dump(mode="json"), "linger_ms": 50},
    )
    changes = split_changes(old, new)
    assert sorted(changes.changed) == [
        "buffer.max_rows",
        "classes.event.kafka_topic",
        "logging.level",
        "quotas",
    ]
    assert sorted(changes.restart_needed) == [
        "buffer.commit_max_batch",
        "classes.event.priority",
        "kafka",
        "logging.format",
    ]
    merged = changes.config
    assert merged.classes["event"].kafka_topic == "iot.events.v2"
    assert merged.classes["event"].priority == old.classes["event"].priority
    assert (merged.buffer.max_rows, merged.buffer.commit_max_batch) == (1000, 2048)
    assert (merged.logging.level, merged.logging.format) == ("DEBUG", "text")
    assert merged.kafka == old.kafka
    assert merged.quotas.messages_per_s == 10.0
    # A class added or removed is a restart (its buffer rows, priorities, policies).
    added = split_changes(old, _config(classes={"event": {"kafka_topic": "iot.events"}}))
    assert (added.changed, added.restart_needed) == ([], ["classes"])
    assert merge_config(old, new)[1] == changes.restart_needed


@pytest.mark.kafka
async def test_sighup_changes_a_route_and_the_log_level_and_lists_what_needs_a_restart(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    first, second = kafka_topic_factory("first"), kafka_topic_factory("second")
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": first}
    )
    with running_gateway(config) as gateway:
        _publish(gateway.mqtt_port, "hup-1", [("d/hup-1/up/event", b"before")])
        gateway.wait_status(lambda s: s["kafka"]["forwarded"] >= 1, 60, "the first forward")
        assert " DEBUG " not in gateway.log()
        text = config.read_text()
        config.write_text(
            text.replace(f'kafka_topic = "{first}"', f'kafka_topic = "{second}"').replace(
                "retry_backoff_max_s = 1.0", "retry_backoff_max_s = 2.0"
            )
            + '\n[buffer]\nmax_rows = 200\n\n[logging]\nlevel = "DEBUG"\n'
        )
        assert gateway.proc is not None
        os.kill(gateway.proc.pid, signal.SIGHUP)
        status = gateway.wait_status(
            lambda s: s["security"]["reload"]["reloads"] >= 1, 30, "the reload"
        )
        last = status["security"]["reload"]["last"]
        assert last["ok"], last
        assert sorted(last["changed"]) == [
            "buffer.max_rows",
            "classes.event.kafka_topic",
            "logging.level",
        ]
        assert last["restart_needed"] == ["kafka"]
        # The new route applies to the next forward (the bounds: tests/test_buffer_ops.py).
        _publish(gateway.mqtt_port, "hup-1", [("d/hup-1/up/event", b"after")])
        gateway.wait_status(lambda s: s["kafka"]["forwarded"] >= 2, 60, "the second forward")
        wait_for(lambda: " DEBUG " in gateway.log(), 10, "DEBUG lines after the reload")
    assert [r.value for r in await read_topics(kafka.bootstrap, _tls(kafka), [first])] == [
        b"before"
    ]
    assert [r.value for r in await read_topics(kafka.bootstrap, _tls(kafka), [second])] == [
        b"after"
    ]
