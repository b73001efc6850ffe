"""Delivery of stored commands to connected devices, one at a time per device.

amqtt's outbound QoS 1 waits 5 s for a PUBACK (hard-coded), then forgets the message and
never resends it; its offline queue is in memory. So the downlink owns delivery: the command
stays ``pending`` in SQLite until the device's PUBACK came back, and is published again on
the device's next connection (or after ``retry_interval_s`` while it stays connected).
Delivery is at least once; devices ignore command ids they already executed.

One worker task per device with deliverable work, in the downlink's task group. A worker
sends the device's next command (priority, then arrival), waits for its PUBACK, records it,
and goes on until nothing is deliverable. A poll loop expires commands past their TTL and
starts workers for scheduled (``not_before``) commands that became due.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from edge.broker import EdgeBroker
from edge.buffer_types import now_ms
from edge.commands_model import device_payload
from edge.commands_store import CommandStore

__all__ = ["AmqttDeviceLink", "DeviceLink", "Downlink"]

log = logging.getLogger(__name__)


class DeviceLink(Protocol):
    """How the downlink reaches devices.

    Contract: ``publish`` sends one QoS 1 PUBLISH to the device's current connection and
    returns True only when the device PUBACKed it; False when the device is not connected,
    the connection ended or no PUBACK came in time. It never raises for those cases.
    """

    def is_connected(self, device_id: str) -> bool: ...

    async def publish(self, device_id: str, topic: str, payload: bytes) -> bool: ...


class AmqttDeviceLink:
    """:class:`DeviceLink` over the embedded broker: amqtt's handler ``mqtt_publish`` on the
    device's live connection (private amqtt API, pinned 0.12.1; see docs/edge-broker.md)."""

    def __init__(self, broker: EdgeBroker | None = None) -> None:
        self.broker = broker
        """Set once the broker exists (the broker's observer is built before it)."""

    def _handler(self, device_id: str) -> Any:
        amqtt = None if self.broker is None else self.broker.amqtt_broker
        if amqtt is None:
            return None
        handler = amqtt.edge.live.get(device_id)
        if handler is None or handler._closing:
            return None
        return handler

    def is_connected(self, device_id: str) -> bool:
        return self._handler(device_id) is not None

    async def publish(self, device_id: str, topic: str, payload: bytes) -> bool:
        handler = self._handler(device_id)
        if handler is None:
            return False
        try:
            # Waits for the PUBACK (amqtt gives up after 5 s and drops the in-flight entry).
            message = await handler.mqtt_publish(topic, payload, 1, False)
        except Exception as exc:  # amqtt raises its own errors, TimeoutError, OSError...
            log.info("command publish to %s not acknowledged: %r", device_id, exc)
            return False
        return message.puback_packet is not None


class Downlink:
    """Delivers commands. ``run()`` until cancelled; tell it about connections."""

    def __init__(
        self,
        store: CommandStore,
        link: DeviceLink,
        *,
        device_topic: str,
        poll_interval_s: float,
        retry_interval_s: float,
    ) -> None:
        self._store = store
        self._link = link
        self._device_topic = device_topic
        self._poll = poll_interval_s
        self._retry = retry_interval_s
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self.delivered = 0
        self.attempts = 0
        self.unacknowledged = 0

    # -- observer (edge.ingest.SessionObserver) ----------------------------------------

    def device_connected(self, device_id: str, peer: str) -> None:
        self.wake([device_id])

    def device_disconnected(self, device_id: str) -> None:
        """Nothing to do: an in-flight publish fails and the command stays pending."""

    def wake(self, device_ids: list[str]) -> None:
        """New work (or a new connection) for these devices: look now, not at the next poll."""
        if device_ids:
            self._wake.set()

    # -- loops -----------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            while True:
                now = now_ms()
                self._wake.clear()
                try:
                    await self._store.expire_due(now)
                    ready = await self._store.ready_devices(now)
                except Exception:  # the store failed (disk, I/O): try again next poll
                    log.exception("command delivery poll failed")
                    ready = []
                for device_id in ready:
                    if device_id in self._workers or not self._link.is_connected(device_id):
                        continue
                    self._workers[device_id] = tasks.create_task(
                        self._deliver(device_id), name=f"downlink:{device_id}"
                    )
                try:
                    async with asyncio.timeout(self._poll):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _deliver(self, device_id: str) -> None:
        topic = self._device_topic.replace("{device_id}", device_id)
        try:
            while self._link.is_connected(device_id):
                command = await self._store.next_for(device_id, now_ms())
                if command is None:
                    return
                await self._store.attempt(command.command_id)
                self.attempts += 1
                payload = device_payload(
                    command.command_id,
                    command.name,
                    command.params_json,
                    command.expires_ms,
                    command.attempts + 1,
                )
                if await self._link.publish(device_id, topic, payload):
                    await self._store.delivered(command)
                    self.delivered += 1
                    continue
                self.unacknowledged += 1
                if not self._link.is_connected(device_id):
                    return  # held until the device's next connection
                await asyncio.sleep(self._retry)  # connected but silent: retry later
        except Exception:
            # One device's failure must not stop the others; the poll loop restarts it.
            log.exception("command delivery to %s failed", device_id)
        finally:
            self._workers.pop(device_id, None)
