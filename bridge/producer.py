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
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError as AioKafkaError
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder

from bridge.batching import PartitionChooser, PartitionRun, plan_partition_runs
from bridge.kafka_security import client_security, diagnose_sasl
from bridge.outcomes import classify_error
from bridge.records import KafkaRecord
from gateway.config import KafkaConfig
from gateway.errors import KafkaAuthError, KafkaError, KafkaUnavailableError

__all__ = [
    "KafkaProducerHandle",
    "PreparedSend",
    "SendOutcome",
    "acked_prefix",
    "diagnose_connection",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """Per-record result of one batch: ``acked[i]`` is True when record ``i`` was acked."""

    acked: list[bool]
    error: KafkaError | None
    """The first failure, if any."""
    stuck: bool
    """True when the batch missed its deadline: the producer must be rebuilt."""
    errors: list[BaseException | None] = field(default_factory=list)
    """Per record: the aiokafka error it failed with (None: acked, or not attempted)."""


@dataclass(slots=True)
class PreparedSend:
    """A batch encoded into Kafka record batches, ready for :meth:`KafkaProducerHandle.send`.

    Encoding is most of a send's CPU; preparing the next batch while the previous one waits
    for its acks overlaps the two (the send worker does)."""

    records: Sequence[KafkaRecord]
    batches: list[tuple[PartitionRun, BatchBuilder, list[int]]]
    """Per record batch: its partition run, the closed builder, the record indices in it."""
    early: dict[int, BaseException]
    """Records that failed before sending (too large for an empty record batch)."""
    generation: int
    """The producer it was encoded for (a rebuilt producer encodes again)."""


def acked_prefix(outcome: SendOutcome | None) -> int:
    """How many records from the start of a send were acked without a gap: an outbox deletes
    only those, so records of one key keep their order on Kafka (None: nothing was sent)."""
    prefix = 0
    for ok in [] if outcome is None else outcome.acked:
        if not ok:
            break
        prefix += 1
    return prefix


class KafkaProducerHandle:
    """Owns at most one live aiokafka producer and rebuilds it on demand."""

    def __init__(self, config: KafkaConfig, *, transactional_id: str | None = None) -> None:
        self._config = config
        self._transactional_id = transactional_id
        self._producer: AIOKafkaProducer | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._chooser = PartitionChooser()
        self.rebuilds = 0
        self.generation = 0
        """Incremented for every producer started (exactly-once recovery runs per producer)."""

    @property
    def transactional(self) -> bool:
        return self._transactional_id is not None

    @property
    def connected(self) -> bool:
        return self._producer is not None

    async def ensure_started(self) -> None:
        """Start a producer if there is none; raise a translated error if Kafka refuses."""
        if self._producer is not None:
            return
        security = client_security(self._config)
        cfg = self._config
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers,
            # aiokafka's 100 ms default retries metadata ten times a second during outages.
            retry_backoff_ms=500,
            client_id=cfg.client_id,
            **security.kwargs(),
            acks="all",
            enable_idempotence=True,
            linger_ms=cfg.linger_ms,
            max_batch_size=min(cfg.max_batch_bytes, cfg.max_request_bytes),
            max_request_size=cfg.max_request_bytes,
            compression_type=None if cfg.compression == "none" else cfg.compression,
            request_timeout_ms=int(cfg.request_timeout_s * 1000),
            transactional_id=self._transactional_id,
            transaction_timeout_ms=int(cfg.transaction_timeout_s * 1000),
        )
        try:
            async with asyncio.timeout(cfg.request_timeout_s + 5):
                await producer.start()
                if self._transactional_id is not None:
                    # An empty transaction completes locally once the producer id is known.
                    # Getting the id fences any older producer with our transactional id and
                    # makes the coordinator finish (commit or abort) its open transaction, so
                    # after this the progress topic tells the truth about the last batch.
                    await producer.begin_transaction()
                    await producer.commit_transaction()
        except (AioKafkaError, OSError, TimeoutError) as exc:
            self._retire(producer)
            reason = await diagnose_connection(cfg, security.ssl_context)
            if reason is None:
                refused = await diagnose_sasl(cfg, security)
                if refused is not None:
                    raise KafkaAuthError(f"cannot start Kafka producer: {refused}") from exc
            raise KafkaUnavailableError(f"cannot start Kafka producer: {reason or exc!r}") from exc
        self._producer = producer
        self.generation += 1

    async def topic_state(self, topic: str) -> str:
        """``"ok"``, ``"missing"`` or ``"unauthorized"``, from metadata, within a deadline.

        aiokafka's ``send()`` waits ``request_timeout`` for an unknown topic on every record;
        asking once per batch and topic keeps a missing topic from stalling everything.
        """
        await self.ensure_started()
        producer = self._producer
        assert producer is not None
        client = producer.client
        if client.cluster.partitions_for_topic(topic):
            return "ok"
        client.add_topic(topic)
        try:
            async with asyncio.timeout(self._config.request_timeout_s):
                await client.force_metadata_update()
        except (AioKafkaError, OSError, TimeoutError) as exc:
            raise KafkaUnavailableError(f"Kafka metadata request failed: {exc!r}") from exc
        if client.cluster.partitions_for_topic(topic):
            return "ok"
        if topic in client.cluster.unauthorized_topics:
            return "unauthorized"
        return "missing"

    async def prepare(
        self, records: Sequence[KafkaRecord], *, yielding: bool = False
    ) -> PreparedSend:
        """Choose partitions and encode ``records`` into closed record batches, within
        ``send_deadline_s`` (the metadata of a topic may have to be fetched).

        ``yielding``: let the event loop run between partitions (the send worker stages the
        next batch while the one before waits for its acks). Not in the gateway: there every
        turn of the loop also runs ingest, and a batch in five or six pieces went out later
        (one batch in flight: the drain was ~15 % slower)."""
        await self.ensure_started()
        producer = self._producer
        assert producer is not None
        if self._transactional_id is not None:
            raise RuntimeError("a transactional producer sends with send_transaction()")
        early: dict[int, BaseException] = {}
        batches: list[tuple[PartitionRun, BatchBuilder, list[int]]] = []
        try:
            async with asyncio.timeout(self._config.send_deadline_s):
                partitions_of: dict[str, Collection[int]] = {}
                for topic in {record.topic for record in records}:
                    partitions_of[topic] = await producer.partitions_for(topic)
        except TimeoutError:
            self.discard("fetching metadata for a batch missed its deadline")
            raise KafkaUnavailableError("Kafka metadata not available in time") from None
        for run in plan_partition_runs(records, partitions_of, self._chooser):
            batches.extend(_encode_run(producer, run, records, early))
            if yielding:
                await asyncio.sleep(0)
        return PreparedSend(records, batches, early, self.generation)

    async def send(self, records: Sequence[KafkaRecord]) -> SendOutcome:
        """Send a batch and wait for every ack, within ``send_deadline_s``."""
        return await self.send_prepared(await self.prepare(records))

    async def send_prepared(self, prepared: PreparedSend) -> SendOutcome:
        """:meth:`send` for a batch encoded by :meth:`prepare` (encoded again if the
        producer it was encoded for is gone)."""
        if prepared.generation != self.generation or self._producer is None:
            prepared = await self.prepare(prepared.records)
        producer = self._producer
        assert producer is not None
        deadline = self._config.send_deadline_s
        total = len(prepared.records)
        futures: list[asyncio.Future[object] | None] = [None] * total
        early = dict(prepared.early)
        try:
            async with asyncio.timeout(deadline):
                await self._send_batches(producer, prepared, futures, early)
        except TimeoutError:
            self.discard("enqueueing a batch missed its deadline")
            return self._outcome(futures, total, stuck=True, early=early)
        live = [f for f in futures if f is not None]
        if live:
            _, pending = await asyncio.wait(live, timeout=deadline)
            if pending:
                self.discard(f"{len(pending)} of {total} records not acked in {deadline}s")
                return self._outcome(futures, total, stuck=True, early=early)
            failed = next((f.exception() for f in live if f.exception() is not None), None)
            if failed is not None:
                # A batch the broker refused leaves the idempotent producer's sequence numbers
                # ahead of the broker's: every later batch of that partition then fails with
                # OutOfOrderSequenceNumber until a restart (aiokafka #1017). A fresh producer
                # (new producer id) starts clean; rows are resent only if not acked.
                self.discard(f"a batch failed at the broker ({failed!r})")
        return self._outcome(futures, total, stuck=False, early=early)

    @staticmethod
    async def _send_batches(
        producer: AIOKafkaProducer,
        prepared: PreparedSend,
        futures: list[asyncio.Future[object] | None],
        early: dict[int, BaseException],
    ) -> None:
        """Hand the record batches to aiokafka (``send_batch``); a record's future is its
        batch's. Stops (in order) at an enqueue failure that is neither a poison record nor
        a size problem: every later batch of that partition run and after waits."""
        for run, builder, members in prepared.batches:
            try:
                future = await producer.send_batch(builder, run.topic, partition=run.partition)
            except AioKafkaError as exc:
                for index in members:
                    early[index] = exc
                verdict = classify_error(exc)
                if verdict.dead_reason is None and not verdict.size_suspect:
                    return
                continue
            for index in members:
                futures[index] = future

    async def send_transaction(
        self, records: Sequence[KafkaRecord], marker: KafkaRecord
    ) -> SendOutcome:
        """Send ``records`` and ``marker`` (the progress record) in one transaction.

        All or nothing: ``acked`` is all True only when the commit returned. Any failure
        aborts the transaction; a missed deadline or a failed abort discards the producer
        (a stuck transaction, aiokafka #1101/#1145), and the next one fences it.
        """
        await self.ensure_started()
        producer = self._producer
        assert producer is not None
        deadline = self._config.send_deadline_s
        futures: list[asyncio.Future[object] | None] = []
        early: dict[int, BaseException] = {}
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(deadline):
                await producer.begin_transaction()
                try:
                    for index, record in enumerate(records):
                        try:
                            futures.append(
                                await producer.send(
                                    record.topic,
                                    record.value,
                                    key=record.key,
                                    headers=record.headers,
                                )
                            )
                        except AioKafkaError as exc:
                            futures.append(None)
                            early[index] = exc
                            raise
                    marker_future = await producer.send(
                        marker.topic, marker.value, key=marker.key, headers=marker.headers
                    )
                    # Commit only once every record is acked. aiokafka lets a commit through
                    # although a record of the transaction failed at the broker when the
                    # failure lands after the commit started (seen with MessageSizeTooLarge):
                    # the rest would be committed, the progress record would name the lost
                    # row, and recovery would delete it. Waiting first closes that window.
                    outstanding = [f for f in futures if f is not None] + [marker_future]
                    await asyncio.wait(outstanding)
                    refused = next(
                        (f.exception() for f in outstanding if not f.cancelled() and f.exception()),
                        None,
                    )
                    if refused is not None:
                        raise refused
                    await producer.commit_transaction()
                except AioKafkaError as exc:
                    failure = exc
                    await producer.abort_transaction()
        except TimeoutError:
            self.discard(f"a transaction did not complete within {deadline}s")
            return self._outcome(futures, len(records), stuck=True, early=early, all_or_none=True)
        except AioKafkaError as exc:
            self.discard(f"aborting a failed transaction failed: {exc!r}")
            return self._outcome(
                futures,
                len(records),
                stuck=True,
                early=early,
                first=failure or exc,
                all_or_none=True,
            )
        if failure is not None:
            # Let the aborted records' futures settle so each one's own error is known.
            live = [f for f in futures if f is not None and not f.done()]
            if live:
                await asyncio.wait(live, timeout=1.0)
            # As for the idempotent producer (aiokafka #1017): do not trust sequence state
            # after a refused batch. The next producer fences this one and recovery runs.
            self.discard(f"a transaction failed ({failure!r})")
            return self._outcome(
                futures, len(records), stuck=False, early=early, first=failure, all_or_none=True
            )
        return SendOutcome(
            acked=[True] * len(records), error=None, stuck=False, errors=[None] * len(records)
        )

    def _outcome(
        self,
        futures: Sequence[asyncio.Future[object] | None],
        total: int,
        *,
        stuck: bool,
        early: dict[int, BaseException],
        first: BaseException | None = None,
        all_or_none: bool = False,
    ) -> SendOutcome:
        acked = [False] * total
        errors: list[BaseException | None] = [None] * total
        for index, exc in early.items():
            errors[index] = exc
            first = first or exc
        for index, future in enumerate(futures):
            if future is None:
                continue
            if not future.done():
                future.cancel()
                continue
            if future.cancelled():
                continue
            failed = future.exception()
            if failed is None:
                acked[index] = not all_or_none
            else:
                errors[index] = failed
                first = first or failed
        error: KafkaError | None = None
        if first is not None:
            error = KafkaUnavailableError(f"Kafka send failed: {first!r}")
            error.__cause__ = first
        elif stuck:
            error = KafkaUnavailableError("Kafka did not acknowledge in time (producer rebuilt)")
        return SendOutcome(acked=acked, error=error, stuck=stuck, errors=errors)

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


