"""A second process that builds and sends the forwarder's batches while a backlog drains.

One Python process has one GIL. Draining a backlog with live traffic flowing, the gateway's
event loop spent ~9.5 µs of GIL per row and ~260 µs per live message, so one process tops
out near 78k rows/s however fast Kafka is, with the second core mostly idle
(docs/benchmarks.md, "Drain with live traffic: the GIL budget"). Most of a row's cost is
building its Kafka record, choosing its partition and encoding the produce request. This
module moves that work into a child process (``python -m bridge.send_worker_child``) with
its own interpreter, its own producer and its own core. The gateway keeps everything that
touches the buffer: it leases the rows, hands them to the child, and deletes those the
child reports acked.

What stays the same:
- One batch is in flight at a time, whether the child or the gateway sends it, so
  per-device order is kept exactly as before (see :mod:`bridge.forwarder`).
- Only rows the child reports acked (and :func:`bridge.outcomes.releasable`) are deleted.
  A child that dies mid-batch loses nothing: the rows are still in the buffer and go again.
- Anything unusual goes back to the gateway's own path, which knows how to handle it: the
  child *declines* a batch with a record too large, a missing or forbidden topic; after any
  send error the gateway sends in-process (per-record verdicts, poison records, the
  breaker) until a batch goes out whole.

The child is used only in at-least-once mode and only with a backlog (a full lease); it
starts on the first backlog and exits by itself after :data:`IDLE_EXIT_S` without work.
Frames on its stdin/stdout are a 4-byte length and a pickle (our own child, our own pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.records import RecordBuilder
from edge.buffer import StoredMessage
from gateway.config import KafkaConfig
from gateway.errors import KafkaUnavailableError

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
"""The child exits after this long without a batch (its ~40 MB come back once a drain ends)."""
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


def row_tuple(message: StoredMessage) -> tuple[Any, ...]:
    """A leased row as the child receives it (a tuple pickles ~3x faster than the object)."""
    return (
        message.row_id,
        message.device_id,
        message.class_name,
        message.topic,
        message.qos,
        message.payload,
        message.ingest_ms,
        message.priority,
        message.msg_id,
    )


@dataclass(frozen=True, slots=True)
class WorkerSent:
    """The child's answer for a batch it sent."""

    released: list[int]
    """Indices into the batch of the rows that may be deleted (acked, and in order)."""
    error: str | None
    """The first send failure, if any (the gateway then sends in-process for a while)."""
    stuck: bool
    """The batch missed its deadline; the child rebuilt its producer."""


@dataclass(frozen=True, slots=True)
class Staged:
    """A batch handed to the child ahead of its send (see :meth:`SendWorker.stage`)."""

    child: int
    """Which child has it (``stats.starts`` when it was staged)."""
    key: int


@dataclass(slots=True)
class SendWorkerStats:
    """``/status`` → ``kafka.send_worker``."""

    running: bool = False
    pid: int | None = None
    starts: int = 0
    batches: int = 0
    rows: int = 0
    """Rows the child sent and the gateway released."""
    declined: int = 0
    """Batches the child handed back unsent (a record too large, a missing topic)."""
    failed_batches: int = 0
    exits: int = 0
    """Times the child was found gone (idle exit included)."""
    producer_rebuilds: int = 0


