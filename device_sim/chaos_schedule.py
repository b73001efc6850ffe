"""The chaos harness's fault schedule: pure, seeded, unit-tested without any process.

A schedule is a list of :class:`PlannedFault` (when, what, how long to hold it) spread over
the load window ``[warmup_s, duration_s - tail_s]``: the faults are shuffled with the seed,
the window is cut into one slot per fault and each fault starts at a seeded point in the
first half of its slot. The same seed and spec always give the same schedule. Faults run
one after another; one that overruns delays the next (the harness records both times).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import TidegateError

__all__ = [
    "FAULT_KINDS",
    "FaultSpec",
    "PlannedFault",
    "ScheduleError",
    "build_schedule",
    "estimated_cost_s",
    "parse_fault_counts",
]

FAULT_KINDS: tuple[str, ...] = (
    "gateway_kill",
    "broker_restart",
    "leader_kill",
    "proxy_cut",
    "disk_full",
    "storm",
)
"""gateway_kill: SIGKILL the gateway with rows in its buffer, restart it.
broker_restart: SIGTERM one Kafka node (data kept), hold, start it again.
leader_kill: SIGKILL the node leading most written partitions, hold, start it again.
proxy_cut: close every bridge↔Kafka connection and refuse new ones, hold, restore.
disk_full: with a size-capped buffer, hold Kafka back until the buffer is full, then restore.
storm: every device connection dropped at once (all reconnect together) plus a burst fleet."""

_HOLD_S: dict[str, tuple[float, float]] = {
    "gateway_kill": (0.0, 0.0),
    "broker_restart": (3.0, 10.0),
    "leader_kill": (5.0, 15.0),
    "proxy_cut": (4.0, 12.0),
    "disk_full": (3.0, 6.0),
    "storm": (0.0, 0.0),
}
"""How long a fault is held (seconds, uniform), before the harness undoes it."""

_OVERHEAD_S: dict[str, float] = {
    "gateway_kill": 5.0,  # find rows, kill, start a new gateway process
    "broker_restart": 15.0,  # controlled shutdown + JVM start
    "leader_kill": 15.0,
    "proxy_cut": 2.0,
    "disk_full": 30.0,  # filling the capped buffer, then seeing acks resume
    "storm": 5.0,
}


class ScheduleError(TidegateError, ValueError):
    """The fault mix does not fit the run (message names the option)."""


@dataclass(frozen=True)
class FaultSpec:
    """What to schedule: counts per fault kind over a load window."""

    duration_s: float
    counts: Mapping[str, int]
    warmup_s: float = 15.0
    """No fault before this: devices connect and traffic settles."""
    tail_s: float = 20.0
    """No fault in the last seconds of load: devices finish while the gateway is up."""


@dataclass(frozen=True)
class PlannedFault:
    """One fault of the schedule."""

    index: int
    kind: str
    at_s: float
    """Seconds after the load started."""
    hold_s: float
    """How long the fault stays before it is undone (0: instantaneous)."""


def parse_fault_counts(spec: str) -> dict[str, int]:
    """``"gateway_kill=6,proxy_cut=2"`` → counts (kinds not named are 0). Dashes work too."""
    counts = dict.fromkeys(FAULT_KINDS, 0)
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        kind = name.strip().replace("-", "_")
        if not sep or kind not in counts:
            raise ScheduleError(
                f"--faults: {part!r}: expected KIND=COUNT with KIND one of {', '.join(FAULT_KINDS)}"
            )
        try:
            count = int(value)
        except ValueError:
            raise ScheduleError(f"--faults: {part!r}: count is not an integer") from None
        if count < 0:
            raise ScheduleError(f"--faults: {part!r}: count must be >= 0")
        counts[kind] = count
    return counts


def estimated_cost_s(kind: str, hold_s: float) -> float:
    """Rough wall time a fault takes, hold included (used to reject over-full schedules)."""
    return _OVERHEAD_S[kind] + hold_s


def build_schedule(spec: FaultSpec, seed: int) -> tuple[PlannedFault, ...]:
    """The seeded schedule for ``spec``; raises :class:`ScheduleError` if it cannot fit."""
    unknown = sorted(set(spec.counts) - set(FAULT_KINDS))
    if unknown:
        raise ScheduleError(f"--faults: unknown fault kinds {', '.join(unknown)}")
    if spec.duration_s <= 0 or spec.warmup_s < 0 or spec.tail_s < 0:
        raise ScheduleError("--duration must be > 0 (warm-up and tail >= 0)")
    window = spec.duration_s - spec.warmup_s - spec.tail_s
    kinds = [kind for kind in FAULT_KINDS for _ in range(spec.counts.get(kind, 0))]
    if not kinds:
        return ()
    if window <= 0:
        raise ScheduleError(
            f"--duration {spec.duration_s:g}s leaves no room for faults after "
            f"{spec.warmup_s:g}s warm-up and {spec.tail_s:g}s tail"
        )
    rng = random.Random(seed)
    rng.shuffle(kinds)
    holds = [round(rng.uniform(*_HOLD_S[kind]), 2) for kind in kinds]
    cost = sum(estimated_cost_s(kind, hold) for kind, hold in zip(kinds, holds, strict=True))
    if cost > window:
        raise ScheduleError(
            f"--faults: about {cost:.0f}s of faults do not fit the {window:.0f}s window "
            f"(--duration minus warm-up and tail): lengthen --duration or inject fewer faults"
        )
    slot = window / len(kinds)
    return tuple(
        PlannedFault(
            index=i,
            kind=kind,
            at_s=round(spec.warmup_s + i * slot + rng.uniform(0.0, slot / 2), 2),
            hold_s=hold,
        )
        for i, (kind, hold) in enumerate(zip(kinds, holds, strict=True))
    )
