"""Forward the buffer to Kafka: lease a batch, send it, release only what Kafka acked.

One batch is in flight to Kafka at a time. That keeps per-device order simple to prove: a
batch is resent only before anything after it was sent. To keep the buffer busy while Kafka works,
at-least-once mode *leases ahead*: while a batch waits for its acks, the rows after it are
read and waiting. They are used only if the batch in flight was released whole; after any
failure, dead letter or hold they are thrown away and the next batch is leased from the
oldest row again (nothing of them was sent, so order holds). With a backlog the delete of a
batch's acknowledged rows runs while the batch leased ahead is built and sent; a fresh lease
waits for that delete, so no row is ever leased twice.

Each step decides in pure code (:mod:`bridge.outcomes`) which rows go, which can never go
(dead letters: too large, not authorized, topic missing past its deadline, rejected by
Kafka for good) and which wait; then does the I/O. A circuit breaker (:mod:`bridge.breaker`)
guards every Kafka call: while it is open nothing is sent and the buffer just fills.

With a backlog in at-least-once mode the records are built and sent by child processes
(:mod:`bridge.send_worker`): their own GIL and core, while this process only leases and
deletes. Two batches are with them at once, but a child still *sends* one at a time, the
second only once the first is acked, and after a part fails or is declined it declines the
later parts of the same epoch (fresh lease) unsent. So the rule above holds: nothing after a
failed row is sent before it. Declined rows (they need a verdict) go in-process next, and
after a send error this loop sends in-process until a batch goes out whole.

Exactly-once mode sends each batch in one Kafka transaction together with a progress record
(:mod:`bridge.progress`); after every new producer the last committed progress record is read
back and the rows it names are released instead of resent. Dead letters go to the
dead-letter topic in the same loop (one producer, one transaction at a time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bridge.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from bridge.outcomes import (
    TopicWatch,
    classify_error,
    narrow_to_suspects,
    plan_batch,
    releasable,
)
from bridge.producer import KafkaProducerHandle, SendOutcome
from bridge.progress import Progress, to_ranges
from bridge.records import KafkaRecord, RecordBuilder
from bridge.send_worker import SendWorker, Staged, WorkerSent
from bridge.transactional import read_last_progress
from edge.buffer import Buffer, LeaseSpan, StoredMessage
from gateway.config import KafkaConfig
from gateway.errors import KafkaError, KafkaUnavailableError

__all__ = ["Forwarder", "ForwarderStatus", "releasable"]

log = logging.getLogger(__name__)

_DEAD_LETTER_BATCH = 200
_HOLD_WAIT_S = 0.5
"""Pause when a whole batch waits for missing topics (nothing to send, nothing to wait on)."""
_DLQ_IDLE_CHECK_S = 1.0
_WORKER_PAUSE_S = 5.0
_WORKER_DEPTH = 2
"""Batches with the send workers at once: the next is queued in the child while one is
sent, so it goes the moment the one before is acked."""
"""After the send worker's batch failed, send in-process at least this long."""

CRASH_AFTER_COMMIT_ENV = "TIDEGATE_TEST_CRASH_AFTER_COMMIT"
"""Test fault injection: SIGKILL this process right after the N-th successful batch commit
to Kafka, before its rows are deleted (the window exactly-once recovery exists for)."""

_SELECT_BY_IDS = (
    "SELECT id, device_id, class, topic, qos, payload, ingest_ms, priority, msg_id"
    " FROM uplink WHERE id IN ({marks})"
)
_UNFORWARDED_DEAD = "SELECT id FROM dead_letters WHERE forwarded_ms IS NULL AND id IN ({marks})"


@dataclass(slots=True)
class _Leased:
    """A leased batch, with what was done for it ahead of its turn."""

    rows: list[StoredMessage]
    records: list[KafkaRecord] | None = None
    """Its records, built while the batch before it was in flight (in-process sends)."""
    staged: Staged | None = None
    """Handed to the send worker ahead (it builds and encodes them meanwhile)."""
    spans: list[LeaseSpan] | None = None
    """Leased as spans (``rows`` is empty): the send worker's child reads the rows."""

    @property
    def size(self) -> int:
        return len(self.rows) if self.spans is None else sum(s.rows for s in self.spans)


