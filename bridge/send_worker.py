"""A second process that builds and sends the forwarder's batches while a backlog drains.

One Python process has one GIL. Draining a backlog with live traffic flowing, the gateway's
event loop spent ~9.5 µs of GIL per row and ~260 µs per live message, so one process tops
out near 78k rows/s however fast Kafka is, with the second core mostly idle
(docs/benchmarks.md, "Drain with live traffic: the GIL budget"). Most of a row's cost is
building its Kafka record, choosing its partition and encoding the produce request. This
module moves that work into child processes (``python -m bridge.send_worker_child``,
``kafka.send_workers`` of them), each with its own interpreter and producer. The gateway
keeps the buffer's bookkeeping: it leases the rows, splits each batch between the children
by device (a device's rows of a batch all go to one child, in order), and deletes the rows
the children report acked. With one child it leases *spans* instead (class, ids after,
count: :meth:`edge.buffer.Buffer.lease_spans`) and the child reads the rows from the buffer
file, so the gateway spends nothing per row on them but the delete.

What stays the same:
- A child sends one part at a time: the next only once every record of the one before is
  acked. The forwarder may queue a second batch with the children (so it goes the moment
  the first is acked), but a child that failed or declined a part declines the later parts
  of the same epoch unsent, and the forwarder leases afresh from the oldest row once all
  answers are in. So nothing after a failed row is sent before it, as in
  :mod:`bridge.forwarder`. Children are staged the next batch while they wait for acks:
  they build and encode it then.
- Only rows the child reports acked (and :func:`bridge.outcomes.releasable`) are deleted.
  A child that dies mid-batch loses nothing: the rows are still in the buffer and go again.
- Anything unusual goes back to the gateway's own path, which knows how to handle it: a
  child *declines* a part with a record too large or a missing or forbidden topic, and the
  next batch goes in-process (dead letter, hold). After a send error the gateway sends
  in-process (per-record verdicts, poison records, the breaker) for at least 5 s and until
  a batch goes out whole.

Children are used only in at-least-once mode and only with a backlog (the buffer holds more
than a lease); they start on the first backlog and exit by themselves after
:data:`IDLE_EXIT_S` without work. Frames on their stdin and stdout are a 4-byte length and a
pickle (our own child, our own pipe). Measured: docs/benchmarks.md, "Drain from a send
worker process".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.records import RecordBuilder, record_row
from edge.buffer import LeaseSpan, StoredMessage
from gateway.config import KafkaConfig

__all__ = [
    "CHILD_MODULE",
    "IDLE_EXIT_S",
    "SendWorker",
    "SendWorkerStats",
    "Staged",
    "WorkerSent",
    "read_frame",
    "write_frame",
]

log = logging.getLogger(__name__)

CHILD_MODULE = "bridge.send_worker_child"
IDLE_EXIT_S = 30.0
"""The child exits after this long without a batch (its ~75 MB come back once a drain ends)."""
_RESTART_AFTER_S = 5.0
"""After the child failed to start or died, the gateway sends in-process this long first."""
_START_DEADLINE_S = 30.0
_LENGTH = struct.Struct(">I")


def write_frame(writer: asyncio.StreamWriter | Any, message: object) -> None:
    """Queue one frame (``writer``: anything with ``write(bytes)``)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(data)) + data)


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame; ``asyncio.IncompleteReadError`` at the end of the stream."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


@dataclass(frozen=True, slots=True)
class WorkerSent:
    """The children's answer for a batch they sent (some of it, at least)."""

    released: list[int]
    """Indices into the batch of the rows that may be deleted (acked, and in order)."""
    error: str | None
    """The first send failure, if any (the gateway then sends in-process for a while)."""
    stuck: bool
    """A part missed its deadline; that child rebuilt its producer."""
    declined: bool = False
    """A part came back unsent (its rows stay leased-then-free: sent in-process next)."""
    released_ids: dict[str, tuple[list[int], int]] | None = None
    """A batch of spans: per class, the row ids that may be deleted and their payload
    bytes (the gateway never read those rows)."""


@dataclass(frozen=True, slots=True)
class Staged:
    """A batch handed to the children ahead of its send (see :meth:`SendWorker.stage`)."""

    generation: int
    """The pool it was staged in (a child restarted since: stage again)."""
    keys: list[int]
    """Per child, the key of its part (0: no rows for that child)."""


