"""A Kafka producer that can be thrown away: every wait has a deadline.

aiokafka's idempotent producer can hang forever while brokers are unreachable (futures and
even ``stop()``: aiokafka #1101) or stay stuck after OutOfOrderSequenceNumber (#1017). So
this wrapper never awaits aiokafka without a deadline, and when a batch misses its deadline
the whole producer is discarded and a new one built. Rows stay in the buffer until acked,
so discarding a producer loses nothing; it may duplicate (a new producer id is a new
idempotence scope), which at-least-once allows and every record's message id lets a
consumer detect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError as AioKafkaError

from bridge.records import KafkaRecord
from bridge.tls import build_ssl_context
from gateway.config import KafkaConfig
from gateway.errors import KafkaError, KafkaUnavailableError

__all__ = ["KafkaProducerHandle", "SendOutcome", "diagnose_connection"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """Per-record result of one batch: ``acked[i]`` is True when record ``i`` was acked."""

    acked: list[bool]
    error: KafkaError | None
    """The first failure, if any."""
    stuck: bool
    """True when the batch missed its deadline: the producer must be rebuilt."""


class KafkaProducerHandle:
    """Owns at most one live aiokafka producer and rebuilds it on demand."""

    def __init__(self, config: KafkaConfig) -> None:
        self._config = config
        self._producer: AIOKafkaProducer | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.rebuilds = 0

    @property
    def connected(self) -> bool:
        return self._producer is not None

    async def ensure_started(self) -> None:
        """Start a producer if there is none; raise a translated error if Kafka refuses."""
        if self._producer is not None:
            return
        context = build_ssl_context(self._config.tls)
        cfg = self._config
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers,
            client_id=cfg.client_id,
            security_protocol="SSL",
            ssl_context=context,
            acks="all",
            enable_idempotence=True,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_batch_bytes,
            max_request_size=max(cfg.max_batch_bytes, 1 << 20),
            compression_type=None if cfg.compression == "none" else cfg.compression,
            request_timeout_ms=int(cfg.request_timeout_s * 1000),
        )
        try:
            async with asyncio.timeout(cfg.request_timeout_s + 5):
                await producer.start()
        except (AioKafkaError, OSError, TimeoutError) as exc:
            self._retire(producer)
            reason = await diagnose_connection(cfg, context)
            raise KafkaUnavailableError(f"cannot start Kafka producer: {reason or exc!r}") from exc
        self._producer = producer

    async def send(self, records: Sequence[KafkaRecord]) -> SendOutcome:
        """Send a batch and wait for every ack, within ``send_deadline_s``."""
        await self.ensure_started()
        producer = self._producer
        assert producer is not None
        deadline = self._config.send_deadline_s
        futures: list[asyncio.Future[object]] = []
        try:
            async with asyncio.timeout(deadline):
                for record in records:
                    futures.append(
                        await producer.send(
                            record.topic, record.value, key=record.key, headers=record.headers
                        )
                    )
        except TimeoutError:
            self.discard("enqueueing a batch missed its deadline")
            return self._outcome(futures, len(records), stuck=True)
        except AioKafkaError as exc:
            # Not enqueued at all (e.g. unknown topic, record too large): fail this batch.
            return self._outcome(futures, len(records), stuck=False, first=exc)
        if futures:
            _, pending = await asyncio.wait(futures, timeout=deadline)
            if pending:
                self.discard(f"{len(pending)} of {len(records)} records not acked in {deadline}s")
                return self._outcome(futures, len(records), stuck=True)
        return self._outcome(futures, len(records), stuck=False)

    def _outcome(
        self,
        futures: list[asyncio.Future[object]],
        total: int,
        *,
        stuck: bool,
        first: BaseException | None = None,
    ) -> SendOutcome:
        acked = [False] * total
        error: KafkaError | None = None
        for index, future in enumerate(futures):
            if not future.done():
                future.cancel()
                continue
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is None:
                acked[index] = True
            elif first is None:
                first = exc
        if first is not None:
            error = KafkaUnavailableError(f"Kafka send failed: {first!r}")
            error.__cause__ = first
        elif stuck:
            error = KafkaUnavailableError("Kafka did not acknowledge in time (producer rebuilt)")
        return SendOutcome(acked=acked, error=error, stuck=stuck)

    def discard(self, why: str) -> None:
        """Throw the current producer away (its stop() runs in the background, bounded)."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        self.rebuilds += 1
        log.warning("discarding the Kafka producer: %s", why)
        self._retire(producer)

    def _retire(self, producer: AIOKafkaProducer) -> None:
        async def stop() -> None:
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(5):
                    await producer.stop()

        task = asyncio.create_task(stop(), name="kafka-producer-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self, deadline: float = 5.0) -> None:
        """Stop the live producer and any retiring ones, never longer than ``deadline``."""
        producer, self._producer = self._producer, None
        if producer is not None:
            self._retire(producer)
        tasks = list(self._retiring)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for task in pending:
                task.cancel()


async def diagnose_connection(config: KafkaConfig, context: ssl.SSLContext) -> str | None:
    """Open one TLS connection to the first bootstrap server to say *why* Kafka is unreachable.

    aiokafka reports "Unable to bootstrap"; an operator needs "certificate verify failed" or
    "connection refused". Returns None when the handshake works (the problem is elsewhere).
    """
    host, _, port = config.bootstrap_servers[0].rpartition(":")
    writer = None
    try:
        async with asyncio.timeout(5):
            _, writer = await asyncio.open_connection(
                host.strip("[]"), int(port), ssl=context, server_hostname=host.strip("[]")
            )
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: broker certificate rejected ({exc.verify_message}); check kafka.tls.cafile"
    except ssl.SSLError as exc:
        return f"TLS handshake with {host}:{port} failed: {exc.reason or exc}"
    except TimeoutError:
        return f"no answer from {host}:{port} within 5 s"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return None
