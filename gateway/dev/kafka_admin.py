"""Client-side helpers for the local Kafka: TLS context, admin client, topic creation.

Everything talks to the cluster the way the gateway will: over the mutual-TLS listener with
the gateway's client certificate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.helpers import create_ssl_context

from gateway.dev.kafka_state import KafkaState
from gateway.errors import LocalKafkaError

__all__ = [
    "DEFAULT_PARTITIONS",
    "client_ssl_context",
    "create_topics",
    "create_topics_async",
    "open_admin",
    "registered_brokers",
    "run_sync",
]

_T = TypeVar("_T")

DEFAULT_PARTITIONS = 3
_TOPIC_ALREADY_EXISTS = 36


def client_ssl_context(state: KafkaState) -> ssl.SSLContext:
    """An SSL context presenting the gateway's client certificate and trusting the dev CA."""
    context: ssl.SSLContext = create_ssl_context(
        cafile=str(state.ca_file), certfile=str(state.cert_file), keyfile=str(state.key_file)
    )
    return context


async def create_topics_async(
    state: KafkaState,
    names: Iterable[str],
    *,
    partitions: int = DEFAULT_PARTITIONS,
    replication_factor: int | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Create ``names`` (existing ones are fine) and wait until every partition has a leader.

    The replication factor defaults to min(brokers, 3). Waiting for leaders means a producer
    started right after this returns does not race the topic's creation.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    factor = replication_factor or min(len(state.brokers), 3)
    async with asyncio.timeout(timeout_s):
        admin = await open_admin(state)
        try:
            response = await admin.create_topics(
                [NewTopic(name, partitions, factor) for name in wanted]
            )
            failures = [
                f"{topic}: {message or code}"
                for topic, code, message in response.topic_errors
                if code not in (0, _TOPIC_ALREADY_EXISTS)
            ]
            if failures:
                raise LocalKafkaError("creating topics failed: " + "; ".join(failures))
            # Polling a condition on the cluster; the timeout above bounds it.
            while True:
                if await _all_have_leaders(admin, wanted):
                    break
                await asyncio.sleep(0.1)
        finally:
            await admin.close()


def create_topics(
    state: KafkaState,
    names: Iterable[str],
    *,
    partitions: int = DEFAULT_PARTITIONS,
    replication_factor: int | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Blocking form of :func:`create_topics_async` (usable with or without a running loop)."""
    wanted = list(names)
    run_sync(
        lambda: create_topics_async(
            state,
            wanted,
            partitions=partitions,
            replication_factor=replication_factor,
            timeout_s=timeout_s,
        )
    )


async def open_admin(state: KafkaState) -> AIOKafkaAdminClient:
    """A started admin client over mutual TLS; the caller closes it."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=state.bootstrap,
        security_protocol="SSL",
        ssl_context=client_ssl_context(state),
        request_timeout_ms=10_000,
    )
    try:
        await admin.start()
    except BaseException:
        await admin.close()
        raise
    return admin


async def registered_brokers(state: KafkaState) -> int:
    """How many brokers the cluster's metadata lists right now."""
    admin = await open_admin(state)
    try:
        info = await admin.describe_cluster()
        return len(info["brokers"])
    finally:
        await admin.close()


async def _all_have_leaders(admin: AIOKafkaAdminClient, names: Sequence[str]) -> bool:
    described = await admin.describe_topics(list(names))
    for topic in described:
        if topic["error_code"] != 0 or not topic["partitions"]:
            return False
        if any(p["leader"] < 0 for p in topic["partitions"]):
            return False
    return True


def run_sync(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, in a helper thread with its own loop.

    Always a helper thread, even when no loop runs here: ``asyncio.run`` in the caller's
    thread would reset that thread's current event loop, which breaks callers such as
    pytest-asyncio that set one up before running sync fixtures. Inside a running loop this
    blocks that loop, as any sync call does.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tidegate-kafka") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()
