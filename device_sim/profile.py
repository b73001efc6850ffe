"""Simulator profiles: a TOML file describing a mixed fleet and what happens to it over time.

``tidegate sim --profile configs/sim/plant.toml``. A profile lists device types (how many,
how fast, which sensor, JSON or CBOR readings, when they connect, whether they misbehave) and
timed events (bursts, offline windows, reconnect storms). It is validated with frozen pydantic
models; errors name the field path (``device_types.1.rate: …``).

Device *i* of the fleet (0-based over all types, in file order) belongs to the type whose
range holds *i*; its id is ``{type.prefix}{i:05d}``. Shards split that global index range, so
every process knows each of its devices' type without talking to the others.

Which devices an event hits is decided from the device index and the event's position only
(:func:`is_hit`), so it is the same in every process and run, whatever ``--seed`` says.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_sim.options import FleetOptions, SimOptionsError

__all__ = [
    "Burst",
    "apply_profile",
    "DeviceType",
    "FleetSettings",
    "Misbehave",
    "Offline",
    "Profile",
    "ReconnectStorm",
    "is_hit",
    "load_profile",
]

_NAME = r"^[a-z][a-z0-9_-]{0,31}$"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Misbehave(_Model):
    """Shares of a device's messages that are bad on purpose (sent QoS0, never in the ledger)."""

    garbage: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Random bytes instead of an envelope, on the device's own uplink topic."""
    oversized: Annotated[float, Field(ge=0, le=1)] = 0.0
    """A payload of ``oversized_bytes`` (above the gateway's ``max_packet_size``: it closes
    the connection and the device reconnects)."""
    wrong_topic: Annotated[float, Field(ge=0, le=1)] = 0.0
    """A valid envelope on another device's uplink topic or outside ``d/`` (topic ACL)."""
    oversized_bytes: Annotated[int, Field(ge=1, le=16 << 20)] = 1_100_000
    """Size of an oversized payload."""

    @model_validator(mode="after")
    def _shares(self) -> Self:
        if self.garbage + self.oversized + self.wrong_topic > 1:
            raise ValueError("garbage + oversized + wrong_topic must be <= 1")
        return self

    @property
    def any(self) -> bool:
        """True when some messages misbehave."""
        return bool(self.garbage or self.oversized or self.wrong_topic)


class DeviceType(_Model):
    """One kind of device and how many of it."""

    name: Annotated[str, Field(pattern=_NAME)]
    """Type name (reports, event ``types`` lists)."""
    count: Annotated[int, Field(ge=1, le=1_000_000)]
    """Devices of this type."""
    prefix: Annotated[str | None, Field(pattern=r"^[^/+#]{1,32}$")] = None
    """Device id prefix; default ``{name}-``."""
    rate: Annotated[float, Field(ge=0, le=10_000)] = 1.0
    """Messages per second per device; 0 = as fast as the in-flight window allows."""
    classes: dict[Annotated[str, Field(pattern=_NAME)], Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: {"telemetry": 1.0}, min_length=1
    )
    """Message classes with weights; each message picks one by weight."""
    sensor: Literal["temperature", "vibration", "gps", "filler"] = "temperature"
    """What the envelope ``body`` holds: a noisy reading of this sensor, or random filler."""
    encoding: Literal["json", "cbor"] = "cbor"
    """How a reading is encoded inside the envelope body (the envelope itself is CBOR)."""
    payload_size: Annotated[int, Field(ge=0, le=1 << 20)] = 64
    """Bytes of filler (``sensor = "filler"``), or vibration samples x 4."""
    connect_after_s: Annotated[float, Field(ge=0, le=86_400)] = 0.0
    """Seconds after the start before this type's first device connects (staggered types)."""
    connect_rate: Annotated[float | None, Field(gt=0)] = None
    """Connects per second within this type (default: the fleet's ``connect_rate``)."""
    misbehave: Misbehave = Misbehave()
    """Bad messages on purpose."""

    @property
    def id_prefix(self) -> str:
        """The prefix device ids of this type start with."""
        return self.prefix if self.prefix is not None else f"{self.name}-"


