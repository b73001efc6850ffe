"""Keep-alive deadlines of all connections on one timer per time slot.

A ``loop.call_at`` timer per connection costs ~0.5 KB (uvloop's ``TimerHandle``, its libuv
timer, the callback's arguments); with thousands of idle devices that is a large share of a
connection's ~12 KB. :class:`KeepAliveWheel` files each connection's next check under a slot
of ``resolution`` seconds and arms one timer per non-empty slot: a check runs at most
``resolution`` late, which a keep-alive measured in seconds (MQTT-3.1.2-24: 1.5 x the
keep-alive) does not notice.

Decide/act split: the wheel only keeps time; what a due check does is the caller's
(:meth:`KeepAliveEntry.due`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Final

__all__ = ["KeepAliveEntry", "KeepAliveWheel"]

log = logging.getLogger("edge.broker")

DEFAULT_RESOLUTION_S: Final = 0.25


class KeepAliveEntry:
    """One connection's place on the wheel; subclasses say what a due check does."""

    __slots__ = ("slot",)

    def __init__(self) -> None:
        self.slot: int | None = None
        """The wheel slot this entry waits in (None: not scheduled)."""

    def due(self) -> None:
        raise NotImplementedError


class KeepAliveWheel:
    """Calls ``entry.due()`` at (or up to ``resolution`` seconds after) the time given to
    :meth:`schedule`, unless :meth:`cancel` came first. One entry is scheduled at most once
    at a time (scheduling again moves it)."""

    __slots__ = ("_resolution", "_slots")

    def __init__(self, resolution: float = DEFAULT_RESOLUTION_S) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self._resolution = resolution
        self._slots: dict[int, tuple[asyncio.TimerHandle, dict[KeepAliveEntry, None]]] = {}

    def __len__(self) -> int:
        """Entries scheduled."""
        return sum(len(entries) for _handle, entries in self._slots.values())

    @property
    def timers(self) -> int:
        """Event-loop timers armed (one per non-empty slot)."""
        return len(self._slots)

    def schedule(self, entry: KeepAliveEntry, when: float) -> None:
        """Run ``entry.due()`` at loop time ``when`` (rounded up to the slot)."""
        self.cancel(entry)
        slot = math.ceil(when / self._resolution)
        bucket = self._slots.get(slot)
        if bucket is None:
            loop = asyncio.get_running_loop()
            handle = loop.call_at(slot * self._resolution, self._fire, slot)
            bucket = self._slots[slot] = (handle, {})
        bucket[1][entry] = None
        entry.slot = slot

    def cancel(self, entry: KeepAliveEntry) -> None:
        """Forget ``entry`` (no-op when it is not scheduled)."""
        slot, entry.slot = entry.slot, None
        if slot is None:
            return
        bucket = self._slots.get(slot)
        if bucket is None:
            return
        handle, entries = bucket
        entries.pop(entry, None)
        if not entries:
            handle.cancel()
            del self._slots[slot]

    def _fire(self, slot: int) -> None:
        _handle, entries = self._slots.pop(slot)
        for entry in entries:
            entry.slot = None
        for entry in entries:
            try:
                entry.due()  # may schedule the entry again (a later slot)
            except Exception:  # one connection's bug must not skip the others' checks
                log.exception("keep-alive check failed")
