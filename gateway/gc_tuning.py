"""The garbage collector in a long-running gateway.

What exists when the gateway has started (modules, config, the broker, the buffer) lives
until it stops: :func:`tune_gc` freezes it, so no later full collection walks it again.

The young-generation threshold stays at CPython's default (700 allocations). Raising it
to 10,000 or 50,000 made a backlog drain without live traffic 5 to 8 % cheaper per row, but
raised the PUBACK p99 at 1,000 devices x 1 msg/s from ~6 to ~9 ms (fewer, longer
collections; docs/benchmarks.md, "Drain"), and latency is the promise.
"""

from __future__ import annotations

import gc

__all__ = ["gc_status", "tune_gc"]


def tune_gc() -> int:
    """Freeze the objects alive now. Call once, when the gateway has started. Returns how
    many were frozen (counting walks them all: keep the figure rather than ask again)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def gc_status(frozen: int) -> dict[str, int]:
    """The collector's settings and work so far, for ``/status``; ``frozen``: what
    :func:`tune_gc` returned."""
    stats = gc.get_stats()
    return {
        "gen0_threshold": gc.get_threshold()[0],
        "frozen_objects": frozen,
        "collections": sum(s["collections"] for s in stats),
    }
