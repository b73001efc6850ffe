"""What one simulated device does over time, decided up front from the options and profile.

Pure: :func:`plan_for` turns (options, device index) into a :class:`DevicePlan` — its id,
classes, sensor, rate, connect time, its own list of offline windows and storm drops, and its
misbehaviour shares. :mod:`device_sim.device` only executes the plan, so the rules are
testable without sockets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from device_sim.options import FleetOptions, device_id
from device_sim.profile import Misbehave, Profile, is_hit
from device_sim.sensors import SensorKind

__all__ = ["DeviceEvent", "DevicePlan", "Misbehaviour", "plan_for"]

Misbehaviour = Literal["garbage", "oversized", "wrong_topic"]


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Something that happens to this device at ``at_s`` seconds after the fleet started."""

    at_s: float
    kind: Literal["offline", "storm"]
    seconds: float
    """offline: how long it stays away; storm: delay before it reconnects."""


@dataclass(slots=True)
class DevicePlan:
    """One device's static behaviour plus the cursor into its events."""

    device_id: str
    type_name: str
    rate: float
    classes: tuple[tuple[str, float], ...]
    sensor: SensorKind
    encoding: Literal["json", "cbor"]
    payload_size: int
    connect_at_s: float | None
    """Seconds after the start to connect; None: the options' per-process ramp."""
    misbehave: Misbehave
    events: list[DeviceEvent] = field(default_factory=list)
    profile: Profile | None = None
    index: int = 0

    def next_event_at(self) -> float | None:
        """When the next event is due (seconds after the start), None if none left."""
        return self.events[0].at_s if self.events else None

    def pop_due(self, t: float) -> DeviceEvent | None:
        """The next event if it is due at ``t``, removed from the plan."""
        if self.events and self.events[0].at_s <= t:
            return self.events.pop(0)
        return None

    def interval(self, t: float) -> float:
        """Seconds between messages at ``t`` (bursts included); 0 = unpaced."""
        if self.rate <= 0:
            return 0.0
        factor = (
            1.0
            if self.profile is None
            else self.profile.burst_factor(self.type_name, self.index, t)
        )
        return 1.0 / (self.rate * factor)

    def pick_misbehaviour(self, rng: random.Random) -> Misbehaviour | None:
        """Whether the next message is a bad one, and which kind."""
        m = self.misbehave
        if not m.any:
            return None
        x = rng.random()
        if x < m.garbage:
            return "garbage"
        if x < m.garbage + m.oversized:
            return "oversized"
        if x < m.garbage + m.oversized + m.wrong_topic:
            return "wrong_topic"
        return None


def plan_for(options: FleetOptions, index: int, rng: random.Random) -> DevicePlan:
    """The plan of global device ``index`` (its ``rng`` draws storm reconnect delays)."""
    profile = options.profile
    if profile is None:
        return DevicePlan(
            device_id=device_id(options.prefix, index),
            type_name="device",
            rate=options.rate,
            classes=options.classes,
            sensor="filler",
            encoding="cbor",
            payload_size=options.payload_size,
            connect_at_s=None,
            misbehave=Misbehave(),
            index=index,
        )
    kind, position = profile.type_of(index)
    ramp = kind.connect_rate if kind.connect_rate is not None else options.connect_rate
    events: list[DeviceEvent] = []
    for n, window in enumerate(profile.offline):
        if is_hit(window, kind.name, index, 1000 + n):
            events.append(DeviceEvent(window.at_s, "offline", window.duration_s))
    for n, storm in enumerate(profile.reconnect_storms):
        if is_hit(storm, kind.name, index, 2000 + n):
            events.append(DeviceEvent(storm.at_s, "storm", rng.uniform(0, storm.spread_s)))
    events.sort(key=lambda e: e.at_s)
    return DevicePlan(
        device_id=device_id(kind.id_prefix, index),
        type_name=kind.name,
        rate=kind.rate,
        classes=tuple(kind.classes.items()),
        sensor=kind.sensor,
        encoding=kind.encoding,
        payload_size=kind.payload_size,
        connect_at_s=kind.connect_after_s + (position / ramp if ramp > 0 else 0.0),
        misbehave=kind.misbehave,
        events=events,
        profile=profile,
        index=index,
    )
