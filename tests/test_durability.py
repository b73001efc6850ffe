"""The durable chain end to end: real gateway process, real paho devices, real Kafka (mTLS).

PUBACK means committed with synchronous=FULL; a row leaves the buffer only after Kafka acked
it. These tests kill the gateway with SIGKILL, freeze Kafka, misconfigure TLS and stop the
gateway while Kafka is down, and check that every PUBACKed message reaches Kafka in
per-device order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.dev.kafka import KafkaState
from gateway.pki import init_pki
from tests.harness import (
    GatewayProcess,
    KafkaTls,
    Publisher,
    assert_all_acked_arrived,
    read_topics,
    running_gateway,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls

pytestmark = pytest.mark.kafka


def _dead_port() -> int:
    """A loopback port nobody listens on (Kafka "stopped": connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _frozen(kafka: KafkaState) -> Iterator[None]:
    """SIGSTOP every broker: connections hang, nothing is acked (aiokafka #1101 territory)."""
    for broker in kafka.brokers:
        os.kill(broker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for broker in kafka.brokers:
            os.kill(broker.pid, signal.SIGCONT)


def _devices(n: int, tag: str) -> list[str]:
    return [f"{tag}-{i:03d}" for i in range(n)]


async def _assert_delivered(
    kafka: KafkaState, topic: str, publisher: Publisher, gateway: GatewayProcess
) -> None:
    gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 120, "the buffer to drain")
    records = await read_topics(kafka.bootstrap, _tls(kafka), [topic])
    assert_all_acked_arrived(publisher.acked, records)
    ids = [r.headers["tg-message-id"] for r in records]
    assert all(i.startswith(b"gw-test:") for i in ids)


async def test_kill9_while_kafka_is_down_loses_nothing(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    tls = _tls(kafka)
    # Phase 1: Kafka unreachable. Devices publish, the gateway acknowledges from disk.
    config = write_gateway_config(
        tmp_path, bootstrap=f"127.0.0.1:{_dead_port()}", tls=tls, topics={"event": kafka_topic}
    )
    publisher: Publisher | None = None
    with running_gateway(config) as gateway:
        publisher = Publisher(gateway.mqtt_port, _devices(10, "k9")).start(per_device=400)
        status = gateway.wait_status(
            lambda s: s["buffer"]["rows"] >= 1000 and publisher.total_acked() >= 1000,
            60,
            "1,000 PUBACKed messages in the buffer",
        )
        assert status["buffer"]["synchronous"] == "FULL"
        assert status["buffer"]["journal_mode"] == "WAL"
        # Group commit: many publishes share one fsync'd transaction.
        assert status["buffer"]["rows_committed"] >= 2 * status["buffer"]["commits"]
        assert status["kafka"]["forwarded"] == 0
        gateway.kill9()  # devices are still publishing
        publisher.stop()
    assert publisher.total_acked() >= 1000

    # Phase 2: Kafka is back (the same config, now pointing at the running cluster).
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=tls, topics={"event": kafka_topic}
    )
    with running_gateway(config) as gateway:
        await _assert_delivered(kafka, kafka_topic, publisher, gateway)


async def test_kill9_during_live_forwarding_loses_nothing(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": kafka_topic}
    )
    with running_gateway(config) as gateway:
        publisher = Publisher(gateway.mqtt_port, _devices(10, "live")).start(per_device=400)
        gateway.wait_status(
            lambda s: s["kafka"]["forwarded"] >= 500, 60, "forwarding to be under way"
        )
        gateway.kill9()
        publisher.stop()
    assert publisher.total_acked() >= 500
    with running_gateway(config) as gateway:
        await _assert_delivered(kafka, kafka_topic, publisher, gateway)


async def test_message_ids_keep_increasing_across_drain_and_restart(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": kafka_topic}
    )

    batches: list[list[int]] = []
    for round_ in range(2):
        with running_gateway(config) as gateway:
            publisher = Publisher(gateway.mqtt_port, [f"ids-{round_}"]).start(per_device=20)
            publisher.wait_done(30)
            gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "drain")
            gateway.terminate(timeout=30)
        records = await read_topics(kafka.bootstrap, _tls(kafka), [kafka_topic])
        batches.append(
            sorted(
                int(r.headers["tg-message-id"].split(b":")[1])
                for r in records
                if r.key == f"ids-{round_}".encode()
            )
        )
    assert len(batches[0]) == 20
    assert len(batches[1]) == 20
    assert min(batches[1]) > max(batches[0])


async def test_wrong_ca_buffers_then_delivers_after_fix(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    other = init_pki(tmp_path / "other-pki")
    wrong = KafkaTls(other.ca_cert, kafka.cert_file, kafka.key_file)
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=wrong, topics={"event": kafka_topic}
    )
    with running_gateway(config) as gateway:
        publisher = Publisher(gateway.mqtt_port, _devices(3, "ca")).start(per_device=50)
        publisher.wait_done(30)
        status = gateway.wait_status(
            lambda s: s["kafka"]["last_error"] is not None and s["buffer"]["rows"] == 150,
            30,
            "the TLS error to be reported",
        )
        assert "certificate" in status["kafka"]["last_error"].lower()
        assert status["kafka"]["forwarded"] == 0
        assert status["buffer"]["rows"] == 150
        gateway.terminate(timeout=30)
    assert "certificate" in gateway.log().lower()
    assert (await read_topics(kafka.bootstrap, _tls(kafka), [kafka_topic])) == []

    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics={"event": kafka_topic}
    )
    with running_gateway(config) as gateway:
        await _assert_delivered(kafka, kafka_topic, publisher, gateway)


async def test_stuck_producer_is_rebuilt_without_loss(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": kafka_topic},
        send_deadline_s=3.0,
        request_timeout_s=2.0,
    )
    with running_gateway(config) as gateway:
        before = Publisher(gateway.mqtt_port, _devices(3, "pre")).start(per_device=100)
        gateway.wait_status(lambda s: s["kafka"]["forwarded"] >= 100, 60, "forwarding")
        with _frozen(kafka):
            # Published while Kafka hangs: a batch is in flight when the deadline passes.
            during = Publisher(gateway.mqtt_port, _devices(5, "stuck")).start(per_device=100)
            gateway.wait_status(
                lambda s: s["kafka"]["producer_rebuilds"] >= 1, 60, "the producer rebuild"
            )
        before.wait_done(60)
        during.wait_done(60)
        await _assert_delivered(kafka, kafka_topic, before, gateway)
        await _assert_delivered(kafka, kafka_topic, during, gateway)


async def test_sigterm_with_kafka_down_exits_within_deadline(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    deadline = 4.0
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": kafka_topic},
        shutdown_deadline_s=deadline,
        send_deadline_s=30.0,
    )
    gateway = GatewayProcess(config)
    try:
        gateway.start()
        warmup = Publisher(gateway.mqtt_port, ["term-warmup"]).start(per_device=5)
        warmup.wait_done(30)
        gateway.wait_status(lambda s: s["kafka"]["forwarded"] >= 5, 60, "a live producer")
        with _frozen(kafka):
            publisher = Publisher(gateway.mqtt_port, _devices(3, "term")).start(per_device=50)
            publisher.wait_done(30)
            gateway.wait_status(lambda s: s["buffer"]["rows"] == 150, 30, "rows in the buffer")
            elapsed = gateway.terminate(timeout=deadline + 5)
        assert elapsed <= deadline + 5
    finally:
        gateway.stop()
    with running_gateway(config) as gateway:
        await _assert_delivered(kafka, kafka_topic, publisher, gateway)
