"""One simulated device: connect with retries, publish envelopes inside a window, drain, leave.

All paho callbacks run on the loop thread (reads happen there), except the socket callbacks
during ``connect()``, which :mod:`device_sim.link` forwards. A device's state is therefore
only touched from the loop thread and needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from device_sim.behaviour import DeviceEvent, plan_for
from device_sim.commands import CommandApplier
from device_sim.envelope import encode_envelope, make_msg_id
from device_sim.ledger import AckEntry, AckLedgerWriter
from device_sim.link import PahoLoopDriver
from device_sim.options import FleetOptions, source_address
from device_sim.sensors import Sensor, garbage
from device_sim.stats import FleetCounters, LatencyHistogram

__all__ = ["FleetContext", "SimDevice"]


@dataclass
class FleetContext:
    """What all devices of one process share."""

    options: FleetOptions
    run_id: str
    driver: PahoLoopDriver
    counters: FleetCounters
    latency: LatencyHistogram
    steady_latency: LatencyHistogram
    """PUBACK latency of messages sent once every device of this process had connected:
    the load at its offered rate, without the connect ramp (see ``steady_from_ns``)."""
    ledger: AckLedgerWriter | None
    connect_gate: asyncio.Semaphore
    connect_in_thread: Callable[..., asyncio.Future[Any]]
    """Runs a blocking call in the connect thread pool."""
    started: float
    publish_deadline: float
    """loop.time() at which every device stops publishing."""
    body: bytes
    """Filler for the envelope body (random once per run, sliced per message)."""
    steady_from_ns: int | None = None
    """perf_counter_ns() when the last device of this process first connected."""


@dataclass(slots=True)
class _Pending:
    class_name: str
    msg_id: str
    seq: int
    sent_ns: int


class SimDevice:
    """A paho client plus the bookkeeping that turns its PUBACKs into ledger entries."""

    def __init__(self, ctx: FleetContext, index: int) -> None:
        self.ctx = ctx
        self.index = index
        opts = ctx.options
        self._rng = random.Random(None if opts.seed is None else opts.seed * 1_000_003 + index)
        self.plan = plan_for(opts, index, self._rng)
        self.device_id = self.plan.device_id
        self._sensor = Sensor(
            self.plan.sensor,
            self.plan.encoding,
            self._rng,
            size=self.plan.payload_size,
            filler=ctx.body,
        )
        self._classes = [name for name, _ in self.plan.classes]
        self._weights = [weight for _, weight in self.plan.classes]
        self._seq = dict.fromkeys(self._classes, 0)
        self._topics = {name: f"d/{self.device_id}/up/{name}" for name in self._classes}
        self._pending: dict[int, _Pending] = {}
        # The window: one permit per message in flight (QoS1: until PUBACK, QoS0: until
        # written to the socket), so neither paho's queue nor our memory grows unbounded.
        self._window = asyncio.Semaphore(opts.inflight)
        self._idle = asyncio.Event()
        self._idle.set()
        self._connack: asyncio.Future[None] | None = None
        self._connected = False
        self._closing = False
        self._offline = False
        self._lost = asyncio.Event()
        self.sent = 0
        self.commands = CommandApplier(failure_rate=opts.command_failure_rate, rng=self._rng)
        self._applying: set[asyncio.Task[None]] = set()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            manual_ack=opts.commands,  # PUBACK a command only after applying it
        )
        client.connect_timeout = opts.connect_timeout_s
        if opts.password is not None:
            client.username_pw_set(self.device_id, opts.password)
        if opts.tls_ca is not None and opts.tls_cert_dir is not None:
            client.tls_set(
                ca_certs=str(opts.tls_ca),
                certfile=str(opts.tls_cert_dir / f"{self.device_id}.pem"),
                keyfile=str(opts.tls_cert_dir / f"{self.device_id}-key.pem"),
            )
        client.max_inflight_messages_set(opts.inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        if opts.commands:
            client.on_message = self._on_message
        ctx.driver.attach(client)
        self.client = client

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Connect, publish until the target, wait for PUBACKs, disconnect. Never raises
        (except cancellation): failures are counted."""
        opts = self.ctx.options
        loop = asyncio.get_running_loop()
        if self.plan.connect_at_s is not None:
            await asyncio.sleep(max(0.0, self.ctx.started + self.plan.connect_at_s - loop.time()))
        elif opts.connect_rate > 0:
            ramp_at = self.ctx.started + (self.index - opts.start_index) / opts.connect_rate
            await asyncio.sleep(max(0.0, ramp_at - loop.time()))
        try:
            if not await self._connect_with_retries(first=True):
                self.ctx.counters.gave_up += 1
                return
            try:
                async with asyncio.timeout_at(self.ctx.publish_deadline):
                    await self._publish_loop()
            except TimeoutError:
                pass  # duration reached, or --max-time cut a count run short
            await self._drain()
            if opts.linger_s:
                await asyncio.sleep(opts.linger_s)  # connected, receiving commands
            if self._applying:
                await asyncio.wait(self._applying, timeout=opts.command_delay_s + 5)
        finally:
            await self._disconnect()

    async def _connect_with_retries(self, *, first: bool) -> bool:
        opts = self.ctx.options
        loop = asyncio.get_running_loop()
        for attempt in range(opts.connect_attempts):
            if attempt:
                # Full jitter, capped: a fleet that lost its broker must not reconnect in step.
                cap = min(opts.backoff_max_s, opts.backoff_base_s * 2 ** (attempt - 1))
                await asyncio.sleep(self._rng.uniform(0, cap))
            if loop.time() >= self.ctx.publish_deadline and not first:
                return False
            if await self._connect_once():
                if first:
                    self.ctx.counters.ever_connected += 1
                    if self.ctx.counters.ever_connected == opts.devices:
                        self.ctx.steady_from_ns = time.perf_counter_ns()
                    self.ctx.counters.connect_time_s = max(
                        self.ctx.counters.connect_time_s, loop.time() - self.ctx.started
                    )
                return True
            self.ctx.counters.connect_failures += 1
        return False

    async def _connect_once(self) -> bool:
        opts = self.ctx.options
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._lost.clear()
        bind = source_address(self.index) if opts.spread_source_addresses else ""
        try:
            async with self.ctx.connect_gate, asyncio.timeout(opts.connect_timeout_s):
                await self.ctx.connect_in_thread(
                    self.client.connect, opts.host, opts.port, opts.keepalive, bind
                )
                await self._connack
        except (OSError, TimeoutError, ConnectionError, ValueError):
            self.ctx.driver.forget(self.client)
            return False
        return True

    async def _publish_loop(self) -> None:
        opts = self.ctx.options
        loop = asyncio.get_running_loop()
        started = self.ctx.started
        interval = self.plan.interval(loop.time() - started)
        # Spread first sends over one interval so rate-limited fleets don't pulse in step.
        next_at = loop.time() + self._rng.uniform(0, interval)
        while opts.count is None or self.sent < opts.count:
            if interval:
                # Sleep until the next send, waking for events (offline, storm) on the way.
                while (now := loop.time()) < next_at:
                    event = self.plan.pop_due(now - started)
                    if event is not None:
                        await self._run_event(event)
                        continue
                    due = self.plan.next_event_at()
                    wake = next_at if due is None else min(next_at, started + due)
                    await asyncio.sleep(max(0.0, wake - now))
            while (event := self.plan.pop_due(loop.time() - started)) is not None:
                await self._run_event(event)
            if not self._connected and not await self._connect_with_retries(first=False):
                return
            if not await self._acquire_window():
                continue  # connection lost while the window was full: reconnect first
            interval = self.plan.interval(loop.time() - started)  # bursts change it
            if interval:
                # Catch up after a stall, but at most one interval's worth of burst.
                next_at = max(next_at + interval, loop.time() - interval)
            if not self._connected:
                self._window.release()
                continue
            bad = self.plan.pick_misbehaviour(self._rng)
            if bad is None:
                self._publish_one()
            else:
                self._window.release()  # a bad message is QoS0 and never waits for a PUBACK
                self._misbehave(bad)

    async def _run_event(self, event: DeviceEvent) -> None:
        """Go offline for a while (clean DISCONNECT) or lose the socket (storm), then let
        the publish loop reconnect; QoS1 messages still un-acked are resent after that."""
        counters = self.ctx.counters
        if not self._connected:
            return
        self._lost.clear()
        if event.kind == "offline":
            counters.offline_windows += 1
            self._offline = True
            self.client.disconnect()
        else:
            counters.storm_drops += 1
            sock = self.client.socket()
            if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
                # No DISCONNECT: the gateway sees the connection die, paho sees EOF.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._lost.wait()
            await asyncio.sleep(event.seconds)
        finally:
            self._offline = False  # also when the publishing phase ends during the window

    def _misbehave(self, kind: str) -> None:
        """One bad message, QoS0 (nothing is promised, nothing goes into the ledger)."""
        counters = self.ctx.counters
        topic = self._topics[self._classes[0]]
        if kind == "garbage":
            payload = garbage(self._rng, 16 + self._rng.randrange(64))
            counters.sent_garbage += 1
        elif kind == "oversized":
            payload = garbage(self._rng, self.plan.misbehave.oversized_bytes)
            counters.sent_oversized += 1
        else:
            # Another device's uplink (the topic ACL refuses it) or a topic outside d/.
            other = f"not-{self.device_id}" if self._rng.random() < 0.5 else None
            topic = f"d/{other}/up/{self._classes[0]}" if other else f"junk/{self.device_id}"
            payload = encode_envelope(
                msg_id=f"{self.device_id}:bad:{self.sent}", seq=1, ts=0, body=b""
            )
            counters.sent_wrong_topic += 1
        self.client.publish(topic, payload, qos=0)
        self.sent += 1

    async def _acquire_window(self) -> bool:
        """Take a window permit; False if the connection is lost while waiting for one
        (un-acked QoS1 messages are only resent, and permits only freed, after a reconnect)."""
        if not self._window.locked():
            await self._window.acquire()
            return True
        acquire = asyncio.ensure_future(self._window.acquire())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait((acquire, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            acquire.cancel()
        try:
            await acquire
        except asyncio.CancelledError:
            # Only our own cancel above can land here (an outside cancel is raised by the
            # wait); a cancelled Semaphore.acquire passes its permit on, nothing leaks.
            return False
        return True

    def _publish_one(self) -> None:
        opts = self.ctx.options
        name = (
            self._classes[0]
            if len(self._classes) == 1
            else self._rng.choices(self._classes, self._weights)[0]
        )
        seq = self._seq[name] + 1
        self._seq[name] = seq
        msg_id = make_msg_id(self.device_id, self.ctx.run_id, name, seq)
        ts = time.time_ns() // 1_000_000
        payload = encode_envelope(
            msg_id=msg_id, seq=seq, ts=ts, body=self._sensor.reading(ts), ttl_s=opts.ttl_s
        )
        sent_ns = time.perf_counter_ns()
        info = self.client.publish(self._topics[name], payload, qos=opts.qos)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # Not queued at all (paho refused): the message does not exist; reuse the seq.
            self._seq[name] = seq - 1
            self.ctx.counters.errors += 1
            self._window.release()
            return
        # NO_CONN for QoS1 still keeps the message in paho's session; it is resent on
        # reconnect, so it stays pending. (on_publish cannot have run yet: it needs the loop.)
        self._pending[info.mid] = _Pending(name, msg_id, seq, sent_ns)
        self._idle.clear()
        self.sent += 1
        counters = self.ctx.counters
        counters.sent += 1
        if not counters.first_send_wall:
            counters.first_send_wall = time.time()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ctx.options.drain_timeout_s
        while self._pending and loop.time() < deadline:
            if not self._connected and not await self._connect_with_retries(first=False):
                break
            try:
                async with asyncio.timeout_at(deadline):
                    await self._idle_or_lost()
            except TimeoutError:
                break
        self.ctx.counters.unacked_at_end += len(self._pending)

    async def _idle_or_lost(self) -> None:
        idle = asyncio.ensure_future(self._idle.wait())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait((idle, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            lost.cancel()

    async def _disconnect(self) -> None:
        self._closing = True
        if not self._connected:
            self.ctx.driver.forget(self.client)
            return
        self._lost.clear()
        self.client.disconnect()
        try:
            async with asyncio.timeout(5.0):
                await self._lost.wait()
        except TimeoutError:
            self.ctx.counters.errors += 1
            self.ctx.driver.forget(self.client)

    # ---------------------------------------------------------------- paho callbacks

    def _on_connect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        fut = self._connack
        if reason.is_failure:
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"CONNACK refused: {reason}"))
            return
        self._connected = True
        self.ctx.counters.connected += 1
        if self.ctx.options.commands:
            self.client.subscribe(f"d/{self.device_id}/cmd", qos=1)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, _reason: Any, _props: Any
    ) -> None:
        if self._connected:
            self._connected = False
            self.ctx.counters.connected -= 1
            if not self._closing and not self._offline:
                self.ctx.counters.disconnects += 1
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError("connection closed before CONNACK"))
        # QoS0 messages queued but not written are gone (paho discards them on reconnect
        # without calling on_publish): give their window permits back.
        if self.ctx.options.qos == 0:
            for _ in range(len(self._pending)):
                self._window.release()
            self._pending.clear()
            self._idle.set()
        self._lost.set()

    def _on_message(self, client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Runs on the loop thread (the driver reads there): a task per command, tracked.
        task = asyncio.get_running_loop().create_task(
            self._apply(client, msg.mid, msg.qos, bytes(msg.payload)),
            name=f"apply:{self.device_id}",
        )
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    async def _apply(self, client: mqtt.Client, mid: int, qos: int, payload: bytes) -> None:
        counters = self.ctx.counters
        outcome = self.commands.receive(payload)
        if outcome is None:
            counters.errors += 1
        elif outcome.repeat:
            counters.commands_repeated += 1
        else:
            if self.ctx.options.command_delay_s:
                await asyncio.sleep(self.ctx.options.command_delay_s)
            if outcome.status == "executed":
                counters.commands_executed += 1
            else:
                counters.commands_failed += 1
        if outcome is not None:
            client.publish(f"d/{self.device_id}/cmd/result", outcome.report(), qos=1)
        client.ack(mid, qos)  # after applying and reporting

    def _on_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reason: Any, _props: Any
    ) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        self.ctx.counters.last_ack_wall = time.time()
        self._window.release()
        if not self._pending:
            self._idle.set()
        if self.ctx.options.qos == 0:
            return
        if reason.is_failure:
            self.ctx.counters.errors += 1
            return
        self.ctx.counters.acked += 1
        latency_us = (time.perf_counter_ns() - entry.sent_ns) / 1000
        self.ctx.latency.record(latency_us)
        steady_from = self.ctx.steady_from_ns
        if steady_from is not None and entry.sent_ns >= steady_from:
            self.ctx.steady_latency.record(latency_us)
        if self.ctx.ledger is not None:
            self.ctx.ledger.append(
                AckEntry(
                    device_id=self.device_id,
                    class_name=entry.class_name,
                    msg_id=entry.msg_id,
                    seq=entry.seq,
                    run_id=self.ctx.run_id,
                    acked_ms=time.time_ns() // 1_000_000,
                )
            )