class SendWorker:
    """The gateway's side of the child process."""

    def __init__(
        self,
        kafka: KafkaConfig,
        builder: RecordBuilder,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kafka = kafka
        self._builder = builder
        self._clock = clock
        self._process: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Task[None] | None = None
        self._ready = False
        self._builder_stale = False
        self._next_start = 0.0
        self._next_key = 0
        self.stats = SendWorkerStats()

    @property
    def ready(self) -> bool:
        """True when a batch can go to the child now."""
        process = self._process
        return self._ready and process is not None and process.returncode is None

    def want(self) -> None:
        """A backlog is draining: start the child in the background unless it runs (or
        failed moments ago)."""
        if self.ready or self._starting is not None or self._clock() < self._next_start:
            return
        self._starting = asyncio.create_task(self._start(), name="send-worker-start")

    def builder_changed(self) -> None:
        """Routes changed (a reload): the child gets the new builder before its next batch."""
        self._builder_stale = True

    async def _start(self) -> None:
        try:
            await self._gone()  # the previous child, if any, is reaped first
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                CHILD_MODULE,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self._process = process
            assert process.stdin is not None
            assert process.stdout is not None
            write_frame(process.stdin, ("init", self._kafka, self._builder, _log_level()))
            self._builder_stale = False
            async with asyncio.timeout(_START_DEADLINE_S):
                await process.stdin.drain()
                reply = await read_frame(process.stdout)
            _expect_ready(reply)
            self._ready = True
            self.stats.starts += 1
            self.stats.running = True
            self.stats.pid = process.pid
            log.info("send worker started (pid %d): backlog batches go out from it", process.pid)
        except Exception as exc:  # whatever it was, the in-process path stands in
            log.warning("send worker did not start (sending in-process): %r", exc)
            self._next_start = self._clock() + _RESTART_AFTER_S
            await self._gone()
        finally:
            self._starting = None

    def stage(self, batch: Sequence[StoredMessage]) -> Staged | None:
        """Hand ``batch`` to the child now, so it builds and encodes it while the batch before
        it waits for Kafka; :meth:`send` it or :meth:`drop` it later. None: no child."""
        process = self._process
        if not self.ready or process is None:
            return None
        assert process.stdin is not None
        if self._builder_stale:
            write_frame(process.stdin, ("builder", self._builder))
            self._builder_stale = False
        self._next_key += 1
        write_frame(process.stdin, ("stage", self._next_key, [row_tuple(m) for m in batch]))
        return Staged(self.stats.starts, self._next_key)

    def drop(self, staged: Staged) -> None:
        """A staged batch that will not be sent (the batch before it did not go out whole)."""
        process = self._process
        if self.ready and process is not None and staged.child == self.stats.starts:
            assert process.stdin is not None
            write_frame(process.stdin, ("drop", staged.key))

    async def send(
        self, batch: Sequence[StoredMessage], staged: Staged | None = None
    ) -> WorkerSent | None:
        """Have the child send ``batch`` (staged earlier, or now); None when it declined or
        is gone (send it in-process then: the child sent nothing of it, or nothing of it
        was acked)."""
        if staged is None or staged.child != self.stats.starts:
            staged = self.stage(batch)
        process = self._process
        if staged is None or not self.ready or process is None:
            return None
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            write_frame(process.stdin, ("send", staged.key))
            await process.stdin.drain()
            # The child bounds its own wait (kafka.send_deadline_s); this covers a hung child.
            async with asyncio.timeout(self._kafka.send_deadline_s + 30):
                reply = await read_frame(process.stdout)
        except asyncio.CancelledError:
            # The stream may stop mid-frame: this child is not spoken to again (the next
            # start reaps it; its stdin closing makes it exit).
            self._ready = False
            raise
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
            # Gone (idle exit or a crash) or hung: whatever it sent unacked is sent again.
            log.warning("send worker unavailable (sending in-process): %r", exc)
            self._next_start = self._clock() + _RESTART_AFTER_S
            await self._gone()
            return None
        kind = reply[0]
        if kind == "declined":
            self.stats.declined += 1
            log.debug("send worker declined a batch: %s", reply[1])
            return None
        if kind == "failed":  # Kafka refused before anything was sent (no producer)
            self.stats.failed_batches += 1
            raise KafkaUnavailableError(reply[1])
        _, released, error, stuck, rebuilds = reply
        self.stats.batches += 1
        self.stats.rows += len(released)
        self.stats.producer_rebuilds = rebuilds
        if error is not None:
            self.stats.failed_batches += 1
        return WorkerSent(released=released, error=error, stuck=stuck)

    async def _gone(self) -> None:
        """Forget the child: ask it to go (stdin closed), kill it if it lingers, reap it."""
        process, self._process = self._process, None
        self._ready = False
        if self.stats.running:
            self.stats.exits += 1
        self.stats.running = False
        self.stats.pid = None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def close(self) -> None:
        """Stop the child (it finishes nothing: rows it had are still in the buffer)."""
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await self._gone()


def _expect_ready(reply: object) -> None:
    if reply != ("ready",):
        raise RuntimeError(f"unexpected first frame from the send worker: {reply!r}")


def _log_level() -> int:
    return logging.getLogger().getEffectiveLevel()
