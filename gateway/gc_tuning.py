"""Garbage-collector settings for a long-running gateway.

CPython runs a young-generation collection every 700 container allocations. A forwarded row
allocates a dozen containers (its record, header list and tuples), an ingested message about
as many, so at 50,000 rows/s the collector ran ~1,000 times a second, each time walking
every young object. In a backlog drain that was ~30 % of the gateway's CPU
(docs/benchmarks.md, "Garbage collection"). The gateway makes little cyclic garbage, so it
collects young objects every :data:`GEN0_THRESHOLD` allocations instead, and moves what
exists at start-up (modules, config, the broker) out of the collector's sight for good.
"""

from __future__ import annotations

import gc

__all__ = ["GEN0_THRESHOLD", "gc_status", "tune_gc"]

GEN0_THRESHOLD = 50_000
"""Container allocations between young collections. Garbage in cycles waits at most this
many allocations (a few MB); CPU per drained row fell 20 -> 14 µs at this value."""


def tune_gc() -> int:
    """Freeze the objects alive now (start-up state, never freed) and collect young
    objects less often. Call once, when the gateway has started. Returns how many objects
    were frozen (counting walks them all: keep the figure rather than ask again)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
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