@dataclass(slots=True)
class ForwarderStatus:
    """What the admin API reports about the cloud side."""

    kafka_connected: bool = False
    last_error: str | None = None
    last_error_at: float | None = None
    forwarded: int = 0
    batches: int = 0
    failed_batches: int = 0
    producer_rebuilds: int = 0
    dead_lettered: int = 0
    dead_letters_forwarded: int = 0
    recovered_rows: int = 0
    """Exactly-once: rows found committed in Kafka at recovery and released, not resent."""
    recoveries: int = 0
    lease_s: float = 0.0
    """Seconds spent leasing rows (cumulative): with ``send_s`` and ``release_s``, where a
    drain's time goes (buffer or Kafka)."""
    send_s: float = 0.0
    """Seconds from handing a batch to the producer until every record's ack (cumulative)."""
    release_s: float = 0.0
    """Seconds spent deleting acknowledged rows (cumulative)."""
    releases_overlapped: int = 0
    """Batches whose rows were deleted while the next batch went to Kafka (a backlog)."""


class Forwarder:
    """The bridge's main loop. Run with :meth:`run` inside the gateway's TaskGroup."""

    def __init__(
        self,
        buffer: Buffer,
        builder: RecordBuilder,
        kafka: KafkaConfig,
        *,
        lease_batch: int,
        gateway_id: str = "tidegate",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._buffer = buffer
        self._builder = builder
        self._kafka = kafka
        self._lease_batch = lease_batch
        self._gateway_id = gateway_id
        self._clock = clock
        self.exactly_once = kafka.delivery == "exactly_once"
        self._producer = KafkaProducerHandle(
            kafka, transactional_id=f"tidegate-{gateway_id}" if self.exactly_once else None
        )
        self.breaker = CircuitBreaker(
            BreakerPolicy(
                failure_threshold=kafka.breaker_failures,
                failure_rate=kafka.breaker_failure_rate,
                open_base_s=kafka.breaker_open_s,
                open_max_s=kafka.retry_backoff_max_s,
                retry_base_s=min(0.2, kafka.retry_backoff_max_s),
            ),
            clock=clock,
        )
        self._topics = TopicWatch()
        self._suspects: set[int] = set()
        self._recovered_generation = 0
        self._batch_seq = 0
        self._next_dlq_check = 0.0
        self._crash_after = int(os.environ.get(CRASH_AFTER_COMMIT_ENV, "0") or 0)
        self.status = ForwarderStatus()
        self._ahead: asyncio.Task[_Leased] | None = None
        self._ahead_usable = False
        """True only after the batch in flight when the lease-ahead started went out whole."""
        self._last_lease = float("-inf")
        self._backlog = False
        """The last lease came back full: more rows are waiting, forward without pause."""
        self._releasing: asyncio.Task[None] | None = None
        """At-least-once with a backlog: deleting the last batch's rows (see the module)."""
        self.send_worker = (
            SendWorker(kafka, builder, buffer_path=_spans_path(buffer), clock=clock)
            if kafka.send_workers and not self.exactly_once
            else None
        )
        self._worker_trusted = True
        """False after the child's send failed: in-process (per-record verdicts) until a
        batch goes out whole, and for at least ``_WORKER_PAUSE_S``."""
        self._worker_paused_until = float("-inf")
        self._worker_flight: deque[tuple[_Leased, asyncio.Task[WorkerSent | None]]]
        self._worker_flight = deque()
        """Batches with the send workers, oldest first (at most ``_WORKER_DEPTH``)."""
        self._epoch = 0
        """Fresh leases so far (the send workers' epochs: see SendWorker.submit)."""
        self._in_process_once = False
        """The send workers declined rows (a record too large, a missing topic): the next
        batch goes in-process, which gives the verdict (dead letter, hold)."""

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Forward forever (until cancelled). Errors are logged and retried by the breaker."""
        try:
            await self._run()
        finally:
            ahead, self._ahead = self._ahead, None
            if ahead is not None:
                ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)
            for _, task in self._worker_flight:  # unreleased: they go again after a restart
                task.cancel()
            self._worker_flight.clear()
            releasing, self._releasing = self._releasing, None
            if releasing is not None:  # a delete in flight finishes (its rows are in Kafka)
                await asyncio.gather(releasing, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except (KafkaError, asyncio.CancelledError):
                raise
            except Exception as exc:
                # A bug or a buffer error must not end forwarding for good (the gateway would
                # keep acknowledging into a buffer nobody drains): log, back off, go on.
                log.exception("forwarder step failed; retrying with backoff")
                self._failed(KafkaError(f"forwarder error: {exc!r}"))
                await asyncio.sleep(max(0.05, min(self.breaker.delay(), 5.0)))

    async def step(self) -> None:
        """One round: lease, decide, send, settle; or wait. Tests may drive it directly."""
        await self._pace()
        started = time.monotonic()
        taken = await self._take_batch()
        batch = taken.size
        self.status.lease_s += time.monotonic() - started
        self._backlog = batch >= self._lease_batch
        dlq_due = self._dead_letters_due()
        # Exactly-once: recover as soon as the gateway starts, not only once rows arrive.
        recovery_due = self.exactly_once and self._recovered_generation == 0
        if not batch and not dlq_due and not recovery_due:
            await self._settle_worker_batches()
            await self._buffer.wait_for_rows(max_wait=_DLQ_IDLE_CHECK_S)
            if self._buffer.stats.rows and self._kafka.forward_linger_ms:
                # Idle until now: give the next commits forward_linger_ms to join this
                # batch. At 1,000 msg/s a commit holds ~1.5 rows; one Kafka batch per commit
                # cost more CPU than the messages themselves (docs/benchmarks.md).
                await asyncio.sleep(self._kafka.forward_linger_ms / 1000)
            return
        if not self.breaker.allow():
            # Open (or backing off): no Kafka call at all. Rows keep buffering.
            await self._settle_worker_batches()
            await asyncio.sleep(max(0.01, min(self.breaker.delay(), 1.0)))
            return
        try:
            await self._producer.ensure_started()
            if self.exactly_once and self._producer.generation != self._recovered_generation:
                # A new producer: settle the last transaction first. The batch leased above
                # may hold rows recovery just released, so it is dropped and leased anew.
                await self._recover()
                self.status.kafka_connected = True
                self.breaker.record_success()
                return
            self.status.kafka_connected = True
            sent = False
            if batch:
                sent = await self._forward(taken)
            if dlq_due:
                sent = await self._forward_dead_letters() or sent
        except KafkaError as exc:
            self._failed(exc)
            return
        finally:
            self.status.producer_rebuilds = self._producer.rebuilds
        if batch and not sent:
            await asyncio.sleep(_HOLD_WAIT_S)

    async def _pace(self) -> None:
        """Without a backlog, lease at most once per ``kafka.forward_linger_ms``, so a trickle
        of rows shares one Kafka batch (and one lease and one release) instead of one round
        per group commit; with a backlog, forward back to back."""
        linger = self._kafka.forward_linger_ms / 1000
        if linger and not self._backlog:
            wait = self._last_lease + linger - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
        self._last_lease = self._clock()

    # ------------------------------------------------------------------- uplink

    async def _take_batch(self) -> _Leased:
        """The rows leased ahead (built or staged) if the previous batch went out whole,
        else a fresh lease (once nothing is with the send workers any more: a fresh lease
        starts from the oldest row, and theirs are not released yet)."""
        ahead, self._ahead = self._ahead, None
        usable, self._ahead_usable = self._ahead_usable, False
        if ahead is not None:
            try:
                leased = await ahead
            except Exception:  # a read failed: lease normally (and see that error there)
                log.debug("lease-ahead failed", exc_info=True)
            else:
                if usable:
                    return leased
                # (A batch staged in the send worker is dropped by the child when the next
                # one is staged.)
        await self._settle_worker_batches()
        self._epoch += 1
        await self._released()
        return _Leased(await self._buffer.lease(self._lease_batch))

    def _lease_ahead(self, batch: Sequence[StoredMessage] | Sequence[LeaseSpan]) -> None:
        # Each class's last row is its highest: a lease is in id order inside a class
        # (Buffer.lease). A dict keeps the last value per key, ~20x cheaper than max() per row.
        floors = {
            leased.class_name: leased.last_id if isinstance(leased, LeaseSpan) else leased.row_id
            for leased in batch
        }
        self._ahead = asyncio.create_task(self._prepare(floors), name="forwarder-lease-ahead")

    async def _prepare(self, floors: dict[str, int]) -> _Leased:
        """Lease the rows after the batch in flight and build their records, while that
        batch waits for Kafka (building is a third of a drain's work on the event loop).
        With the send worker, stage them there instead: the child builds and encodes them
        while it waits for the acks of the batch before. With one child they are leased as
        spans, and the child reads the rows itself (bridge/send_worker.py)."""
        worker = self.send_worker
        if worker is not None and self._worker_wanted():
            size = max(self._lease_batch, self._kafka.send_worker_batch)  # larger batches
            if worker.takes_spans and self._buffer.spans_possible:
                spans = await self._buffer.lease_spans(size, after=floors)
                if spans:
                    return _Leased([], staged=worker.stage_spans(spans), spans=spans)
                return _Leased([])
            rows = await self._buffer.lease(size, after=floors)
            return _Leased(rows, staged=worker.stage(rows) if rows else None)
        rows = await self._buffer.lease(self._lease_batch, after=floors)
        return _Leased(rows, self._builder.build_all(rows))

    def _worker_wanted(self) -> bool:
        """Whether the next batch goes to the send workers (starting them if need be): a
        backlog (the buffer holds more than a lease), no suspect rows, no decline to settle
        in-process, no send error since the last whole in-process batch.

        Not "a full lease": with a backlog in one class and live traffic in another, the
        lease after a batch in flight is often short of full (the live class has few rows
        past the floor), and every other batch went in-process."""
        worker = self.send_worker
        if worker is None or self._buffer.stats.rows < self._lease_batch:
            return False
        worker.want()
        return (
            worker.ready
            and self._worker_trusted
            and not self._suspects
            and not self._in_process_once
            and self._clock() >= self._worker_paused_until
        )

    def _distrust_worker(self) -> None:
        self._worker_trusted = False
        self._worker_paused_until = self._clock() + _WORKER_PAUSE_S

    async def _forward_by_worker(self, taken: _Leased) -> bool | None:
        """Hand a backlog batch to the send workers; None when they are gone (the caller
        sends it in-process). Up to ``_WORKER_DEPTH`` batches are with them at once: the
        children send them one after another, so the next one is ready the moment the one
        before is acked, and a child that failed or declined a part declines the later
        parts of the same epoch unsent (see :meth:`SendWorker.submit`)."""
        worker = self.send_worker
        assert worker is not None
        if taken.spans is not None:
            task = worker.submit_spans(taken.spans, taken.staged, self._epoch)
        else:
            task = worker.submit(taken.rows, taken.staged, self._epoch)
        if task is None:
            return None
        self._worker_flight.append((taken, task))
        if self._ahead is None:  # the next rows are read while the children send these
            self._lease_ahead(taken.spans if taken.spans is not None else taken.rows)
        self._ahead_usable = True  # unless a batch still out turns out not whole
        while len(self._worker_flight) >= _WORKER_DEPTH:
            await self._settle_oldest()
        return True

    async def _settle_oldest(self) -> bool:
        """Wait for the oldest batch with the send workers; release what they sent. True
        when it went out whole."""
        taken, task = self._worker_flight.popleft()
        started = time.monotonic()
        try:
            sent = await task
        finally:
            self.status.send_s += time.monotonic() - started
        if sent is None:  # all declined (a verdict is needed): in-process from the oldest row
            self._in_process_once = True
            self._ahead_usable = False
            return False
        whole = sent.error is None and not sent.declined and len(sent.released) == taken.size
        await self._released()
        if whole and (self._ahead is not None or self._worker_flight):
            self._releasing = asyncio.create_task(
                self._release_worker_batch(taken, sent), name="forwarder-release"
            )
            self.status.releases_overlapped += 1
        else:
            await self._release_worker_batch(taken, sent)
        self.status.batches += 1
        if sent.declined:  # the declined rows go in-process next (they need a verdict)
            self._in_process_once = True
        if sent.error is not None:
            self.status.failed_batches += 1
            self._distrust_worker()
            self._failed(KafkaUnavailableError(sent.error), stuck=sent.stuck)
        else:
            self.breaker.record_success()
        if not whole:  # what was leased after it must not overtake its rows
            self._ahead_usable = False
        return whole

    async def _settle_worker_batches(self) -> bool:
        """Wait for every batch still with the send workers. True when all went out whole
        (else the rows leased after them must be leased again, in order)."""
        whole = True
        while self._worker_flight:
            whole = await self._settle_oldest() and whole
        return whole

    async def _forward(self, taken: _Leased) -> bool:
        """Send one batch; False when nothing could be sent (all held back)."""
        if taken.size and self._worker_wanted():
            by_worker = await self._forward_by_worker(taken)
            if by_worker is not None:
                return by_worker
        if not await self._settle_worker_batches():
            # An earlier batch did not go out whole: these rows were leased after it and
            # must not overtake it. The next round leases afresh from the oldest row.
            return True
        leased, built = taken.rows, taken.records
        if taken.spans is not None:  # the child is gone after all: read them here
            leased, built = await self._buffer.read_spans(taken.spans), None
        self._in_process_once = False
        batch = narrow_to_suspects(leased, self._suspects) if self._suspects else leased
        # Narrowing keeps a prefix of the batch, so a prefix of its records still matches.
        records = built[: len(batch)] if built else self._builder.build_all(batch)
        missing, unauthorized = await self._check_topics({r.topic for r in records})
        plan = plan_batch(
            records,
            max_record_bytes=self._kafka.max_request_bytes,
            missing_for=missing,
            missing_deadline_s=self._kafka.missing_topic_dead_letter_s,
            unauthorized=unauthorized,
        )
        dead: dict[str, list[StoredMessage]] = defaultdict(list)
        for index, reason in plan.dead:
            dead[reason].append(batch[index])
        to_send = [batch[i] for i in plan.send]
        send_records = [records[i] for i in plan.send]
        outcome: SendOutcome | None = None
        verdicts = 0
        whole = len(to_send) == len(leased) and not dead and not plan.held
        # Lease ahead only with a backlog (a full batch): otherwise the next lease would
        # mostly come back empty, one more trip to the SQLite thread per batch for nothing.
        backlog = len(leased) >= self._lease_batch
        if to_send and whole and backlog and not self.exactly_once and self._ahead is None:
            self._lease_ahead(to_send)
        if to_send:
            started = time.monotonic()
            outcome = await self._send(to_send, send_records)
            self.status.send_s += time.monotonic() - started
            verdicts = self._judge(to_send, outcome, dead)
        dead_ids = {m.row_id for ms in dead.values() for m in ms}
        for reason, messages in dead.items():
            await self._buffer.dead_letter(messages, reason)
            self.status.dead_lettered += len(messages)
            self._suspects.difference_update(m.row_id for m in messages)
        if dead:
            self._next_dlq_check = 0.0
        if outcome is None:
            if plan.held:
                self.breaker.record_success()  # Kafka answered; the topics are missing
            return bool(dead)
        done = releasable(to_send, outcome.acked, [r.topic for r in send_records], dead_ids)
        if self._crash_after and done and self.status.batches + 1 >= self._crash_after:
            log.error("%s: killing the process after a commit", CRASH_AFTER_COMMIT_ENV)
            os.kill(os.getpid(), signal.SIGKILL)
        # The next batch is leased ahead (rows after these): delete these meanwhile.
        overlap = self._ahead is not None and whole and len(done) == len(to_send)
        await self._released()
        if overlap and outcome.error is None:
            self._releasing = asyncio.create_task(self._release(done), name="forwarder-release")
            self.status.releases_overlapped += 1
        else:
            await self._release(done)
        if self.exactly_once and outcome.error is None:
            self._batch_seq += 1
        self.status.batches += 1
        self._suspects.difference_update(m.row_id for m in done)
        # A batch whose failures are all explained by poison records is not a Kafka failure:
        # Kafka answered, the poison is out of the way, the rest goes again at once.
        if outcome.stuck or (outcome.error is not None and verdicts == 0):
            self.status.failed_batches += 1
            assert outcome.error is not None
            self._failed(outcome.error, stuck=outcome.stuck)
        else:
            self.breaker.record_success()
        # The rows leased ahead follow this batch: usable only if all of it is gone.
        went_whole = whole and outcome.error is None and len(done) == len(to_send)
        self._ahead_usable = went_whole
        if went_whole:
            self._worker_trusted = True
        return True

    async def _release_worker_batch(self, taken: _Leased, sent: WorkerSent) -> None:
        if sent.released_ids is None:
            await self._release([taken.rows[i] for i in sent.released])
            return
        started = time.monotonic()
        await self._buffer.release_ids(sent.released_ids)
        self.status.release_s += time.monotonic() - started
        self.status.forwarded += len(sent.released)

    async def _release(self, done: list[StoredMessage]) -> None:
        started = time.monotonic()
        await self._buffer.release(done)
        self.status.release_s += time.monotonic() - started
        self.status.forwarded += len(done)

    async def _released(self) -> None:
        """Wait for the delete started after the previous batch (shielded: a cancelled
        forwarder still lets it finish and count the rows it removed)."""
        releasing = self._releasing
        if releasing is None:
            return
        try:
            await asyncio.shield(releasing)
        finally:
            if releasing.done():  # cancelled while waiting: run() waits for it at the end
                self._releasing = None

    async def _send(self, batch: list[StoredMessage], records: list[KafkaRecord]) -> SendOutcome:
        if not self.exactly_once:
            return await self._producer.send(records)
        marker = self._progress_record(rows=[m.row_id for m in batch], dead=[])
        return await self._producer.send_transaction(records, marker)

    def _judge(
        self,
        batch: Sequence[StoredMessage],
        outcome: SendOutcome,
        dead: dict[str, list[StoredMessage]],
    ) -> int:
        """Per-record verdicts: dead letters, size suspects; the rest is retried. Returns
        how many records got a verdict."""
        verdicts = 0
        for message, err in zip(batch, outcome.errors, strict=True):
            if err is None:
                continue
            verdict = classify_error(err)
            if verdict.dead_reason is not None:
                dead[verdict.dead_reason].append(message)
            elif verdict.size_suspect:
                if len(batch) == 1 or message.row_id in self._suspects:
                    dead[f"Kafka rejected the record as too large ({type(err).__name__})"].append(
                        message
                    )
                else:
                    self._suspects.add(message.row_id)
            else:
                continue
            verdicts += 1
        return verdicts

    async def _check_topics(self, topics: set[str]) -> tuple[dict[str, float], set[str]]:
        missing: dict[str, float] = {}
        unauthorized: set[str] = set()
        now = self._clock()
        for topic in sorted(topics):
            state = await self._producer.topic_state(topic)
            waited = self._topics.seen(topic, state != "missing", now)
            if state == "missing":
                if waited == 0.0:
                    log.error("Kafka topic %r does not exist; holding its messages", topic)
                missing[topic] = waited
            elif state == "unauthorized":
                unauthorized.add(topic)
        return missing, unauthorized

    # ------------------------------------------------------------- dead letters

    def _dead_letters_due(self) -> bool:
        if self._buffer.stats.dead_letters <= 0:
            return False
        return self._clock() >= self._next_dlq_check

    async def _forward_dead_letters(self) -> bool:
        """Send a batch of dead letters to the dead-letter topic; True if any went."""
        letters = await self._buffer.lease_dead_letters(_DEAD_LETTER_BATCH)
        if not letters:
            self._next_dlq_check = self._clock() + _DLQ_IDLE_CHECK_S
            return False
        max_bytes = self._kafka.max_request_bytes
        records = [self._builder.build_dead_letter(d, max_bytes) for d in letters]
        if self.exactly_once:
            marker = self._progress_record(rows=[], dead=[d.row_id for d in letters])
            outcome = await self._producer.send_transaction(records, marker)
        else:
            outcome = await self._producer.send(records)
        acked = [d.row_id for d, ok in zip(letters, outcome.acked, strict=True) if ok]
        await self._buffer.dead_letters_forwarded(acked)
        self.status.dead_letters_forwarded += len(acked)
        if outcome.error is not None:
            self._failed(outcome.error, stuck=outcome.stuck)
        else:
            self.breaker.record_success()
            if len(letters) < _DEAD_LETTER_BATCH:
                self._next_dlq_check = self._clock() + _DLQ_IDLE_CHECK_S
        return bool(acked)

    # ------------------------------------------------------------ exactly-once

    def _progress_record(self, *, rows: list[int], dead: list[int]) -> KafkaRecord:
        progress = Progress(
            gateway_id=self._gateway_id,
            batch_seq=self._batch_seq,
            ranges=tuple(to_ranges(rows)),
            committed_ms=time.time_ns() // 1_000_000,
            dead_ranges=tuple(to_ranges(dead)),
        )
        return KafkaRecord(
            topic=self._kafka.progress_topic,
            key=self._gateway_id.encode(),
            value=progress.encode(),
            headers=[("tg-gateway-id", self._gateway_id.encode())],
        )

    async def _recover(self) -> None:
        """Release what the last committed transaction delivered (still in the buffer after a
        crash between commit and delete), so it is not sent twice."""
        generation = self._producer.generation
        progress = await read_last_progress(self._kafka, self._gateway_id)
        self.status.recoveries += 1
        if progress is not None:
            self._batch_seq = progress.batch_seq + 1
            rows = await self._rows_by_id(progress.row_ids)
            await self._buffer.release(rows)
            dead = await self._unforwarded_dead_letters(progress.dead_letter_ids)
            await self._buffer.dead_letters_forwarded(dead)
            self.status.recovered_rows += len(rows)
            if rows or dead:
                log.warning(
                    "exactly-once recovery: batch %d was committed to Kafka; released %d rows"
                    " and %d dead letters instead of resending them",
                    progress.batch_seq,
                    len(rows),
                    len(dead),
                )
        self._recovered_generation = generation

    async def _rows_by_id(self, ids: list[int]) -> list[StoredMessage]:
        out: list[StoredMessage] = []
        async with self._buffer.read() as db:
            for chunk in _chunks(ids, 500):
                cursor = await db.execute(
                    _SELECT_BY_IDS.format(marks=",".join("?" * len(chunk))), chunk
                )
                out.extend(StoredMessage(*r) for r in await cursor.fetchall())
        return out

    async def _unforwarded_dead_letters(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        async with self._buffer.read() as db:
            for chunk in _chunks(ids, 500):
                cursor = await db.execute(
                    _UNFORWARDED_DEAD.format(marks=",".join("?" * len(chunk))), chunk
                )
                out.extend(int(r[0]) for r in await cursor.fetchall())
        return out

    # ------------------------------------------------------------------ errors

    def _failed(self, exc: KafkaError, *, stuck: bool = False) -> None:
        was_open = self.breaker.state is BreakerState.OPEN
        self.breaker.record_failure()
        if self.breaker.state is BreakerState.OPEN and not was_open:
            # An idle aiokafka producer keeps reconnecting in the background (dozens of TLS
            # handshakes a second while Kafka refuses): while the circuit is open, have none.
            self._producer.discard("circuit open")
        message = str(exc)
        if message != self.status.last_error:
            log.error("Kafka: %s (buffering continues, retrying with backoff)", message)
        self.status.kafka_connected = self._producer.connected and not stuck
        self.status.last_error = message
        self.status.last_error_at = time.time()

    def update_routes(self, class_topics: Mapping[str, str]) -> None:
        """New Kafka topics for these classes (a reload): applies to the next batch built."""
        self._builder.update_topics(class_topics)
        if self.send_worker is not None:
            self.send_worker.builder_changed()

    async def close(self, deadline: float) -> None:
        """Stop the producer within ``deadline`` (aiokafka's stop can hang while Kafka is down)."""
        if self.send_worker is not None:
            await self.send_worker.close()
        await self._producer.close(deadline)
        self.status.kafka_connected = False


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _spans_path(buffer: Buffer) -> str | None:
    """The buffer file the send worker's child may read leased spans from."""
    return str(buffer.path) if buffer.spans_possible else None
