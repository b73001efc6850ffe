"""The send worker's child process: ``python -m bridge.send_worker_child``.

Started by :class:`bridge.send_worker.SendWorker`. It reads frames on stdin: ``init``; then
``stage`` (a batch's rows: build its records and encode them into record batches at once),
``send`` (send a staged batch, wait for its acks, answer on stdout with the rows that may be
deleted), ``drop`` (a staged batch the gateway will not use) and ``builder`` (new routes).
It sends with its own :class:`bridge.producer.KafkaProducerHandle`, one part at a time
(the next once the one before is acked); after a part failed or was declined, the later
parts of the same epoch are declined unsent (bridge/send_worker.py says why).
It never touches the buffer. It exits when stdin closes (the gateway stopped or died),
after :data:`bridge.send_worker.IDLE_EXIT_S` without work, or with its parent
(``PR_SET_PDEATHSIG`` on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from bridge.outcomes import releasable
from bridge.producer import KafkaProducerHandle, PreparedSend
from bridge.records import KafkaRecord, RecordBuilder
from bridge.send_worker import IDLE_EXIT_S, read_frame, write_frame
from edge.buffer import StoredMessage
from gateway.config import KafkaConfig
from gateway.errors import KafkaError
from gateway.gc_tuning import BATCH_YOUNG, tune_gc

log = logging.getLogger("bridge.send_worker_child")


_PR_SET_PDEATHSIG = 1
_CHUNK = 250
"""Rows built between two turns of the event loop while a batch is staged."""


@dataclass(slots=True)
class _Staged:
    batch: list[StoredMessage]
    prepared: PreparedSend


class _Child:
    def __init__(self, kafka: KafkaConfig, builder: RecordBuilder) -> None:
        self._kafka = kafka
        self._builder = builder
        self._producer = KafkaProducerHandle(kafka)
        self._staged: dict[int, asyncio.Task[_Staged | tuple[Any, ...]]] = {}
        self.busy = False
        self._failed_epoch: int | None = None
        """The epoch in which a part failed or was declined: later parts of it are declined
        unsent (the gateway asked for them before it knew; they must not overtake)."""

    async def start(self) -> None:
        """Connect early (the TLS handshake overlaps the gateway's in-process sends); a
        failure here shows again, and is reported, on the first batch."""
        with contextlib.suppress(KafkaError):
            await self._producer.ensure_started()

    def use(self, builder: RecordBuilder) -> None:
        self._builder = builder

    def stage(self, key: int, rows: list[tuple[Any, ...]]) -> None:
        """Build and encode a batch now (while the batch before it waits for its acks).

        The gateway stages one batch ahead at most: one still staged when the next comes
        was given up (it may not say so), so it is dropped and nothing piles up here."""
        for old in list(self._staged):
            self.drop(old)
        self._staged[key] = asyncio.create_task(self._prepare(rows))

    def take(self, key: int) -> asyncio.Task[_Staged | tuple[Any, ...]] | None:
        """The staged batch to send (taken at once, so a later stage cannot drop it)."""
        return self._staged.pop(key, None)

    def drop(self, key: int) -> None:
        task = self._staged.pop(key, None)
        if task is not None:
            task.cancel()

    async def _prepare(self, rows: list[tuple[Any, ...]]) -> _Staged | tuple[Any, ...]:
        batch = [StoredMessage(*r) for r in rows]
        records: list[KafkaRecord] = []
        build = self._builder.build
        for start in range(0, len(batch), _CHUNK):
            records.extend([build(m) for m in batch[start : start + _CHUNK]])
            # Building a batch takes ~10 ms; the batch before it is in aiokafka's hands
            # meanwhile, and its request and acks wait for this loop (they did, whole).
            await asyncio.sleep(0)
        try:
            for topic in {r.topic for r in records}:
                state = await self._producer.topic_state(topic)
                if state != "ok":
                    return ("declined", f"topic {topic!r} is {state}")
            prepared = await self._producer.prepare(records, yielding=True)
        except KafkaError as exc:
            return ("failed", str(exc))
        if prepared.early:  # a record too large: the gateway dead-letters it in-process
            return ("declined", "a record does not fit a record batch")
        return _Staged(batch, prepared)

    async def send(
        self, task: asyncio.Task[_Staged | tuple[Any, ...]] | None, epoch: int
    ) -> tuple[Any, ...]:
        """Send a staged part, wait for its acks, say which rows may be deleted."""
        reply = await self._send(task, epoch)
        if reply[0] != "sent" or reply[2] is not None or len(reply[1]) < reply[5]:
            self._failed_epoch = epoch
        return reply[:5]

    async def _send(
        self, task: asyncio.Task[_Staged | tuple[Any, ...]] | None, epoch: int
    ) -> tuple[Any, ...]:
        if task is None:
            return ("declined", "part not staged (dropped or from an earlier child)")
        if epoch == self._failed_epoch:
            task.cancel()
            return ("declined", "an earlier part of this epoch failed")
        staged = await task
        if isinstance(staged, tuple):
            return staged
        batch = staged.batch
        try:
            outcome = await self._producer.send_prepared(staged.prepared)
        except KafkaError as exc:
            return ("failed", str(exc))
        if outcome.error is None and all(outcome.acked):
            released = list(range(len(batch)))
        else:
            topics = [r.topic for r in staged.prepared.records]
            index_of = {m.row_id: i for i, m in enumerate(batch)}
            released = [index_of[m.row_id] for m in releasable(batch, outcome.acked, topics)]
        error = None if outcome.error is None else str(outcome.error)
        return ("sent", released, error, outcome.stuck, self._producer.rebuilds, len(batch))

    async def close(self) -> None:
        for key in list(self._staged):
            self.drop(key)
        await self._producer.close(5.0)


async def _serve(reader: asyncio.StreamReader, out: Any) -> None:
    first = await read_frame(reader)
    kind, kafka, builder, level = first
    if kind != "init":
        raise SystemExit(f"send worker: expected init, got {kind!r}")
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s send-worker: %(message)s"
    )
    child = _Child(kafka, builder)
    await child.start()
    tune_gc(young=BATCH_YOUNG)  # fewer collections: ~1 µs less per row (docs/benchmarks.md)
    write_frame(out, ("ready",))
    # Frames are read while a batch is out: the next one is staged (built, encoded) then.
    # Sends run one at a time, in the order of their "send" frames.
    sends: asyncio.Queue[tuple[asyncio.Task[_Staged | tuple[Any, ...]] | None, int]]
    sends = asyncio.Queue()

    async def sender() -> None:
        while True:
            task, epoch = await sends.get()
            child.busy = True
            try:
                write_frame(out, await child.send(task, epoch))
            finally:
                child.busy = sends.qsize() > 0

    sending = asyncio.create_task(sender())
    try:
        while True:
            try:
                async with asyncio.timeout(IDLE_EXIT_S):
                    frame = await read_frame(reader)
            except TimeoutError:
                if child.busy:
                    continue
                log.info("idle for %.0f s: exiting", IDLE_EXIT_S)
                return
            except asyncio.IncompleteReadError:
                return  # stdin closed: the gateway is done with us
            kind = frame[0]
            if kind == "stage":
                child.stage(frame[1], frame[2])
            elif kind == "send":
                child.busy = True
                sends.put_nowait((child.take(frame[1]), frame[2]))
            elif kind == "drop":
                child.drop(frame[1])
            elif kind == "builder":
                child.use(frame[1])
            else:
                raise SystemExit(f"send worker: unknown frame {kind!r}")
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        await child.close()


class _Out:
    """Frames to the private copy of stdout, written whole (a few hundred bytes each)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]


async def _main() -> None:
    # stdout carries the frames: keep a private copy and point fd 1 at stderr, so a stray
    # print() in any library cannot corrupt the protocol.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    await _serve(reader, _Out(out_fd))


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when we stop
    asyncio.run(_main())


if __name__ == "__main__":
    main()
