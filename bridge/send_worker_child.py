"""The send worker's child process: ``python -m bridge.send_worker_child``.

Started by :class:`bridge.send_worker.SendWorker`. It reads frames on stdin: ``init``; then
``stage`` (a batch's rows: build its records and encode them into record batches at once),
``stage_spans`` (the same for spans of the buffer: the rows are read from its file here),
``send`` (send a staged batch, wait for its acks, answer on stdout with the rows that may be
deleted), ``drop`` (a staged batch the gateway will not use) and ``builder`` (new routes).
It sends with its own :class:`bridge.producer.KafkaProducerHandle`, one part at a time
(the next once the one before is acked); after a part failed or was declined, the later
parts of the same epoch are declined unsent (bridge/send_worker.py says why).
It only reads the buffer (a read-only connection), never writes it. It exits when stdin
closes (the gateway stopped or died), after :data:`bridge.send_worker.IDLE_EXIT_S` without
work, or with its parent (``PR_SET_PDEATHSIG`` on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sqlite3
import sys
from array import array
from collections.abc import Coroutine
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any

from bridge.outcomes import releasable
from bridge.producer import KafkaProducerHandle, PreparedSend
from bridge.records import KafkaRecord, RecordBuilder, RecordRow
from bridge.send_worker import IDLE_EXIT_S, read_frame, write_frame
from edge.buffer_types import LeaseSpan, StoredMessage
from gateway.config import KafkaConfig
from gateway.errors import KafkaError
from gateway.gc_tuning import BATCH_YOUNG, tune_gc

log = logging.getLogger("bridge.send_worker_child")


_PR_SET_PDEATHSIG = 1
_CHUNK = 250
"""Rows built between two turns of the event loop while a batch is staged."""


@dataclass(slots=True)
class _Staged:
    batch: list[RecordRow]
    prepared: PreparedSend
    from_spans: bool = False
    """Read from the buffer here: the answer says which ids were acked, per class."""


_READ_SPAN = (
    "SELECT id, device_id, class, topic, qos, payload, ingest_ms"  # a RecordRow
    " FROM uplink WHERE class = ? AND id > ? AND id <= ? ORDER BY id"
)


class _Child:
    def __init__(
        self, kafka: KafkaConfig, builder: RecordBuilder, buffer_path: str | None = None
    ) -> None:
        self._kafka = kafka
        self._builder = builder
        self._buffer_path = buffer_path
        self._buffer: sqlite3.Connection | None = None
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

    def stage(self, key: int, rows: list[RecordRow]) -> None:
        """Build and encode a batch now (while the batch before it waits for its acks).

        The gateway stages one batch ahead at most: one still staged when the next comes
        was given up (it may not say so), so it is dropped and nothing piles up here."""
        self._stage(key, self._prepare(rows))

    def stage_spans(self, key: int, spans: list[LeaseSpan]) -> None:
        """:meth:`stage` for spans of the buffer: the rows are read here."""
        self._stage(key, self._prepare_spans(spans))

    def _stage(self, key: int, work: Coroutine[Any, Any, _Staged | tuple[Any, ...]]) -> None:
        for old in list(self._staged):
            self.drop(old)
        self._staged[key] = asyncio.create_task(work)

    def take(self, key: int) -> asyncio.Task[_Staged | tuple[Any, ...]] | None:
        """The staged batch to send (taken at once, so a later stage cannot drop it)."""
        return self._staged.pop(key, None)

    def drop(self, key: int) -> None:
        task = self._staged.pop(key, None)
        if task is not None:
            task.cancel()

    async def _prepare_spans(self, spans: list[LeaseSpan]) -> _Staged | tuple[Any, ...]:
        """Read the leased rows from the buffer file (WAL: beside the gateway's writer), in
        chunks between turns of the loop, then as :meth:`_prepare`. A span that no longer
        holds the rows it was leased with (a dead letter replayed into it) is declined: the
        gateway leases afresh and sends in-process."""
        if self._buffer is None:
            if self._buffer_path is None:
                return ("declined", "no buffer path: spans cannot be read here")
            self._buffer = open_buffer_reader(self._buffer_path)
        rows: list[RecordRow] = []
        for span in spans:
            cursor = self._buffer.execute(
                _READ_SPAN, (span.class_name, span.after_id, span.last_id)
            )
            read = 0
            try:
                while chunk := cursor.fetchmany(_CHUNK * 4):
                    rows.extend(chunk)
                    read += len(chunk)
                    await asyncio.sleep(0)  # the batch in flight gets its acks read meanwhile
            finally:
                cursor.close()  # (dropped midway: an open read would hold WAL checkpoints)
            if read != span.rows:
                held = f"span of {span.class_name!r} holds {read} rows, not {span.rows}"
                return ("declined", held)
        staged = await self._prepare(rows)
        if isinstance(staged, _Staged):
            staged.from_spans = True
        return staged

    async def _prepare(self, rows: list[RecordRow]) -> _Staged | tuple[Any, ...]:
        records: list[KafkaRecord] = []
        build_rows = self._builder.build_rows
        for start in range(0, len(rows), _CHUNK):
            records.extend(build_rows(rows[start : start + _CHUNK]))
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
        return _Staged(rows, prepared)

    async def send(
        self, task: asyncio.Task[_Staged | tuple[Any, ...]] | None, epoch: int
    ) -> tuple[Any, ...]:
        """Send a staged part, wait for its acks, say which rows may be deleted."""
        reply = await self._send(task, epoch)
        if reply[0] != "sent" or reply[2] is not None or len(reply[1]) < reply[-1]:
            self._failed_epoch = epoch
        return reply[:-1] if reply[0] == "sent" else reply

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
            index_of = {row[0]: i for i, row in enumerate(batch)}
            messages = [StoredMessage(*row, priority=0) for row in batch]  # (rare: a failure)
            released = [index_of[m.row_id] for m in releasable(messages, outcome.acked, topics)]
        error = None if outcome.error is None else str(outcome.error)
        by_class = _ids_by_class(batch, released) if staged.from_spans else None
        rebuilds = self._producer.rebuilds
        return ("sent", released, error, outcome.stuck, rebuilds, by_class, len(batch))

    async def close(self) -> None:
        for key in list(self._staged):
            self.drop(key)
        await self._producer.close(5.0)
        if self._buffer is not None:
            self._buffer.close()


def open_buffer_reader(path: str) -> sqlite3.Connection:
    """A read-only connection to the gateway's buffer file (WAL: reads beside its writer)."""
    uri = Path(path).absolute().as_uri() + "?mode=ro"  # (quoted: spaces, '?' or '#')
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    conn.execute("PRAGMA query_only=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _ids_by_class(batch: list[RecordRow], released: list[int]) -> dict[str, Any]:
    """Per class, the acked ids (packed: 8 bytes each) and their payload bytes.

    Rows read from spans come class by class, so each class is one run of the batch, taken
    whole with C-level iteration (4,000 rows: 0.15 -> 0.09 µs a row against a loop in
    Python per row)."""
    chosen = batch if len(released) == len(batch) else [batch[i] for i in released]
    ids: dict[str, array[int]] = {}
    nbytes: dict[str, int] = {}
    for name, group in groupby(chosen, itemgetter(2)):
        run = list(group)
        ids.setdefault(name, array("q")).extend(map(itemgetter(0), run))
        nbytes[name] = nbytes.get(name, 0) + sum(map(len, map(itemgetter(5), run)))
    return {name: (ids[name].tobytes(), nbytes[name]) for name in ids}


async def _serve(reader: asyncio.StreamReader, out: Any) -> None:
    first = await read_frame(reader)
    kind, kafka, builder, level, buffer_path = first
    if kind != "init":
        raise SystemExit(f"send worker: expected init, got {kind!r}")
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s send-worker: %(message)s"
    )
    child = _Child(kafka, builder, buffer_path)
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
            elif kind == "stage_spans":
                child.stage_spans(frame[1], frame[2])
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
