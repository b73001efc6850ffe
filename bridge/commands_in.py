"""The downlink consumer: commands from this gateway's Kafka topic into SQLite.

Ordering of durability: a batch of records is parsed, stored (commands and their
``accepted``/``rejected`` results, one transaction, synchronous=FULL), and only then are
the offsets committed. A crash between the two re-reads the batch; the command ids already
stored are recognised and accepted once. A record that is not a valid command becomes a
``rejected`` result: it never stops the consumer.

The consumer group is per gateway (``commands.group_id``) and so is the topic
(``commands.topic``, ``iot.commands.{gateway_id}`` by default): see docs/commands.md.
With tenants, each command is checked against the tenant it came for (the tenant of its
topic, ``tenants.mode = "topic"``, or its ``tg-tenant`` header, ``"header"``): a command for
another tenant's device is rejected, and the rejection is reported to the sending tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError as AioKafkaError
from aiokafka.structs import OffsetAndMetadata

from bridge.kafka_security import ClientSecurity, client_security, explain_login_failure
from edge.commands_model import Command, Rejection, parse_command
from edge.commands_store import CommandStore
from edge.tenants import TENANT_HEADER, TenantMap, check_command_tenant, render
from gateway.config import CommandsConfig, KafkaConfig
from gateway.errors import KafkaError

__all__ = ["CommandConsumer"]

log = logging.getLogger(__name__)


class CommandConsumer:
    """Consumes commands for one gateway. ``run()`` until cancelled."""

    def __init__(
        self,
        kafka: KafkaConfig,
        config: CommandsConfig,
        *,
        gateway_id: str,
        store: CommandStore,
        on_stored: Callable[[list[str]], None],
        tenants: TenantMap | None = None,
    ) -> None:
        self._kafka = kafka
        self._config = config
        self._tenants = tenants
        self._topic = config.kafka_topic(gateway_id)
        # Topic -> the tenant it belongs to (topic mode: one topic per tenant).
        self._topics: dict[str, str | None] = (
            {render(self._topic, t): t for t in tenants.names}
            if tenants is not None and tenants.mode == "topic"
            else {self._topic: None}
        )
        self._group = config.kafka_group(gateway_id)
        self._store = store
        self._on_stored = on_stored
        self.consumed = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        """Consume forever; on a Kafka failure rebuild the consumer after a capped backoff."""
        failures = 0
        while True:
            consumer: AIOKafkaConsumer | None = None
            try:
                # Inside the try: a password file that cannot be read is retried, not fatal.
                security = client_security(self._kafka)
                consumer = self._build(security)
                await self._consume(consumer, security)
            except Exception as exc:
                # Kafka errors, and a store that failed (disk full, I/O): the offsets were not
                # committed, so a fresh consumer reads the batch again. Never a crash.
                failures += 1
                self.last_error = repr(exc)
                if not isinstance(exc, AioKafkaError | OSError | TimeoutError | KafkaError):
                    log.exception("command intake failed")
                delay = min(self._kafka.retry_backoff_max_s, 0.2 * 2**failures)
                log.warning(
                    "command consumer on %s failed (%r); retrying in %.1fs", self._topic, exc, delay
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            finally:
                if consumer is not None:
                    await self._stop(consumer)

    def _build(self, security: ClientSecurity) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=self._kafka.bootstrap_servers,
            client_id=f"{self._kafka.client_id}-commands",
            group_id=self._group,
            **security.kwargs(),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=int(self._kafka.request_timeout_s * 1000) + 30_000,
        )

    async def _consume(self, consumer: AIOKafkaConsumer, security: ClientSecurity) -> None:
        try:
            async with asyncio.timeout(self._kafka.request_timeout_s + 5):
                await consumer.start()
        except AioKafkaError as exc:
            await explain_login_failure(self._kafka, security, exc)
            raise
        log.info("consuming commands from %s (group %s)", ", ".join(self._topics), self._group)
        while True:
            batch = await consumer.getmany(
                timeout_ms=500, max_records=self._config.max_commands_per_poll
            )
            if not batch:
                continue
            items: list[Command | Rejection] = []
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp, records in batch.items():
                for record in records:
                    item = parse_command(
                        record.key,
                        record.value,
                        timestamp_ms=record.timestamp,
                        max_params_bytes=self._config.max_params_bytes,
                        max_ttl_s=self._config.max_ttl_s,
                    )
                    if self._tenants is not None:
                        claimed = self._claimed_tenant(record.topic, record.headers)
                        item = check_command_tenant(self._tenants, claimed, item)
                    items.append(item)
                offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "")
            woken = await self._store.accept(items)  # durable before the offsets move
            self.consumed += len(items)
            self._on_stored(woken)
            async with asyncio.timeout(self._kafka.request_timeout_s + 5):
                await consumer.commit(offsets)
            self.last_error = None

    def _claimed_tenant(self, topic: str, headers: Sequence[tuple[str, bytes]]) -> str | None:
        """The tenant a command came for: its topic's, or its ``tg-tenant`` header."""
        if self._tenants is not None and self._tenants.mode == "topic":
            return self._topics.get(topic)
        for key, value in headers or ():
            if key == TENANT_HEADER:
                return bytes(value).decode("utf-8", "replace")
        return None

    async def _stop(self, consumer: AIOKafkaConsumer) -> None:
        # stop() can hang while Kafka is away (it tries to leave the group): bounded.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await consumer.stop()