def _encode_run(
    producer: AIOKafkaProducer,
    run: PartitionRun,
    records: Sequence[KafkaRecord],
    early: dict[int, BaseException],
) -> list[tuple[PartitionRun, BatchBuilder, list[int]]]:
    """One partition's records as closed record batches (a record that does not fit an
    empty batch goes to ``early``)."""
    batches: list[tuple[PartitionRun, BatchBuilder, list[int]]] = []
    builder: BatchBuilder = producer.create_batch()
    members: list[int] = []
    # Keywords spelled out, not a dict of them passed with **: that dict cost 0.8 of the
    # 2.0 µs per record this loop took (tens of thousands of records a second in a drain).
    for index in run.indices:
        record = records[index]
        key, value, headers = record.key, record.value, record.headers
        if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
            if members:  # full: start the next
                batches.append((run, builder, members))
                builder, members = producer.create_batch(), []
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                early[index] = MessageSizeTooLargeError(
                    f"a record of {len(record.value)} bytes does not fit an empty batch"
                )
                continue
        members.append(index)
    if members:
        batches.append((run, builder, members))
    for _, closing, _ in batches:
        # Closed, the batch goes out at once: aiokafka lingers only on open builders
        # (MessageBatch.remaining_linger), and every batch here is complete. An open one
        # waited kafka.linger_ms per send (5 ms of every forward round).
        closing.close()
    return batches


async def diagnose_connection(config: KafkaConfig, context: ssl.SSLContext | None) -> str | None:
    """Open one TLS connection to the first bootstrap server to say *why* Kafka is unreachable.

    aiokafka reports "Unable to bootstrap"; an operator needs "certificate verify failed" or
    "connection refused". Returns None when the handshake works (the problem is elsewhere).
    """
    host, _, port = config.bootstrap_servers[0].rpartition(":")
    writer = None
    try:
        async with asyncio.timeout(5):
            _, writer = await asyncio.open_connection(
                host.strip("[]"),
                int(port),
                ssl=context,
                server_hostname=host.strip("[]") if context is not None else None,
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