@dataclass(slots=True)
class SendWorkerStats:
    """``/status`` → ``kafka.send_worker``."""

    children: int = 0
    """Configured (``kafka.send_workers``)."""
    running: int = 0
    pids: list[int] = field(default_factory=list)
    starts: int = 0
    batches: int = 0
    rows: int = 0
    """Rows the children sent and the gateway released."""
    declined: int = 0
    """Parts of batches handed back unsent (a record too large, a missing topic)."""
    failed_batches: int = 0
    span_batches: int = 0
    """Batches handed over as spans: the child read their rows from the buffer file."""
    exits: int = 0
    """Children found gone (idle exits included)."""
    producer_rebuilds: int = 0


_Reply = tuple[Any, ...]


class _Child:
    """One child process and its pipe."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        assert process.stdin is not None
        assert process.stdout is not None
        self.stdin: asyncio.StreamWriter = process.stdin
        self.stdout: asyncio.StreamReader = process.stdout
        self.next_key = 0
        self.rebuilds = 0
        self._pending: deque[asyncio.Future[_Reply]] = deque()
        """Answers owed, in the order the sends were asked (the child answers in order)."""
        self._reader: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and (self._reader is None or not self._reader.done())

    def write(self, message: object) -> None:
        write_frame(self.stdin, message)

    def start_reading(self) -> None:
        self._reader = asyncio.create_task(self._read_answers(), name="send-worker-answers")

    def request(self, key: int, epoch: int) -> asyncio.Future[_Reply]:
        """Ask the child to send staged part ``key``; the future gets its answer."""
        answer: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        if not self.alive:
            answer.set_exception(EOFError("the send worker is gone"))
            return answer
        self._pending.append(answer)
        self.write(("send", key, epoch))
        return answer

    async def _read_answers(self) -> None:
        try:
            while True:
                answer = await read_frame(self.stdout)
                if self._pending:
                    waiting = self._pending.popleft()
                    if not waiting.done():  # (a cancelled wait: the answer is dropped)
                        waiting.set_result(answer)
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            self._fail_pending(exc)
        except asyncio.CancelledError:
            self._fail_pending(EOFError("the send worker was stopped"))
            raise

    def _fail_pending(self, exc: BaseException) -> None:
        while self._pending:
            waiting = self._pending.popleft()
            if not waiting.done():
                waiting.set_exception(EOFError(f"the send worker is gone: {exc!r}"))

    async def stop(self) -> None:
        """Ask it to go (stdin closed), kill it if it lingers, reap it."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self.process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class SendWorker:
    """The gateway's side of the child processes (a pool of ``kafka.send_workers``)."""

    def __init__(
        self,
        kafka: KafkaConfig,
        builder: RecordBuilder,
        *,
        buffer_path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kafka = kafka
        self._builder = builder
        self._buffer_path = buffer_path
        self._clock = clock
        self._size = max(1, kafka.send_workers)
        self._children: list[_Child] = []
        self._starting: asyncio.Task[None] | None = None
        self._generation = 0
        self._builder_stale = False
        self._next_start = 0.0
        self._lost = False
        """A child failed mid-batch: none is spoken to again until all are restarted."""
        self.stats = SendWorkerStats(children=self._size)

    @property
    def ready(self) -> bool:
        """True when a batch can go to the children now."""
        return (
            not self._lost
            and len(self._children) == self._size
            and all(c.alive for c in self._children)
        )

    @property
    def takes_spans(self) -> bool:
        """Whether batches may be handed over as spans (the child reads the rows from the
        buffer file): one child, which knows the file. Several children split a batch by
        device, which needs the rows."""
        return self._size == 1 and self._buffer_path is not None

    def want(self) -> None:
        """A backlog is draining: start the children in the background unless they run (or
        failed moments ago)."""
        if self.ready or self._starting is not None or self._clock() < self._next_start:
            return
        self._starting = asyncio.create_task(self._start(), name="send-worker-start")

    def builder_changed(self) -> None:
        """Routes changed (a reload): the children get the new builder before their next
        batch."""
        self._builder_stale = True

    async def _start(self) -> None:
        try:
            await self._gone()  # children left from before (one died, or idled out) go first
            spawned = await asyncio.gather(
                *(self._spawn() for _ in range(self._size)), return_exceptions=True
            )
            self._children = [c for c in spawned if isinstance(c, _Child)]
            _raise_first_failure(spawned)
            self._lost = False
            self._builder_stale = False
            self._generation += 1
            self.stats.starts += len(self._children)
            self.stats.running = len(self._children)
            self.stats.pids = [c.process.pid for c in self._children]
            log.info(
                "send workers started (pids %s): backlog batches go out from them",
                self.stats.pids,
            )
        except Exception as exc:  # whatever it was, the in-process path stands in
            log.warning("send workers did not start (sending in-process): %r", exc)
            self._next_start = self._clock() + _RESTART_AFTER_S
            await self._gone()
        finally:
            self._starting = None

    async def _spawn(self) -> _Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            CHILD_MODULE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        child = _Child(process)
        try:
            child.write(("init", self._kafka, self._builder, _log_level(), self._buffer_path))
            async with asyncio.timeout(_START_DEADLINE_S):
                await child.stdin.drain()
                reply = await read_frame(child.stdout)
            _expect_ready(reply)
        except BaseException:
            await child.stop()
            raise
        child.start_reading()
        return child

    def _split(self, batch: Sequence[StoredMessage]) -> list[list[int]]:
        """Per child, the indices of its rows (in batch order): by device, so each device's
        rows of a batch go to one child and keep their order."""
        parts: list[list[int]] = [[] for _ in range(self._size)]
        if self._size == 1:
            parts[0] = list(range(len(batch)))
            return parts
        size = self._size
        for index, message in enumerate(batch):
            parts[hash(message.device_id) % size].append(index)
        return parts

    def stage(self, batch: Sequence[StoredMessage]) -> Staged | None:
        """Hand ``batch`` to the children now, so they build and encode it while the batch
        before it waits for Kafka; :meth:`send` it later (a child drops a staged part when
        the next is staged). None: no children."""
        if not self.ready:
            return None
        self._send_builder_if_stale()
        keys: list[int] = []
        for child, indices in zip(self._children, self._split(batch), strict=True):
            if not indices:
                keys.append(0)
                continue
            child.next_key += 1
            child.write(("stage", child.next_key, [record_row(batch[i]) for i in indices]))
            keys.append(child.next_key)
        return Staged(self._generation, keys)

    def stage_spans(self, spans: list[LeaseSpan]) -> Staged | None:
        """:meth:`stage` for spans of the buffer (:attr:`takes_spans`): the child reads the
        rows itself."""
        if not self.ready:
            return None
        self._send_builder_if_stale()
        child = self._children[0]
        child.next_key += 1
        child.write(("stage_spans", child.next_key, spans))
        return Staged(self._generation, [child.next_key])

    def _send_builder_if_stale(self) -> None:
        if self._builder_stale:
            for child in self._children:
                child.write(("builder", self._builder))
            self._builder_stale = False

    def submit_spans(
        self, spans: list[LeaseSpan], staged: Staged | None, epoch: int
    ) -> asyncio.Task[WorkerSent | None] | None:
        """:meth:`submit` for spans; the answer carries the acked ids per class."""
        if staged is None or staged.generation != self._generation:
            staged = self.stage_spans(spans)
        if staged is None or not self.ready:
            return None
        child, key = self._children[0], staged.keys[0]
        active = [(child, key, range(sum(span.rows for span in spans)))]
        answers = [child.request(key, epoch)]
        return asyncio.create_task(self._collect(answers, active), name="send-worker-batch")

    def submit(
        self, batch: Sequence[StoredMessage], staged: Staged | None, epoch: int
    ) -> asyncio.Task[WorkerSent | None] | None:
        """Have the children send ``batch`` (staged earlier, or now) after what they were
        asked before; the task gets their answer (None: they declined all of it, send it
        in-process). None: no children.

        ``epoch``: the forwarder's count of fresh leases. A child that failed or declined a
        part declines every later part of the same epoch unsent, so a batch asked for before
        the forwarder learnt of the failure cannot overtake the rows that failed."""
        if staged is None or staged.generation != self._generation:
            staged = self.stage(batch)
        if staged is None or not self.ready:
            return None
        parts = self._split(batch)
        active = [
            (child, key, indices)
            for child, key, indices in zip(self._children, staged.keys, parts, strict=True)
            if key
        ]
        answers = [child.request(key, epoch) for child, key, _ in active]
        return asyncio.create_task(self._collect(answers, active), name="send-worker-batch")

    async def _collect(
        self,
        answers: list[asyncio.Future[_Reply]],
        active: Sequence[tuple[_Child, int, Sequence[int]]],
    ) -> WorkerSent | None:
        replies: Sequence[_Reply | BaseException]
        try:
            await asyncio.gather(*(child.stdin.drain() for child, _, _ in active))
            # Each child bounds its own wait (kafka.send_deadline_s); this covers a hung one.
            async with asyncio.timeout(self._kafka.send_deadline_s + 30):
                replies = await asyncio.gather(*answers, return_exceptions=True)
        except (OSError, TimeoutError) as exc:
            replies = [exc] * len(active)
        return self._combine(replies, [indices for _, _, indices in active], active)

    def _combine(
        self,
        replies: Sequence[_Reply | BaseException],
        parts: Sequence[Sequence[int]],
        active: Sequence[tuple[_Child, int, Sequence[int]]],
    ) -> WorkerSent | None:
        released: list[int] = []
        released_ids: dict[str, tuple[list[int], int]] | None = None
        error: str | None = None
        stuck = declined = sent = False
        for reply, indices, (child, _, _) in zip(replies, parts, active, strict=True):
            if isinstance(reply, BaseException):
                # Gone (idle exit or a crash) or hung: what it sent unacked is sent again.
                log.warning("send worker unavailable (sending in-process): %r", reply)
                self._children_lost()
                error = error or f"send worker unavailable: {reply!r}"
                continue
            kind = reply[0]
            if kind == "declined":
                self.stats.declined += 1
                log.debug("send worker declined part of a batch: %s", reply[1])
                declined = True
            elif kind == "failed":  # Kafka refused before anything was sent (no producer)
                error = error or reply[1]
            else:
                _, child_released, child_error, child_stuck, child.rebuilds, by_class = reply
                sent = True
                if len(child_released) == len(indices):  # all of it (a drain: 4,000 rows)
                    released.extend(indices)
                else:
                    released.extend(indices[i] for i in child_released)
                if by_class is not None:  # spans: one child, so nothing to merge
                    released_ids = {
                        name: (array("q", packed).tolist(), nbytes)
                        for name, (packed, nbytes) in by_class.items()
                    }
                error = error or child_error
                stuck = stuck or child_stuck
        self.stats.producer_rebuilds = sum(c.rebuilds for c in self._children)
        if not sent and error is None:
            return None  # all declined (or nothing to send): the caller sends in-process
        released.sort()
        self.stats.batches += 1
        self.stats.span_batches += released_ids is not None
        self.stats.rows += len(released)
        if error is not None:
            self.stats.failed_batches += 1
        return WorkerSent(
            released=released,
            error=error,
            stuck=stuck,
            declined=declined,
            released_ids=released_ids,
        )

    def _children_lost(self) -> None:
        """Start them afresh after a pause (the old ones are stopped by the next start)."""
        if self._lost:
            return
        self._next_start = self._clock() + _RESTART_AFTER_S
        self._generation += 1
        self._lost = True
        self.stats.exits += len(self._children)
        self.stats.running = 0
        self.stats.pids = []
        for child in self._children:
            if child.alive:
                child.stdin.close()

    async def _gone(self) -> None:
        """Stop and reap every child."""
        children, self._children = self._children, []
        if not self._lost:  # (counted when they were lost)
            self.stats.exits += len(children)
        self.stats.running = 0
        self.stats.pids = []
        await asyncio.gather(*(child.stop() for child in children))

    async def close(self) -> None:
        """Stop the children (they finish nothing: the rows they had are still in the
        buffer)."""
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await self._gone()


def _raise_first_failure(results: Sequence[object]) -> None:
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed


def _expect_ready(reply: object) -> None:
    if reply != ("ready",):
        raise RuntimeError(f"unexpected first frame from the send worker: {reply!r}")


def _log_level() -> int:
    return logging.getLogger().getEffectiveLevel()
