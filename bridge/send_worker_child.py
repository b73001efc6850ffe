"""The send worker's child process: ``python -m bridge.send_worker_child``.

Started by :class:`bridge.send_worker.SendWorker`. It reads frames on stdin (``init``, then
``send`` and ``builder``), builds each batch's Kafka records, sends them with its own
:class:`bridge.producer.KafkaProducerHandle`, and answers on stdout with the rows that may
be deleted. It never touches the buffer. It exits when stdin closes (the gateway stopped or
died), after :data:`bridge.send_worker.IDLE_EXIT_S` without work, or with its parent
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
from typing import Any

from bridge.outcomes import plan_batch, releasable
from bridge.producer import KafkaProducerHandle
from bridge.records import RecordBuilder
from bridge.send_worker import IDLE_EXIT_S, read_frame, write_frame
from edge.buffer import StoredMessage
from gateway.config import KafkaConfig
from gateway.errors import KafkaError

log = logging.getLogger("bridge.send_worker_child")

_PR_SET_PDEATHSIG = 1


class _Child:
    def __init__(self, kafka: KafkaConfig, builder: RecordBuilder) -> None:
        self._kafka = kafka
        self._builder = builder
        self._producer = KafkaProducerHandle(kafka)

    async def start(self) -> None:
        """Connect early (the TLS handshake overlaps the gateway's in-process sends); a
        failure here shows again, and is reported, on the first batch."""
        with contextlib.suppress(KafkaError):
            await self._producer.ensure_started()

    def use(self, builder: RecordBuilder) -> None:
        self._builder = builder

    async def send(self, rows: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        batch = [StoredMessage(*r) for r in rows]
        records = [self._builder.build(m) for m in batch]
        try:
            for topic in {r.topic for r in records}:
                state = await self._producer.topic_state(topic)
                if state != "ok":
                    return ("declined", f"topic {topic!r} is {state}")
        except KafkaError as exc:
            return ("failed", str(exc))
        plan = plan_batch(
            records,
            max_record_bytes=self._kafka.max_request_bytes,
            missing_for={},
            missing_deadline_s=self._kafka.missing_topic_dead_letter_s,
        )
        if plan.dead or plan.held:
            return ("declined", "a record needs a verdict (too large)")
        try:
            outcome = await self._producer.send(records)
        except KafkaError as exc:
            return ("failed", str(exc))
        done = releasable(batch, outcome.acked, [r.topic for r in records])
        index_of = {m.row_id: i for i, m in enumerate(batch)}
        released = [index_of[m.row_id] for m in done]
        error = None if outcome.error is None else str(outcome.error)
        return ("sent", released, error, outcome.stuck, self._producer.rebuilds)

    async def close(self) -> None:
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
    write_frame(out, ("ready",))
    try:
        while True:
            try:
                async with asyncio.timeout(IDLE_EXIT_S):
                    frame = await read_frame(reader)
            except TimeoutError:
                log.info("idle for %.0f s: exiting", IDLE_EXIT_S)
                return
            except asyncio.IncompleteReadError:
                return  # stdin closed: the gateway is done with us
            if frame[0] == "builder":
                child.use(frame[1])
            elif frame[0] == "send":
                write_frame(out, await child.send(frame[1]))
            else:
                raise SystemExit(f"send worker: unknown frame {frame[0]!r}")
    finally:
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