class _Event(_Model):
    types: list[Annotated[str, Field(pattern=_NAME)]] = []
    """Device types affected; empty = all."""
    share: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Share of those devices affected (chosen per device index, stable across runs)."""


class Burst(_Event):
    """Rate x ``factor`` for a while (devices with ``rate = 0`` are already at full speed)."""

    at_s: Annotated[float, Field(ge=0)]
    """Start, seconds after the fleet started."""
    duration_s: Annotated[float, Field(gt=0)] = 60.0
    """How long the burst lasts."""
    factor: Annotated[float, Field(gt=0, le=1000)] = 10.0
    """Rate multiplier."""


class Offline(_Event):
    """Devices disconnect cleanly, stay away, then reconnect (and resend what was un-acked)."""

    at_s: Annotated[float, Field(ge=0)]
    """Start, seconds after the fleet started."""
    duration_s: Annotated[float, Field(gt=0)]
    """How long they stay offline."""


class ReconnectStorm(_Event):
    """Devices lose their TCP connection at once (no DISCONNECT) and all reconnect."""

    at_s: Annotated[float, Field(ge=0)]
    """When, seconds after the fleet started."""
    spread_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    """Reconnects are spread uniformly over this many seconds (0: all at once)."""


class FleetSettings(_Model):
    """Run-wide settings; a command-line option given explicitly overrides each one."""

    duration_s: Annotated[float | None, Field(gt=0)] = None
    """Seconds of publishing (exclusive with ``count``; default: 60 s)."""
    count: Annotated[int | None, Field(ge=1)] = None
    """Messages per device instead of a duration."""
    qos: Literal[0, 1] = 1
    """QoS of the good messages."""
    processes: Annotated[int, Field(ge=1, le=64)] = 1
    """Worker processes."""
    spread_source_addresses: bool = False
    """One 127.x.y.z source address per device."""
    connect_rate: Annotated[float, Field(ge=0)] = 500.0
    """Connects started per second per type (0 = all at once)."""
    connect_concurrency: Annotated[int, Field(ge=1, le=1024)] = 64
    """Connects in progress at once, per process."""
    inflight: Annotated[int, Field(ge=1, le=65535)] = 20
    """Un-acked publishes per device."""
    drain_timeout_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    """Seconds to wait for the last PUBACKs."""
    linger_s: Annotated[float, Field(ge=0, le=86_400)] = 0.0
    """Stay connected this long after the last PUBACK."""
    keepalive: Annotated[int, Field(ge=5, le=65535)] = 60
    """MQTT keep-alive, seconds."""

    @model_validator(mode="after")
    def _bound(self) -> Self:
        if self.duration_s is not None and self.count is not None:
            raise ValueError("give duration_s or count, not both")
        return self


class Profile(_Model):
    """A simulator profile (one TOML file)."""

    fleet: FleetSettings = FleetSettings()
    """Run-wide settings."""
    device_types: list[DeviceType] = Field(min_length=1)
    """Device types, in id order."""
    bursts: list[Burst] = []
    """Rate bursts."""
    offline: list[Offline] = []
    """Offline windows."""
    reconnect_storms: list[ReconnectStorm] = []
    """Reconnect storms."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [t.name for t in self.device_types]
        if len(set(names)) != len(names):
            raise ValueError("device type names must be unique")
        prefixes = [t.id_prefix for t in self.device_types]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("device id prefixes must be unique")
        for kind in ("bursts", "offline", "reconnect_storms"):
            for i, event in enumerate(getattr(self, kind)):
                unknown = sorted(set(event.types) - set(names))
                if unknown:
                    raise ValueError(f"{kind}.{i}.types: unknown {', '.join(unknown)}")
        if self.devices > 1_000_000:
            raise ValueError("more than 1,000,000 devices in total")
        return self

    @property
    def devices(self) -> int:
        """Fleet size: the sum of the types' counts."""
        return sum(t.count for t in self.device_types)

    def type_of(self, index: int) -> tuple[DeviceType, int]:
        """``(type, position within the type)`` of global device ``index``."""
        first = 0
        for kind in self.device_types:
            if index < first + kind.count:
                return kind, index - first
            first += kind.count
        raise IndexError(f"device {index} is outside the profile's {first} devices")

    def burst_factor(self, kind: str, index: int, t: float) -> float:
        """Rate multiplier for a device at ``t`` seconds after the start (bursts multiply)."""
        factor = 1.0
        for n, burst in enumerate(self.bursts):
            if burst.at_s <= t < burst.at_s + burst.duration_s and is_hit(burst, kind, index, n):
                factor *= burst.factor
        return factor


def is_hit(event: _Event, kind: str, index: int, salt: int) -> bool:
    """Whether device ``index`` of type ``kind`` takes part in ``event`` (deterministic)."""
    if event.types and kind not in event.types:
        return False
    if event.share >= 1:
        return True
    # A fixed integer hash (Knuth's multiplicative), not hash(): stable across processes.
    h = ((index + 1) * 2_654_435_761 + (salt + 1) * 40_503) % 4_294_967_296
    return h / 4_294_967_296 < event.share


def load_profile(path: Path) -> Profile:
    """Read and validate a profile; :class:`SimOptionsError` names the file and field path."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SimOptionsError(f"--profile: cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SimOptionsError(f"--profile: {path}: not TOML: {exc}") from None
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SimOptionsError(f"--profile: {path}: {where}: {first['msg']}{more}") from None


_FROM_PROFILE = {
    # CLI parameter name -> FleetOptions / FleetSettings field name
    "qos": "qos",
    "processes": "processes",
    "spread_source_addresses": "spread_source_addresses",
    "connect_rate": "connect_rate",
    "connect_concurrency": "connect_concurrency",
    "inflight": "inflight",
    "drain_timeout": "drain_timeout_s",
    "linger": "linger_s",
}


def apply_profile(options: FleetOptions, profile: Profile, explicit: set[str]) -> FleetOptions:
    """``options`` with the profile's fleet and settings; CLI parameters named in
    ``explicit`` (given on the command line or in the environment) win over the profile."""
    settings = profile.fleet
    changes: dict[str, Any] = {"profile": profile, "keepalive": settings.keepalive}
    if "devices" not in explicit:
        changes["devices"] = profile.devices
    if not {"count", "duration"} & explicit:
        if settings.count is not None:
            changes |= {"count": settings.count, "duration_s": None}
        else:
            changes |= {"count": None, "duration_s": settings.duration_s or 60.0}
    for cli_name, name in _FROM_PROFILE.items():
        if cli_name not in explicit:
            changes[name] = getattr(settings, name)
    return replace(options, **changes)
