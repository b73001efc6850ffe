"""Downlink commands wired together: Kafka intake, SQLite store, delivery, results outbox.

Built by :class:`gateway.app.Gateway` when the config has a ``[commands]`` section. Its
loops run in one task group under :meth:`CommandService.run`; the results producer is
stopped by :meth:`close` within the shutdown deadline.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.commands_in import CommandConsumer
from bridge.commands_out import ResultSender
from edge.broker import EdgeBroker
from edge.buffer import Buffer
from edge.commands_store import CommandStore
from edge.downlink import AmqttDeviceLink, Downlink
from edge.ingest import SessionObserver
from edge.intake import Intake
from edge.tenants import TenantMap
from gateway.config import CommandsConfig, GatewayConfig

__all__ = ["CommandService"]


class _Observers:
    """Fans the broker's connection events out (registry first, then the downlink)."""

    def __init__(self, *observers: SessionObserver) -> None:
        self._observers = observers

    def device_connected(self, device_id: str, peer: str) -> None:
        for observer in self._observers:
            observer.device_connected(device_id, peer)

    def device_disconnected(self, device_id: str) -> None:
        for observer in self._observers:
            observer.device_disconnected(device_id)


class CommandService:
    """Everything the commands feature runs."""

    def __init__(
        self,
        config: GatewayConfig,
        commands: CommandsConfig,
        buffer: Buffer,
        tenants: TenantMap | None = None,
    ) -> None:
        gateway_id = config.gateway.id
        self.config = commands
        self.store = CommandStore(
            buffer,
            remember_ids=commands.remember_ids,
            reject_unknown_devices=commands.reject_unknown_devices,
        )
        self._link = AmqttDeviceLink()
        self.downlink = Downlink(
            self.store,
            self._link,
            device_topic=commands.device_topic,
            poll_interval_s=commands.poll_interval_s,
            retry_interval_s=commands.retry_interval_s,
        )
        self.consumer = CommandConsumer(
            config.kafka,
            commands,
            gateway_id=gateway_id,
            store=self.store,
            on_stored=self.downlink.wake,
            tenants=tenants,
        )
        self.sender = ResultSender(
            config.kafka,
            topic=commands.results_topic,
            gateway_id=gateway_id,
            store=self.store,
            tenants=tenants,
        )

    def observer(self, registry: SessionObserver) -> SessionObserver:
        """The broker's observer: the registry, then the downlink."""
        return _Observers(registry, self.downlink)

    def attach(self, broker: EdgeBroker, intake: Intake) -> None:
        """Deliver through ``broker``; take device results out of ``intake``."""
        self._link.broker = broker
        intake.route_command_results(
            self.config.device_topic + "/result", self.store.submit_device_result
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.store.run(), name="commands-results-in")
            tasks.create_task(self.downlink.run(), name="commands-downlink")
            tasks.create_task(self.consumer.run(), name="commands-consumer")
            tasks.create_task(self.sender.run(), name="commands-results-out")

    async def close(self, deadline: float) -> None:
        await self.sender.close(deadline)

    def status(self) -> dict[str, Any]:
        return {
            "consumed": self.consumer.consumed,
            "consumer_error": self.consumer.last_error,
            "delivery_attempts": self.downlink.attempts,
            "delivered": self.downlink.delivered,
            "unacknowledged": self.downlink.unacknowledged,
            "results_sent": self.sender.sent,
            "results_error": self.sender.last_error,
            "invalid_device_results": self.store.invalid_device_results,
        }
