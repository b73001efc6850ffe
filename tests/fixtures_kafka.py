"""Fixtures for tests that need the project's real local Kafka.

``kafka`` (session): the running cluster's :class:`KafkaState`. If ``TIDEGATE_KAFKA_STATE``
names the state file of a running cluster (CI starts one before pytest), that one is reused
and left running; otherwise one is started in a temp dir and stopped at the end of the
session, also when tests fail.

``kafka_topic_factory`` / ``kafka_topic``: fresh topics named after the test plus a random
suffix, so tests never collide, not even across runs against a reused cluster.

``make_ssl_context(state, ...)``: an aiokafka SSL context from the state's TLS files.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka.helpers import create_ssl_context

from gateway.dev.kafka import (
    KafkaState,
    create_topics,
    kafka_status,
    read_state,
    start_kafka,
    stop_kafka,
)
from gateway.errors import LocalKafkaError

__all__ = [
    "kafka",
    "kafka_ssl_context",
    "kafka_topic",
    "kafka_topic_factory",
    "make_ssl_context",
    "topic_name_for",
]

_MAX_TOPIC_BASE = 180  # Kafka allows 249; room for a prefix and suffix


def make_ssl_context(
    state: KafkaState,
    *,
    cafile: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    client_cert: bool = True,
) -> ssl.SSLContext:
    """aiokafka SSL context: the state's CA and gateway client cert unless overridden.

    ``client_cert=False`` gives a context that trusts the CA but presents no certificate.
    """
    context: ssl.SSLContext = create_ssl_context(
        cafile=str(cafile or state.ca_file),
        certfile=str(certfile or state.cert_file) if client_cert else None,
        keyfile=str(keyfile or state.key_file) if client_cert else None,
    )
    return context


def topic_name_for(test_name: str, suffix: str = "") -> str:
    """A legal, unique Kafka topic name derived from a test's name."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", test_name).strip("-.")[:_MAX_TOPIC_BASE]
    extra = f".{suffix}" if suffix else ""
    return f"t.{base}{extra}.{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaState]:
    """The running local Kafka for this session (reused from CI or started here)."""
    env = os.environ.get("TIDEGATE_KAFKA_STATE")
    if env:
        try:
            state = read_state(Path(env))
        except LocalKafkaError as exc:
            pytest.fail(f"TIDEGATE_KAFKA_STATE={env}: {exc}")
        if not kafka_status(state.data_dir).running:
            pytest.fail(f"TIDEGATE_KAFKA_STATE={env}: that Kafka is not running")
        yield state
        return
    root = tmp_path_factory.mktemp("kafka")
    state = start_kafka(root / "data", root / "pki")
    # Teardown below runs on failures too; atexit covers an interpreter exit that skips
    # fixture teardown (brokers run in their own session, so nothing else would stop them).
    # stop_kafka is idempotent, so running both is harmless.
    atexit.register(stop_kafka, state.state_file)
    try:
        yield state
    finally:
        stop_kafka(state.state_file)


@pytest.fixture
def kafka_topic_factory(kafka: KafkaState, request: pytest.FixtureRequest) -> Callable[..., str]:
    """``make(suffix="", partitions=3) -> name``: create a fresh topic for this test."""

    def make(suffix: str = "", partitions: int = 3) -> str:
        name = topic_name_for(request.node.name, suffix)
        create_topics(kafka, [name], partitions=partitions)
        return name

    return make


@pytest.fixture
def kafka_topic(kafka_topic_factory: Callable[..., str]) -> str:
    """A fresh 3-partition topic named after the test."""
    return kafka_topic_factory()


@pytest.fixture
def kafka_ssl_context(kafka: KafkaState) -> ssl.SSLContext:
    """A client SSL context presenting the gateway certificate."""
    return make_ssl_context(kafka)
