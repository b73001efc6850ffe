"""The acknowledging half of :class:`edge.amqtt_handler.EdgeProtocolHandler`.

Each inbound QoS 1/2 publish is a :class:`PendingAck` on the connection's FIFO. When a sink
future resolves it wakes the connection's task (edge/amqtt_loop.py), which calls
:meth:`AckFlow.pump_acks`: PUBACK (QoS 1) or PUBREC (QoS 2) for every head of the FIFO whose
sink future has resolved, all in one socket write, in arrival order: acknowledgements follow
durability. (This was a task of its own per connection, ~1 KB that mostly waited.) Sink
futures are only awaited, never cancelled (the sink owns them). A failed store closes the
connection without acknowledging it or anything after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge.broker_state import EdgeContext
from edge.lifecycle import CONNECTION_LOST, STORE_FAILED
from edge.mqtt_wire import PUBACK, PUBREC, DecodedPublish, encode_acks
from edge.session_state import Wakeup

__all__ = ["AckFlow", "PendingAck", "sink_failure"]

log = logging.getLogger("edge.amqtt_handler")


@dataclass(eq=False, slots=True)
class PendingAck:
    """One inbound QoS 1/2 publish that is not acknowledged yet."""

    kind: int
    """PUBACK or PUBREC."""
    packet_id: int
    future: asyncio.Future[None]
    publish: DecodedPublish
    forward: bool
    """False for a QoS 2 duplicate: it was (or is being) stored and forwarded already."""


def sink_failure(future: asyncio.Future[None]) -> BaseException | None:
    """The error a sink future ended with (cancelled counts as one), or None."""
    if future.cancelled():
        return asyncio.CancelledError("sink future cancelled")
    return future.exception()


class AckFlow:
    """Mixin: the FIFO of pending acknowledgements and the pump that sends them.

    The handler provides the state below (set in its ``__init__``) and the connection
    methods declared under ``TYPE_CHECKING`` (its own, or amqtt's ``ProtocolHandler``'s).
    """

    _edge: EdgeContext
    _acks: list[PendingAck]
    """The FIFO: a list, not a deque (an empty deque is ~0.7 KB per connection; the
    pump takes a batch of heads at once, at most max_inflight entries to shift)."""
    _qos0_pending: set[asyncio.Future[None]]
    _inflight: int
    _capacity: Wakeup
    activity: Wakeup
    _closing: bool

    if TYPE_CHECKING:  # provided by EdgeProtocolHandler and amqtt's ProtocolHandler
        session: Any
        writer: Any
        _write_lock: asyncio.Lock

        @property
        def device_id(self) -> str: ...

        async def abort(self, reason: str, code: str = ...) -> None: ...

        def _ended(self, reason: str, detail: str) -> None: ...

        async def handle_connection_closed(self) -> None: ...

    def _ack_discarded(self, publish: DecodedPublish) -> None:
        """Acknowledge ``publish`` in its turn without storing or forwarding it."""
        if publish.qos == 0:
            return
        packet_id = publish.packet_id
        assert packet_id is not None  # decode_publish guarantees it for QoS 1/2
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        kind = PUBACK if publish.qos == 1 else PUBREC
        self._acks.append(PendingAck(kind, packet_id, done, publish, forward=False))
        self._inflight += 1
        self.activity.set()

    def _qos0_report(self, future: asyncio.Future[None]) -> None:
        error = sink_failure(future)
        if error is not None:
            self._edge.stats.qos0_store_failed(self.device_id, error)

    def _qos0_stored(self, future: asyncio.Future[None]) -> None:
        self._qos0_pending.discard(future)
        self._qos0_report(future)
        self._inflight -= 1
        self._capacity.set()

    def _wake_pump(self, _future: asyncio.Future[None]) -> None:
        if not self._ack_now():
            self.activity.set()

    def _ack_now(self) -> bool:
        """Acknowledge the FIFO's stored heads from the sink future's callback, without
        waking the connection's task; True when nothing is left for the task to do.

        At low rates every publish is its own commit, and the task's wake-up (a loop step,
        the pump's frames, the write lock, drain) cost more than the write itself
        (docs/benchmarks.md, "One key per envelope, and PUBACKs from the commit's
        callback"). Only the simple
        case goes here: not closing, no failed store, nothing to forward to local
        subscribers, the write lock free and the socket's buffer empty (a device that
        stopped reading is the task's to drain). Anything else wakes the task, as before.
        """
        acks = self._acks
        writer = self.writer
        if self._closing or not acks or writer is None or self._write_lock.locked():
            return False
        if getattr(writer, "is_closed", False):  # amqtt's adapter is closing the socket
            return False
        transport = self._transport()
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        edge = self._edge
        needs_forward = edge.needs_forward
        ready: list[tuple[int, int]] = []
        forwarded = 0
        for item in acks:
            future = item.future
            if not future.done() or future.cancelled() or future.exception() is not None:
                break
            if item.forward:
                if needs_forward(item.publish):
                    break
                forwarded += 1
            ready.append((item.kind, item.packet_id))
        if not ready:
            return not acks[0].future.done()
        del acks[: len(ready)]
        transport.write(encode_acks(ready))
        edge.stats.acks_sent_at_once += len(ready)
        edge.stats.broadcast_skipped += forwarded
        self._acked(len(ready))
        return not (acks and acks[0].future.done())

    def acks_ready(self) -> bool:
        """Whether :meth:`pump_acks` has something to send (the connection loop's test)."""
        acks = self._acks
        return bool(acks) and acks[0].future.done() and not self._closing

    async def pump_acks(self) -> None:
        """Acknowledge the FIFO's heads that are stored, until none is; on a failed store,
        drop the connection. Runs in the connection's task (edge/amqtt_loop.py).

        Every acknowledgement that is ready goes out in one socket write (under load about
        one commit's worth per device): a write, not a packet object and a plugin event
        per message, is what amqtt's ``_send_packet`` would cost.
        """
        acks = self._acks
        edge = self._edge
        try:
            while not self._closing and acks and acks[0].future.done():
                ready: list[tuple[int, int]] = []
                forwards: list[DecodedPublish] = []
                failed: tuple[PendingAck, BaseException] | None = None
                taken = 0
                for item in acks:
                    if not item.future.done():
                        break
                    taken += 1
                    error = sink_failure(item.future)
                    if error is not None:
                        failed = (item, error)
                        break
                    ready.append((item.kind, item.packet_id))
                    if item.forward:
                        forwards.append(item.publish)
                del acks[:taken]  # before any await: the reader appends meanwhile
                if ready:
                    await self._write_acks(ready)
                for publish in forwards:
                    if self._closing:  # stopped meanwhile (this used to cancel the pump)
                        return
                    await edge.forward(self.session, publish)
                if failed is not None:
                    item, error = failed
                    edge.stats.sink_failed(self.device_id, item.publish.topic, error)
                    await self.abort(f"a publish could not be stored: {error}", STORE_FAILED)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._closing:  # amqtt turns our cancellation inside _send_packet into this
                return
            log.exception("device %s: acknowledging failed", self.device_id)
            with contextlib.suppress(Exception):
                await self.abort("acknowledging failed", CONNECTION_LOST)

    @contextlib.asynccontextmanager
    async def acking_aside(self) -> AsyncIterator[None]:
        """While the connection's task waits on the device itself (amqtt delivering retained
        or queued QoS 1/2 messages and awaiting their PUBACKs), acknowledge from a task of
        its own. Otherwise a reader paused at the in-flight cap could not read those PUBACKs
        (they queue behind the device's publishes), and nothing would send the acks that
        free it: the connection would stall until amqtt gives up on the delivery (5 s), which
        the separate ack pump task never did."""
        task = asyncio.create_task(self._pump_aside())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _pump_aside(self) -> None:
        while not self._closing:
            if self.acks_ready():
                await self.pump_acks()
            else:
                await self.activity.wait()  # the connection's task is busy: not waiting on it

    async def _write_acks(self, ready: list[tuple[int, int]]) -> None:
        writer = self.writer
        if writer is None:
            return
        try:
            # amqtt's write lock: a delivery to this device (mqtt_publish) writes its packets
            # under it too, so an ack never lands inside another packet's bytes.
            async with self._write_lock:
                writer.write(encode_acks(ready))
                await writer.drain()
        except (ConnectionResetError, BrokenPipeError) as exc:
            self._ended(CONNECTION_LOST, f"writing acknowledgements failed: {exc!r}")
            await self.handle_connection_closed()
            return
        self._acked(len(ready))

    def _acked(self, count: int) -> None:
        """``count`` acknowledgements written: the reader may take that many more."""
        self._edge.stats.acks_sent += count
        self._inflight -= count
        self._capacity.set()

    def _transport(self) -> Any:
        """The connection's asyncio transport under amqtt's writer adapter, or None."""
        return getattr(getattr(self.writer, "_writer", None), "transport", None)
