"""Dead letters end to end: real gateway process, real paho devices, real Kafka (mTLS).

A message Kafka can never take (too large, topic missing past its deadline) is moved to the
dead letters and forwarded to the dead-letter topic with its reason; the messages behind it,
from the same device, are delivered in order. ``tidegate dlq`` lists, replays and purges
dead letters through the running gateway.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import NewTopic

from gateway.dev.kafka import KafkaState, create_topics
from gateway.dev.kafka_admin import open_admin
from tests.fixtures_kafka import topic_name_for
from tests.harness import (
    REPO,
    read_topics,
    running_gateway,
    wait_for,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls
from tests.harness import publish_qos1 as _publish

pytestmark = pytest.mark.kafka


def _config(
    tmp_path: Path, kafka: KafkaState, topics: dict[str, str], kafka_extra: str, extra: str = ""
) -> Path:
    path = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics=topics, extra=extra
    )
    text = path.read_text()
    anchor = "retry_backoff_max_s = 1.0\n"
    assert anchor in text
    path.write_text(text.replace(anchor, anchor + kafka_extra + "\n"))
    return path


def _post_without_token(admin: dict[str, Any]) -> int:
    request = urllib.request.Request(
        f"http://{admin['host']}:{admin['port']}/dead-letters/purge",
        data=b'{"all": true}',
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args, "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_oversized_and_topicless_messages_are_dead_lettered_and_do_not_block(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Callable[..., str]
) -> None:
    events, dlq = kafka_topic_factory("events"), kafka_topic_factory("dlq")
    never_created = f"{events}.missing"
    config = _config(
        tmp_path,
        kafka,
        {"event": events, "bulk": never_created, "dlq": dlq},
        "max_request_bytes = 20000\nmax_batch_bytes = 16384\nmissing_topic_dead_letter_s = 2.0",
    )
    big = b"B" * 30_000
    with running_gateway(config) as gateway:
        _publish(
            gateway.mqtt_port,
            "dev-p",
            [
                ("d/dev-p/up/event", b"one"),
                ("d/dev-p/up/event", big),
                ("d/dev-p/up/bulk", b"to a topic that does not exist"),
                ("d/dev-p/up/event", b"two"),
                ("d/dev-p/up/nosuchclass", b"unrouted"),
                ("d/dev-p/up/event", b"three"),
            ],
        )
        status = gateway.wait_status(
            lambda s: (
                s["buffer"]["rows"] == 0
                and s["buffer"]["dead_letters"] == 0
                and s["kafka"]["dead_letters_forwarded"] == 2
            ),
            60,
            "both dead letters forwarded and the buffer drained",
        )
        assert status["kafka"]["dead_lettered"] == 2
        assert status["kafka"]["breaker"]["state"] == "closed"
    records = await read_topics(kafka.bootstrap, _tls(kafka), [events])
    # The messages behind the poison, from the same device, arrived in order.
    assert [r.value for r in records] == [b"one", b"two", b"three"]
    dead = await read_topics(kafka.bootstrap, _tls(kafka), [dlq])
    by_value = {r.value[:20]: r.headers for r in dead}
    assert set(by_value) == {b"B" * 20, b"to a topic that does", b"unrouted"}
    oversized = by_value[b"B" * 20]
    assert b"exceeds kafka.max_request_bytes" in oversized["tg-dead-letter-reason"]
    assert oversized["tg-class"] == b"event"
    assert oversized["tg-dead-letter-truncated"] == b"30000"
    assert b"does not exist" in by_value[b"to a topic that does"]["tg-dead-letter-reason"]
    assert by_value[b"unrouted"]["tg-dead-letter-reason"] == b"unknown class 'nosuchclass'" or (
        by_value[b"unrouted"]["tg-class"] == b"!unrouted"
    )
    ids = [h["tg-message-id"] for h in by_value.values()] + [
        r.headers["tg-message-id"] for r in records
    ]
    assert len(set(ids)) == len(ids)


async def test_dlq_cli_lists_replays_and_purges_through_the_running_gateway(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Callable[..., str]
) -> None:
    events, dlq = kafka_topic_factory("events"), kafka_topic_factory("dlq")
    late = f"{events}.late"
    config = _config(
        tmp_path,
        kafka,
        {"event": events, "bulk": late, "dlq": dlq},
        "max_request_bytes = 20000\nmax_batch_bytes = 16384\nmissing_topic_dead_letter_s = 1.0",
        extra="[buffer]\nkeep_forwarded_dead_letters = true\n",
    )
    with running_gateway(config) as gateway:
        _publish(
            gateway.mqtt_port,
            "dev-c",
            [
                ("d/dev-c/up/bulk", b"early-1"),
                ("d/dev-c/up/bulk", b"early-2"),
                ("d/dev-c/up/event", b"X" * 25_000),
            ],
        )

        def listed() -> list[dict[str, Any]] | None:
            result = _cli(config, "dlq", "list", "--json")
            assert result.returncode == 0, result.stderr
            items = [json.loads(line) for line in result.stdout.splitlines()]
            done = len(items) == 3 and all(i["forwarded_ms"] for i in items)
            return items if done else None

        items = wait_for(listed, 60, "three dead letters, forwarded to the DLQ topic")
        reasons = {i["class_name"]: i["reason"] for i in items}
        assert "does not exist" in reasons["bulk"]
        assert "exceeds" in reasons["event"]
        text = _cli(config, "dlq", "list")
        assert text.returncode == 0
        assert "in DLQ topic" in text.stdout

        # The operator creates the missing topic and replays those dead letters.
        create_topics(kafka, [late], partitions=1)
        bulk_ids = [str(i["row_id"]) for i in items if i["class_name"] == "bulk"]
        replay = _cli(config, "dlq", "replay", *bulk_ids)
        assert replay.returncode == 0, replay.stderr
        assert "replayed 2" in replay.stdout
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "the replayed rows to drain")
        delivered = await read_topics(kafka.bootstrap, _tls(kafka), [late])
        assert [r.value for r in delivered] == [b"early-1", b"early-2"]
        assert sorted(
            r.headers["tg-message-id"].split(b":")[1].decode() for r in delivered
        ) == sorted(bulk_ids)

        # Bad usage is refused; purge removes the rest for good.
        assert _cli(config, "dlq", "purge").returncode == 2
        purge = _cli(config, "dlq", "purge", "--all")
        assert purge.returncode == 0, purge.stderr
        assert "purged 1" in purge.stdout
        assert _cli(config, "dlq", "list").stdout.strip() == "no dead letters"

        # Without the token the admin API refuses to touch dead letters.
        assert _post_without_token(gateway.runtime["admin"]) == 401

        out = tmp_path / "drops.jsonl"
        export = _cli(config, "drops", "export", "--out", str(out))
        assert export.returncode == 0, export.stderr
        assert out.read_text() == ""


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_record_the_broker_rejects_as_too_large_is_found_and_dead_lettered(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Callable[..., str], delivery: str
) -> None:
    """The topic's ``max.message.bytes`` is below the producer's limit: the broker rejects a
    whole produce batch, the gateway narrows it down to the one record and dead-letters only
    that; the small messages of the same device around it arrive, in order."""
    dlq = kafka_topic_factory("dlq")
    events = topic_name_for("broker-limit", "events")
    admin = await open_admin(kafka)
    try:
        await admin.create_topics(
            [NewTopic(events, 1, 1, topic_configs={"max.message.bytes": "20000"})]
        )
    finally:
        await admin.close()
    create_topics(kafka, [events], partitions=1)
    settings = f'linger_ms = 200\ndelivery = "{delivery}"\nprogress_topic = "{events}.progress"'
    if delivery == "exactly_once":
        create_topics(kafka, [f"{events}.progress"], partitions=1)
    config = _config(tmp_path, kafka, {"event": events, "dlq": dlq}, settings)
    with running_gateway(config) as gateway:
        _publish(
            gateway.mqtt_port,
            "dev-r",
            [("d/dev-r/up/event", f"small-{i}".encode()) for i in range(5)]
            # Random: a compressed batch (zstd by default) must still be over the limit.
            + [("d/dev-r/up/event", random.Random(40).randbytes(40_000))]
            + [("d/dev-r/up/event", f"after-{i}".encode()) for i in range(5)],
        )
        status = gateway.wait_status(
            lambda s: s["buffer"]["rows"] == 0 and s["kafka"]["dead_letters_forwarded"] == 1,
            60,
            "the buffer to drain and one dead letter forwarded",
        )
        assert status["kafka"]["dead_lettered"] == 1
    isolation = "read_committed" if delivery == "exactly_once" else "read_uncommitted"
    records = await read_topics(kafka.bootstrap, _tls(kafka), [events], isolation=isolation)
    values = [r.value for r in records]
    if delivery == "exactly_once":
        assert len(values) == len(set(values)), "exactly-once: no record twice"
    expected = [f"small-{i}".encode() for i in range(5)] + [f"after-{i}".encode() for i in range(5)]
    # At-least-once: a narrowed batch may resend a few small records; order holds.
    assert set(values) == set(expected)
    first = list(dict.fromkeys(values))
    assert first == expected
    dead = await read_topics(kafka.bootstrap, _tls(kafka), [dlq], isolation=isolation)
    assert len(dead) == 1
    assert b"too large" in dead[0].headers["tg-dead-letter-reason"]
