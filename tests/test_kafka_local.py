"""The project's local Kafka, for real: mutual TLS, groups, transactions, side-by-side runs.

Every aiokafka call is bounded by ``asyncio.timeout``; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from typer.testing import CliRunner

from gateway.dev.cli import dev_app
from gateway.dev.kafka import (
    DEFAULT_TOPICS,
    KafkaState,
    create_topics_async,
    kafka_status,
    read_state,
    start_kafka,
    stop_kafka,
)
from gateway.dev.kafka_proc import pick_free_ports
from gateway.pki import init_pki
from tests.fixtures_kafka import make_ssl_context
from tests.harness import eventually

pytestmark = pytest.mark.kafka

_DEADLINE_S = 60.0


def _common(state: KafkaState, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    return {
        "bootstrap_servers": state.bootstrap,
        "security_protocol": "SSL",
        "ssl_context": context or make_ssl_context(state),
    }


@asynccontextmanager
async def _producer(state: KafkaState, **options: Any) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(**_common(state), **options)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


@asynccontextmanager
async def _consumer(
    state: KafkaState, *topics: str, **options: Any
) -> AsyncIterator[AIOKafkaConsumer]:
    options.setdefault("auto_offset_reset", "earliest")
    consumer = AIOKafkaConsumer(*topics, **_common(state), **options)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


@asynccontextmanager
async def _sasl_producer(state: KafkaState, mechanism: str) -> AsyncIterator[AIOKafkaProducer]:
    """A producer on the SASL_SSL listener: the CA only (no client certificate) and the
    state's dev user."""
    assert state.sasl is not None
    producer = AIOKafkaProducer(
        bootstrap_servers=state.sasl_bootstrap,
        security_protocol="SASL_SSL",
        ssl_context=make_ssl_context(state, client_cert=False),
        sasl_mechanism=mechanism,
        sasl_plain_username=state.sasl.username,
        sasl_plain_password=state.sasl.password_file.read_text(),
        acks="all",
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def _take(consumer: AIOKafkaConsumer, count: int) -> list[Any]:
    return [await consumer.getone() for _ in range(count)]


async def test_default_topics_exist(kafka: KafkaState) -> None:
    admin = AIOKafkaAdminClient(**_common(kafka))
    async with asyncio.timeout(_DEADLINE_S):
        await admin.start()
        try:
            topics = set(await admin.list_topics())
        finally:
            await admin.close()
    assert set(DEFAULT_TOPICS) <= topics


async def test_idempotent_produce_and_group_resumes_after_commit(
    kafka: KafkaState, kafka_topic_factory: Callable[..., str]
) -> None:
    topic = kafka_topic_factory(partitions=1)
    group = f"{topic}.group"
    tp = TopicPartition(topic, 0)
    async with asyncio.timeout(_DEADLINE_S):
        async with _producer(kafka, enable_idempotence=True, acks="all") as producer:
            for i in range(10):
                await producer.send_and_wait(topic, f"m{i}".encode(), key=b"k")

        async with _consumer(kafka, topic, group_id=group, enable_auto_commit=False) as first:
            taken = await _take(first, 4)
            assert [m.value for m in taken] == [b"m0", b"m1", b"m2", b"m3"]
            await first.commit({tp: taken[-1].offset + 1})

        async with _consumer(kafka, topic, group_id=group, enable_auto_commit=False) as second:
            assert await second.committed(tp) == 4
            rest = await _take(second, 6)
    assert [m.offset for m in rest] == list(range(4, 10))
    assert [m.value for m in rest] == [f"m{i}".encode() for i in range(4, 10)]


async def test_transactions_and_read_committed(
    kafka: KafkaState, kafka_topic_factory: Callable[..., str]
) -> None:
    source = kafka_topic_factory("in", partitions=1)
    sink = kafka_topic_factory("out", partitions=1)
    group = f"{source}.eos"
    async with asyncio.timeout(_DEADLINE_S):
        async with _producer(kafka, enable_idempotence=True, acks="all") as plain:
            await plain.send_and_wait(source, b"input")

        async with _producer(kafka, transactional_id=f"{sink}.tx") as producer:
            async with producer.transaction():
                await producer.send(sink, b"a")
                await producer.send(sink, b"b")
            await producer.begin_transaction()
            await producer.send(sink, b"aborted")
            await producer.abort_transaction()
            # consume-transform-produce: the input offset commits with the output, atomically
            async with producer.transaction():
                await producer.send(sink, b"c")
                await producer.send_offsets_to_transaction({TopicPartition(source, 0): 1}, group)

        async with _consumer(kafka, sink, isolation_level="read_committed") as committed:
            seen = [m.value for m in await _take(committed, 3)]
        # Control: the aborted record really is in the log; only read_committed hides it.
        async with _consumer(kafka, sink, isolation_level="read_uncommitted") as everything:
            raw = [m.value for m in await _take(everything, 4)]
        async with _consumer(kafka, source, group_id=group, enable_auto_commit=False) as reader:
            offset = await reader.committed(TopicPartition(source, 0))
    assert seen == [b"a", b"b", b"c"]
    assert b"aborted" in raw
    assert offset == 1


def _handshake_failures(state: KafkaState) -> int:
    return sum(
        broker.log.read_text(errors="replace").count("SSL handshake failed")
        for broker in state.brokers
    )


async def _assert_refused(state: KafkaState, context: ssl.SSLContext) -> None:
    """The client cannot connect, and the broker says why: the TLS handshake failed."""
    before = _handshake_failures(state)
    producer = AIOKafkaProducer(**_common(state, context), request_timeout_ms=10_000)
    try:
        async with asyncio.timeout(30):
            # start() bootstraps with a metadata request: under TLS 1.3 the server checks the
            # client certificate after the client considers the handshake done, so it is
            # that first request which fails.
            with pytest.raises(KafkaConnectionError):
                await producer.start()
    finally:
        await producer.stop()
    # The broker logs the refusal just after closing the socket: poll, with a deadline.
    await eventually(
        lambda: _handshake_failures(state) > before, "the broker to log the refusal", 10
    )


async def test_client_without_certificate_is_refused(kafka: KafkaState) -> None:
    await _assert_refused(kafka, make_ssl_context(kafka, client_cert=False))


async def test_client_with_certificate_from_another_ca_is_refused(
    kafka: KafkaState, tmp_path: Path
) -> None:
    other = init_pki(tmp_path / "other-pki")
    # Trusts the real CA (so the broker is accepted) but presents a foreign client cert.
    context = make_ssl_context(kafka, certfile=other.gateway_cert, keyfile=other.gateway_key)
    await _assert_refused(kafka, context)


async def test_two_instances_side_by_side(kafka: KafkaState, tmp_path: Path) -> None:
    second = await asyncio.to_thread(
        start_kafka, tmp_path / "data", tmp_path / "pki", topics=["side.by.side"]
    )
    try:
        assert set(second.bootstrap_servers).isdisjoint(kafka.bootstrap_servers)
        assert second.ca_file != kafka.ca_file  # its own PKI, its own CA
        async with asyncio.timeout(_DEADLINE_S):
            await create_topics_async(kafka, ["side.by.side"], partitions=1)
            for state, payload in ((kafka, b"first"), (second, b"second")):
                async with _producer(state, enable_idempotence=True, acks="all") as producer:
                    await producer.send_and_wait("side.by.side", payload)
            async with _consumer(second, "side.by.side") as consumer:
                only = await consumer.getone()
                # Bounded check that nothing else is there: getmany returns what it has.
                extra = await consumer.getmany(timeout_ms=500)
        assert only.value == b"second"
        assert not any(extra.values())
    finally:
        await asyncio.to_thread(stop_kafka, second.state_file)
    assert not kafka_status(second.data_dir).any_alive
    assert kafka_status(kafka.data_dir).running


async def test_three_brokers_replicate(tmp_path: Path) -> None:
    state = await asyncio.to_thread(
        start_kafka, tmp_path / "data", tmp_path / "pki", brokers=3, topics=["rf3"]
    )
    try:
        assert len(state.bootstrap_servers) == 3
        admin = AIOKafkaAdminClient(**_common(state))
        async with asyncio.timeout(_DEADLINE_S):
            await admin.start()
            try:
                cluster = await admin.describe_cluster()
                (described,) = await admin.describe_topics(["rf3"])
            finally:
                await admin.close()
            async with _producer(state, enable_idempotence=True, acks="all") as producer:
                await producer.send_and_wait("rf3", b"replicated", partition=0)
            # Every node has the SASL_SSL listener: one record per partition (leaders are
            # spread over the nodes) through the SASL bootstrap.
            async with _sasl_producer(state, "SCRAM-SHA-512") as producer:
                for partition in range(3):
                    await producer.send_and_wait("rf3", b"over-sasl", partition=partition)
            async with _consumer(state, "rf3", group_id="rf3.group") as consumer:
                messages = await _take(consumer, 4)
        assert len(cluster["brokers"]) == 3
        assert all(len(p["replicas"]) == 3 for p in described["partitions"])
        assert len({p["leader"] for p in described["partitions"]}) > 1
        assert sorted(m.value for m in messages) == [b"over-sasl"] * 3 + [b"replicated"]
        assert state.sasl_bootstrap is not None
        assert len(state.sasl_bootstrap.split(",")) == 3
    finally:
        await asyncio.to_thread(stop_kafka, state.state_file)
    assert not kafka_status(state.data_dir).any_alive


def test_cli_up_status_down(tmp_path: Path) -> None:
    runner = CliRunner()
    data, pki = tmp_path / "kafka", tmp_path / "pki"
    result = runner.invoke(dev_app, ["kafka", "up", "--dir", str(data), "--pki", str(pki)])
    try:
        assert result.exit_code == 0, result.output
        state = read_state(data / "state.json")
        assert f"bootstrap: {state.bootstrap}" in result.output
        assert (pki / "ca.pem").is_file()

        again = runner.invoke(dev_app, ["kafka", "up", "--dir", str(data), "--pki", str(pki)])
        assert again.exit_code == 0
        assert "already running" in again.output

        status = runner.invoke(dev_app, ["kafka", "status", "--dir", str(data)])
        assert status.exit_code == 0, status.output
        assert "alive" in status.output
        assert state.sasl is not None
        assert f"sasl_ssl port {state.brokers[0].sasl_port}" in status.output
        assert f"sasl_ssl bootstrap: {state.sasl_bootstrap}" in result.output
        assert state.sasl.password_file.stat().st_mode & 0o777 == 0o600
        assert state.sasl.password_file.read_text() not in (data / "state.json").read_text()
    finally:
        down = runner.invoke(dev_app, ["kafka", "down", "--dir", str(data)])
    assert down.exit_code == 0, down.output
    assert not (data / "state.json").exists()
    after = runner.invoke(dev_app, ["kafka", "status", "--dir", str(data)])
    assert after.exit_code == 1
    assert "not running" in after.output


def test_cli_rejects_bad_broker_count(tmp_path: Path) -> None:
    result = CliRunner().invoke(dev_app, ["kafka", "up", "--dir", str(tmp_path), "--brokers", "2"])
    assert result.exit_code == 2
    assert "must be 1 or 3" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "state.json").exists()


def test_taken_port_is_retried_with_new_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port taken between picking and binding makes the start retry, not fail."""
    picks: list[list[int]] = []
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]

        def pick(count: int) -> list[int]:
            ports = pick_free_ports(count)
            if not picks:
                ports[0] = busy  # the SSL listener of the first attempt cannot bind
            picks.append(ports)
            return ports

        monkeypatch.setattr("gateway.dev.kafka.pick_free_ports", pick)
        state = start_kafka(tmp_path / "data", tmp_path / "pki", topics=[])
    try:
        assert len(picks) == 2
        assert state.brokers[0].ssl_port != busy
        assert kafka_status(state.data_dir).running
    finally:
        stop_kafka(state.state_file)
