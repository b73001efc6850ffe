"""The results outbox to Kafka: send the oldest results, delete them only after the acks.

Its own producer (at-least-once, idempotent, every wait bounded by
:class:`bridge.producer.KafkaProducerHandle`), so command results never queue behind an
uplink backlog. A result may be sent twice after a crash or a rebuilt producer; each carries
a stable ``result_id`` (gateway id plus the outbox row id, never reused) to de-duplicate on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

from bridge.producer import KafkaProducerHandle, acked_prefix
from bridge.records import KafkaRecord
from edge.commands_model import result_value
from edge.commands_store import CommandStore, OutboxResult
from edge.tenants import TENANT_HEADER, TenantMap, render
from gateway.config import KafkaConfig
from gateway.errors import KafkaError

__all__ = ["ResultSender"]

log = logging.getLogger(__name__)

_BATCH = 500


class ResultSender:
    """``run()`` until cancelled; ``close()`` stops the producer within a deadline."""

    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        topic: str,
        gateway_id: str,
        store: CommandStore,
        tenants: TenantMap | None = None,
    ) -> None:
        self._tenants = tenants
        self._producer = KafkaProducerHandle(kafka)
        self._kafka = kafka
        self._topic = topic
        self._gateway_id = gateway_id
        self._store = store
        self.sent = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        while True:
            try:
                await self._run()
            except Exception:
                # The store failed (disk, I/O): nothing was deleted that Kafka did not ack.
                log.exception("command results outbox failed; retrying")
                await asyncio.sleep(self._kafka.retry_backoff_max_s)

    async def _run(self) -> None:
        failures = 0
        while True:
            results = await self._store.outbox(_BATCH)
            if not results:
                await self._store.wait_outbox(1.0)
                continue
            records = [
                KafkaRecord(
                    self._topic_of(r),
                    r.device_id.encode(),
                    result_value(
                        gateway_id=self._gateway_id,
                        command_id=r.command_id,
                        device_id=r.device_id,
                        status=r.status,
                        reason=r.reason,
                        output_json=r.output_json,
                        at_ms=r.at_ms,
                        result_id=r.id,
                    ),
                    [
                        ("tg-gateway-id", self._gateway_id.encode()),
                        ("tg-command-id", r.command_id.encode()),
                        ("tg-result-id", f"{self._gateway_id}:{r.id}".encode()),
                        *self._tenant_headers(r),
                    ],
                )
                for r in results
            ]
            try:
                outcome = await self._producer.send(records)
            except KafkaError as exc:
                outcome = None
                self.last_error = str(exc)
            prefix = acked_prefix(outcome)
            await self._store.sent([r.id for r in results[:prefix]])
            self.sent += prefix
            if prefix == len(results):
                failures = 0
                self.last_error = None
                continue
            if outcome is not None and outcome.error is not None:
                self.last_error = str(outcome.error)
            failures += 1
            delay = min(self._kafka.retry_backoff_max_s, 0.2 * 2**failures)
            log.warning("command results not acked (%s); retry in %.1fs", self.last_error, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    def _tenant(self, result: OutboxResult) -> str | None:
        """A rejection goes to the tenant the command came for (in its output); every other
        result to the device's tenant."""
        if self._tenants is None:
            return None
        if result.status == "rejected" and result.output_json:
            try:
                claimed = json.loads(result.output_json).get("tenant")
            except (ValueError, AttributeError):
                claimed = None
            if isinstance(claimed, str):
                return claimed
        return self._tenants.tenant_of(result.device_id)

    def _topic_of(self, result: OutboxResult) -> str:
        if self._tenants is None:
            return self._topic
        return render(self._topic, self._tenant(result))

    def _tenant_headers(self, result: OutboxResult) -> list[tuple[str, bytes]]:
        if self._tenants is None:
            return []
        return [(TENANT_HEADER, render("{tenant}", self._tenant(result)).encode())]

    async def close(self, deadline: float) -> None:
        await self._producer.close(deadline=deadline)
