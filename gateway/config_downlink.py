"""Config sections of the downlink: commands, firmware, device lifecycle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from gateway.config_base import TOPIC_PATTERN, ConfigModel, ExistingFile

__all__ = ["CommandsConfig", "FirmwareConfig", "LifecycleConfig"]


class CommandsConfig(ConfigModel):
    """Downlink commands from Kafka to devices (docs/commands.md). Absent section: off."""

    topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._{}-]{1,249}$")] = "iot.commands.{gateway_id}"
    """Kafka topic this gateway consumes commands from; ``{gateway_id}`` is replaced. One
    topic per gateway: a gateway only ever sees its own devices' commands. With
    ``tenants.mode = "topic"`` it must contain ``{tenant}``: one topic per tenant, and a
    command for a device of another tenant is rejected."""
    results_topic: Annotated[str, Field(pattern=TOPIC_PATTERN)] = "iot.command-results"
    """Kafka topic for result records (accepted, delivered, executed, failed, expired,
    rejected), key = device id; ``{tenant}`` is the command's tenant."""
    group_id: Annotated[str, Field(min_length=1)] = "tidegate-{gateway_id}"
    """Kafka consumer group; ``{gateway_id}`` is replaced."""
    device_topic: str = "d/{device_id}/cmd"
    """MQTT topic a command is published on (QoS 1); results come back on it plus
    ``/result``."""
    remember_ids: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000
    """Finished commands remembered to recognise a command id seen again (duplicates are
    accepted once); the oldest finished ones are forgotten past this count."""
    max_params_bytes: Annotated[int, Field(ge=64, le=1 << 20)] = 16_384
    """Commands whose JSON ``params`` is larger are rejected."""
    max_ttl_s: Annotated[float, Field(gt=0)] = 30 * 86_400.0
    """Largest accepted ``ttl_s``."""
    reject_unknown_devices: bool = True
    """Reject commands for devices this gateway has never seen (not in its registry)."""
    poll_interval_s: Annotated[float, Field(gt=0, le=5)] = 0.25
    """How often scheduled (``not_before``) and expired commands are looked at."""
    retry_interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """A connected device that did not PUBACK a command gets it again after this."""
    max_commands_per_poll: Annotated[int, Field(ge=1, le=100_000)] = 500
    """Most Kafka records taken (and stored in one transaction) at a time."""

    @field_validator("device_topic")
    @classmethod
    def _device_level(cls, value: str) -> str:
        if value.split("/").count("{device_id}") != 1 or any(c in value for c in "+#"):
            raise ValueError("must contain {device_id} once as a whole level, no wildcards")
        return value

    def kafka_topic(self, gateway_id: str) -> str:
        """The command topic of a gateway."""
        return self.topic.replace("{gateway_id}", gateway_id)

    def kafka_group(self, gateway_id: str) -> str:
        """The consumer group of a gateway."""
        return self.group_id.replace("{gateway_id}", gateway_id)


class FirmwareConfig(ConfigModel):
    """Firmware releases and staged rollouts (docs/firmware.md). Absent section: off."""

    releases_topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "iot.firmware"
    """Kafka topic releases are published to (fleet-wide; every gateway reads it)."""
    control_topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._{}-]{1,249}$")] = (
        "iot.firmware-control.{gateway_id}"
    )
    """Kafka topic of this gateway's campaign operations; ``{gateway_id}`` is replaced."""
    status_topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "iot.firmware-status"
    """Kafka topic for release, campaign and device progress records."""
    group_id: Annotated[str, Field(min_length=1)] = "tidegate-fw-{gateway_id}"
    """Kafka consumer group; ``{gateway_id}`` is replaced."""
    trusted_keys: Annotated[list[ExistingFile], Field(min_length=1)]
    """Ed25519 public keys (PEM) whose signatures are accepted on releases."""
    cache_dir: Path = Path("firmware")
    """Content-addressed image cache; relative paths are taken from ``gateway.data_dir``."""
    cache_max_bytes: Annotated[int, Field(ge=1 << 20)] = 256 << 20
    """Cap on cached images; it is set aside from ``buffer.max_bytes`` (the disk bound)."""
    max_image_bytes: Annotated[int, Field(ge=1024)] = 64 << 20
    """Larger releases are refused."""
    device_topic: str = "d/{device_id}/fw"
    """Device firmware topics: ``/offer`` and ``/chunk`` (gateway to device), ``/req`` and
    ``/status`` (device to gateway)."""
    device_chunk_bytes: Annotated[int, Field(ge=512, le=256 << 10)] = 32 << 10
    """Chunk size served to devices over MQTT."""
    default_rings: Annotated[list[float], Field(min_length=1)] = [1.0, 10.0, 50.0, 100.0]
    """Cumulative percent of the campaign's devices reached by each ring."""
    default_failure_threshold: Annotated[float, Field(ge=0, le=1)] = 0.1
    """A campaign pauses itself when more than this share of a ring failed."""
    device_timeout_s: Annotated[float, Field(gt=0)] = 3600.0
    """A device offered an update that has not finished after this counts as failed."""
    tick_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """How often campaigns are evaluated (ring gates, timeouts, offers)."""
    max_parallel_chunks: Annotated[int, Field(ge=1, le=1024)] = 16
    """Chunk responses being sent at once."""
    max_queued_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    """Chunk requests waiting to be served; beyond it a request is dropped (counted; the
    device asks again after its timeout)."""

    @field_validator("device_topic")
    @classmethod
    def _fw_device_level(cls, value: str) -> str:
        if value.split("/").count("{device_id}") != 1 or any(c in value for c in "+#"):
            raise ValueError("must contain {device_id} once as a whole level, no wildcards")
        return value

    @field_validator("default_rings")
    @classmethod
    def _rings(cls, value: list[float]) -> list[float]:
        if any(not 0 < p <= 100 for p in value) or value != sorted(value) or value[-1] != 100:
            raise ValueError("ascending percents in (0, 100], the last one 100")
        return value


class LifecycleConfig(ConfigModel):
    """Device connect/disconnect events and the gateway heartbeat to Kafka
    (docs/lifecycle.md). Absent section: off."""

    enabled: bool = True
    """Record lifecycle events and heartbeats (false keeps the section but turns them off)."""
    topic: Annotated[str, Field(pattern=TOPIC_PATTERN)] = "iot.lifecycle"
    """Kafka topic for connected/disconnected events (key = device id); ``{tenant}`` is the
    device's tenant (required with ``tenants.mode = "topic"``)."""
    heartbeat_topic: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = None
    """Kafka topic for heartbeats (key = gateway id; a heartbeat belongs to the gateway, not
    to a tenant); None: the events' ``topic``, which then must not contain ``{tenant}``."""
    heartbeat_period_s: Annotated[float, Field(ge=0.1, le=86_400)] = 30.0
    """Seconds between heartbeats."""
    heartbeat_ttl_s: Annotated[float | None, Field(gt=0)] = 300.0
    """A heartbeat not yet in Kafka after this long is dropped (recorded in the drop
    ledger): a backlog of stale heartbeats tells the cloud nothing. None: keep them."""
    priority: Annotated[int, Field(ge=0, le=9)] = 9
    """Forwarding priority of events and heartbeats (tiny; highest by default)."""

    @model_validator(mode="after")
    def _gateway_heartbeat_topic(self) -> LifecycleConfig:
        if "{tenant}" in self.topic and self.heartbeat_topic is None:
            raise ValueError("topic has {tenant}: set heartbeat_topic (heartbeats have no tenant)")
        return self
