"""The ``[quotas]`` config section: per-device rate, size and subscription limits and the
connection rate limit per source address (docs/security.md, "Quotas").

The defaults are generous (a well-behaved device never meets them; the benchmarks and tests
run far below); an operator tightens them, globally or per device under
``[quotas.devices.<device_id>]``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.quotas import QuotaLimits, QuotaSettings

__all__ = ["DeviceQuotaConfig", "QuotasConfig"]

_Rate = Annotated[float, Field(gt=0)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class DeviceQuotaConfig(_Model):
    """Limits of one device; a field left out takes the ``[quotas]`` value."""

    messages_per_s: _Rate | None = None
    """Sustained PUBLISH packets per second (token bucket)."""
    messages_burst: _Rate | None = None
    """Publishes a device may send at once before the rate applies (bucket size)."""
    bytes_per_s: _Rate | None = None
    """Sustained payload bytes per second (token bucket)."""
    bytes_burst: _Rate | None = None
    """Payload bytes a device may send at once (bucket size); at least ``max_payload_bytes``."""
    max_payload_bytes: Annotated[int, Field(ge=0)] | None = None
    """Largest PUBLISH payload; larger ones are handled by ``on_oversize``."""
    max_subscriptions: Annotated[int, Field(ge=0)] | None = None
    """Topic filters a device may hold; further SUBSCRIBE filters get SUBACK 0x80."""


class QuotasConfig(_Model):
    """Device quotas (what happens on excess: ``policy`` / ``on_oversize``, counted in
    ``tidegate status``, logged rate-limited and written to the audit log)."""

    enabled: bool = True
    """False turns every quota off (no per-publish check at all)."""
    policy: Literal["throttle", "disconnect"] = "throttle"
    """Over ``messages_per_s`` / ``bytes_per_s``: ``throttle`` stops reading the device's
    socket until its tokens refill (nothing dropped, nothing acknowledged early);
    ``disconnect`` closes the connection without acknowledging the publish."""
    on_oversize: Literal["disconnect", "puback_discard"] = "disconnect"
    """Payload over ``max_payload_bytes``: close the connection (MQTT 3.1.1 cannot refuse a
    PUBLISH), or acknowledge it and store nothing (a drop, counted and audited)."""
    messages_per_s: _Rate | None = 5_000.0
    """Sustained PUBLISH packets per second per device; None: unlimited."""
    messages_burst: _Rate = 10_000.0
    """Bucket size of ``messages_per_s``."""
    bytes_per_s: _Rate | None = float(64 << 20)
    """Sustained payload bytes per second per device; None: unlimited."""
    bytes_burst: _Rate = float(128 << 20)
    """Bucket size of ``bytes_per_s``; at least ``max_payload_bytes``."""
    max_payload_bytes: Annotated[int, Field(ge=0)] | None = 1 << 20
    """Largest PUBLISH payload per device (packets over ``max_packet_size`` are refused
    before they are read anyway); None: no separate limit."""
    max_subscriptions: Annotated[int, Field(ge=0)] | None = 1_000
    """Topic filters one device id may hold."""
    connections_per_s: _Rate | None = 500.0
    """New TCP connections per second per source address (checked before CONNECT is read;
    over it the socket is closed at once); None: unlimited. Devices behind one NAT share it."""
    connections_burst: _Rate = 20_000.0
    """Bucket size of ``connections_per_s`` (a fleet reconnecting after an outage)."""
    devices: dict[str, DeviceQuotaConfig] = {}
    """Per device id overrides."""

    @model_validator(mode="after")
    def _burst_holds_a_payload(self) -> QuotasConfig:
        for name, limits in [("", self.limits()), *self._device_limits()]:
            payload, burst = limits.max_payload_bytes, limits.bytes_burst
            if limits.bytes_per_s is not None and payload is not None and burst < payload:
                where = f"devices.{name}." if name else ""
                raise ValueError(
                    f"{where}bytes_burst ({burst:g}) is smaller than max_payload_bytes "
                    f"({payload}): such a payload could never be sent"
                )
        return self

    def limits(self, device: DeviceQuotaConfig | None = None) -> QuotaLimits:
        """The effective limits of a device (``device`` overrides the section's values)."""
        own = device.model_dump(exclude_none=True) if device is not None else {}
        base = {
            "messages_per_s": self.messages_per_s,
            "messages_burst": self.messages_burst,
            "bytes_per_s": self.bytes_per_s,
            "bytes_burst": self.bytes_burst,
            "max_payload_bytes": self.max_payload_bytes,
            "max_subscriptions": self.max_subscriptions,
        }
        return QuotaLimits(**{**base, **own})

    def _device_limits(self) -> list[tuple[str, QuotaLimits]]:
        return [(name, self.limits(device)) for name, device in self.devices.items()]

    def settings(self) -> QuotaSettings | None:
        """What :class:`edge.quotas.Quotas` takes; None when quotas are disabled."""
        if not self.enabled:
            return None
        return QuotaSettings(
            policy=self.policy,
            on_oversize=self.on_oversize,
            default=self.limits(),
            devices=dict(self._device_limits()),
            connections_per_s=self.connections_per_s,
            connections_burst=self.connections_burst,
        )
