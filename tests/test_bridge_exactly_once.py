"""Exactly-once mode against a real Kafka: kill -9 the gateway at the worst moments.

The worst moment is right after a batch's transaction committed and before its rows were
deleted (a test hook SIGKILLs the process exactly there); the others are random kills during
forwarding. A ``read_committed`` consumer must then see every acknowledged message exactly
once: no message id twice, no device sequence number twice, none missing.
"""

from __future__ import annotations

import collections
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import NewTopic

from bridge.forwarder import CRASH_AFTER_COMMIT_ENV
from gateway.dev.kafka import KafkaState, create_topics
from gateway.dev.kafka_admin import open_admin
from tests.harness import (
    GatewayProcess,
    Publisher,
    read_topics,
    wait_for,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls

pytestmark = pytest.mark.kafka


async def _create_compacted(kafka: KafkaState, name: str) -> None:
    admin = await open_admin(kafka)
    try:
        await admin.create_topics(
            [NewTopic(name, 1, 1, topic_configs={"cleanup.policy": "compact"})]
        )
    finally:
        await admin.close()
    create_topics(kafka, [name], partitions=1)  # exists already: waits for its leader


def _config(tmp_path: Path, kafka: KafkaState, events: str, progress: str) -> Path:
    path = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": events},
        gateway_id=f"gw-eos-{time.time_ns() % 10**9}",  # a fresh transactional id per run
        extra="[buffer]\nlease_batch = 200\n",
    )
    text = path.read_text()
    anchor = "retry_backoff_max_s = 1.0\n"
    path.write_text(
        text.replace(anchor, anchor + f'delivery = "exactly_once"\nprogress_topic = "{progress}"\n')
    )
    return path


def _start(
    config: Path, monkeypatch: pytest.MonkeyPatch, crash_after: int | None
) -> GatewayProcess:
    if crash_after is None:
        monkeypatch.delenv(CRASH_AFTER_COMMIT_ENV, raising=False)
    else:
        monkeypatch.setenv(CRASH_AFTER_COMMIT_ENV, str(crash_after))
    return GatewayProcess(config).start()


def _exited(gateway: GatewayProcess) -> bool:
    return gateway.proc is not None and gateway.proc.poll() is not None


def _forwarded_at_least(count: int, status: dict[str, Any]) -> bool:
    return int(status["kafka"]["forwarded"]) >= count


async def test_kill9_at_commit_and_during_forwarding_gives_no_duplicates_and_no_losses(
    tmp_path: Path,
    kafka: KafkaState,
    kafka_topic_factory: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = kafka_topic_factory("events")
    progress = f"{events}.progress"
    await _create_compacted(kafka, progress)
    config = _config(tmp_path, kafka, events, progress)
    acked: dict[str, list[int]] = {}
    recovered = 0
    gateways: list[GatewayProcess] = []

    def publish(gateway: GatewayProcess, tag: str) -> Publisher:
        devices = [f"{tag}-{i:02d}" for i in range(8)]
        return Publisher(gateway.mqtt_port, devices).start(per_device=300)

    try:
        for round_no, (crash_after, kill_at) in enumerate(
            [(3, None), (None, 400), (None, None), (6, None), (None, 250)]
        ):
            gateway = _start(config, monkeypatch, crash_after)
            gateways.append(gateway)
            status = gateway.wait_status(
                lambda s: s["kafka"]["recoveries"] >= 1, 60, "exactly-once recovery at start"
            )
            recovered += status["kafka"]["recovered_rows"]
            publisher = publish(gateway, f"r{round_no}")
            if crash_after is not None:
                # The hook SIGKILLs the gateway right after a commit, before the delete.
                wait_for(functools.partial(_exited, gateway), 60, "the crash after a commit")
            elif kill_at is not None:
                gateway.wait_status(
                    functools.partial(_forwarded_at_least, kill_at), 60, "forwarding under way"
                )
                gateway.kill9()
            else:
                publisher.wait_done(60)
                gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "the buffer to drain")
                gateway.kill9()
            publisher.stop()
            acked.update(publisher.acked)
        gateway = _start(config, monkeypatch, None)
        gateways.append(gateway)
        final = gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 120, "the final drain")
        recovered += final["kafka"]["recovered_rows"]
        assert final["kafka"]["delivery"] == "exactly_once"
    finally:
        for gateway in gateways:
            gateway.stop()

    # Both injected crashes left a committed batch in the buffer; recovery released it.
    assert recovered > 0
    assert sum(len(v) for v in acked.values()) > 1000
    records = await read_topics(kafka.bootstrap, _tls(kafka), [events], isolation="read_committed")
    ids = collections.Counter(r.headers["tg-message-id"] for r in records)
    duplicated_ids = {i: n for i, n in ids.items() if n > 1}
    assert not duplicated_ids, (
        f"{len(duplicated_ids)} message ids twice, e.g. {list(duplicated_ids)[:3]}"
    )
    seen: dict[str, list[int]] = collections.defaultdict(list)
    for record in records:
        body = json.loads(record.value)
        seen[body["device"]].append(int(body["seq"]))
    for device, seqs in acked.items():
        got = seen.get(device, [])
        missing = set(seqs) - set(got)
        assert not missing, f"{device}: {len(missing)} acknowledged messages missing"
        assert len(got) == len(set(got)), f"{device}: a sequence number arrived twice"
        assert got == sorted(got), f"{device}: out of order"
