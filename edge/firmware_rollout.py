"""Staged rollout and cache decisions: pure functions, no I/O (docs/firmware.md).

- :func:`plan_rings` splits a campaign's devices into rings from cumulative percents, in a
  stable pseudo-random order (hash of campaign and device id), so a restart or a re-plan
  puts every device in the same ring.
- :func:`decide` looks at the current ring and says what the campaign does next: wait,
  pause itself (failures above the threshold), advance to the next ring, or complete.
- :func:`plan_eviction` chooses which cached releases to delete to make room.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CacheEntry",
    "Decision",
    "RingCounts",
    "decide",
    "plan_eviction",
    "plan_rings",
    "protected_releases",
]

TERMINAL_TARGET_STATES = frozenset({"installed", "failed", "aborted"})


def plan_rings(
    campaign_id: str, devices: Iterable[str], percents: Sequence[float]
) -> dict[str, int]:
    """``device -> ring index``. Ring ``i`` holds the devices from ``ceil(p[i-1] * n)`` up to
    ``ceil(p[i] * n)`` of the ordered list, so the rings reach the percents cumulatively; a
    ring can be empty when there are few devices."""
    ordered = sorted(
        set(devices), key=lambda d: hashlib.sha256(f"{campaign_id}\0{d}".encode()).digest()
    )
    n = len(ordered)
    rings: dict[str, int] = {}
    start = 0
    for index, percent in enumerate(percents):
        end = n if index == len(percents) - 1 else min(n, math.ceil(percent / 100 * n))
        for device in ordered[start:end]:
            rings[device] = index
        start = max(start, end)
    return rings


@dataclass(frozen=True, slots=True)
class RingCounts:
    """Targets of one ring by state."""

    size: int
    installed: int = 0
    failed: int = 0
    aborted: int = 0

    @property
    def open(self) -> int:
        """Targets not finished (waiting, offered or downloading)."""
        return self.size - self.installed - self.failed - self.aborted


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["wait", "pause", "advance", "complete"]
    reason: str = ""


def decide(
    *,
    state: str,
    ring: int,
    ring_count: int,
    counts: RingCounts,
    failure_threshold: float,
    accepted_failures: int,
) -> Decision:
    """The next step of a campaign from its current ring's counts.

    The gate of ring ``i + 1`` is ring ``i``'s outcome: the campaign pauses itself as soon
    as the ring's failures (beyond those an operator accepted by resuming) exceed
    ``failure_threshold`` of the ring's size, and advances only once every target of the
    ring finished with failures within the threshold.
    """
    if state != "running":
        return Decision("wait")
    new_failures = counts.failed - accepted_failures
    if counts.size and new_failures > failure_threshold * counts.size:
        return Decision(
            "pause",
            f"ring {ring}: {counts.failed} of {counts.size} failed"
            f" (threshold {failure_threshold:.0%})",
        )
    if counts.open > 0:
        return Decision("wait")
    if ring + 1 >= ring_count:
        return Decision("complete", f"{ring_count} rings done")
    return Decision("advance", f"ring {ring} done: {counts.installed} of {counts.size} installed")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    release_id: str
    device_type: str
    size: int
    received_ms: int
    last_used_ms: int


def protected_releases(entries: Iterable[CacheEntry], in_campaigns: Iterable[str]) -> set[str]:
    """Releases never evicted: those of running or paused campaigns, and per device type the
    two most recently received (the current one and the one to roll back to)."""
    protected = set(in_campaigns)
    by_type: dict[str, list[CacheEntry]] = {}
    for entry in entries:
        by_type.setdefault(entry.device_type, []).append(entry)
    for items in by_type.values():
        items.sort(key=lambda e: e.received_ms, reverse=True)
        protected.update(e.release_id for e in items[:2])
    return protected


def plan_eviction(
    entries: Sequence[CacheEntry], protected: set[str], *, cap: int, incoming: int
) -> list[str] | None:
    """Release ids to delete, least recently used first, so that ``incoming`` more bytes fit
    under ``cap``; None when even deleting every unprotected release is not enough."""
    used = sum(e.size for e in entries)
    if used + incoming <= cap:
        return []
    victims: list[str] = []
    for entry in sorted(entries, key=lambda e: (e.last_used_ms, e.received_ms)):
        if entry.release_id in protected:
            continue
        victims.append(entry.release_id)
        used -= entry.size
        if used + incoming <= cap:
            return victims
    return None
