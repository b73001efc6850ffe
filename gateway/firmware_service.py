"""Firmware wired together: Kafka intake (releases, campaign operations), the cache and
campaign state in SQLite, serving to devices, and the progress outbox to Kafka.

Built by :class:`gateway.app.Gateway` when the config has a ``[firmware]`` section.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bridge.firmware_in import FirmwareConsumer
from bridge.firmware_out import FirmwareStatusSender
from edge.broker import EdgeBroker
from edge.buffer import Buffer
from edge.firmware_model import FirmwareFormatError, load_public_key
from edge.firmware_serve import FirmwareEngine, FirmwareLink
from edge.firmware_store import FirmwareStore
from edge.firmware_wire import ControlOp
from edge.ingest import SessionObserver
from edge.intake import Intake
from gateway.config import FirmwareConfig, GatewayConfig
from gateway.errors import ConfigError

__all__ = ["FirmwareService", "load_trusted_keys"]


def load_trusted_keys(config: FirmwareConfig) -> list[Ed25519PublicKey]:
    keys, errors = [], []
    for index, path in enumerate(config.trusted_keys):
        try:
            keys.append(load_public_key(path.read_bytes()))
        except (OSError, FirmwareFormatError) as exc:
            errors.append((f"firmware.trusted_keys.{index}", f"{path}: {exc}"))
    if errors:
        raise ConfigError("firmware", errors)
    return keys


class _Observers:
    """The broker's connection events to the previous observer, then the firmware engine."""

    def __init__(self, first: SessionObserver, then: SessionObserver) -> None:
        self._first, self._then = first, then

    def device_connected(self, device_id: str, peer: str) -> None:
        self._first.device_connected(device_id, peer)
        self._then.device_connected(device_id, peer)

    def device_disconnected(self, device_id: str) -> None:
        self._first.device_disconnected(device_id)
        self._then.device_disconnected(device_id)


class FirmwareService:
    """Everything the firmware feature runs."""

    def __init__(self, config: GatewayConfig, firmware: FirmwareConfig, buffer: Buffer) -> None:
        if firmware.cache_max_bytes > config.buffer.max_bytes // 2:
            raise ConfigError(
                "firmware",
                [
                    (
                        "firmware.cache_max_bytes",
                        "at most half of buffer.max_bytes (it is set aside from that bound)",
                    )
                ],
            )
        gateway_id = config.gateway.id
        cache_dir = firmware.cache_dir
        if not cache_dir.is_absolute():
            cache_dir = config.gateway.data_dir / cache_dir
        self.config = firmware
        self.store = FirmwareStore(buffer, cache_dir, cache_max_bytes=firmware.cache_max_bytes)
        self._link = FirmwareLink()
        self.engine = FirmwareEngine(self.store, self._link, firmware)
        self.sender = FirmwareStatusSender(
            config.kafka, topic=firmware.status_topic, gateway_id=gateway_id, store=self.store
        )
        self.consumer = FirmwareConsumer(
            config.kafka,
            firmware,
            gateway_id=gateway_id,
            store=self.store,
            trusted=load_trusted_keys(firmware),
            on_control=self._control,
            on_rejected=self._rejected,
        )

    async def _control(self, op: ControlOp) -> str | None:
        reason = await self.engine.control(op)
        self.sender.added()
        return reason

    async def _rejected(self, campaign_id: str, reason: str) -> None:
        await self.store.rejected(campaign_id, reason)
        self.sender.added()

    def observer(self, previous: SessionObserver) -> SessionObserver:
        return _Observers(previous, self.engine)

    def attach(self, broker: EdgeBroker, intake: Intake) -> None:
        self._link.broker = broker
        intake.route_firmware(self.config.device_topic, self.engine.submit)

    async def run(self) -> None:
        await self.store.open()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.engine.run(), name="firmware-engine")
            tasks.create_task(self.consumer.run(), name="firmware-consumer")
            tasks.create_task(self.sender.run(), name="firmware-status-out")

    async def close(self, deadline: float) -> None:
        await self.sender.close(deadline)

    def status(self) -> dict[str, Any]:
        return {
            **self.engine.stats,
            "cache_bytes": self.store.cache_bytes,
            "releases_cached": self.consumer.releases_cached,
            "releases_refused": self.consumer.releases_refused,
            "consumer_error": self.consumer.last_error,
            "status_sent": self.sender.sent,
            "status_error": self.sender.last_error,
        }
