"""The garbage collector in a long-running gateway.

What exists when the gateway has started (modules, config, the broker, the buffer) lives
until it stops: :func:`tune_gc` freezes it, so no later full collection walks it again.

Full collections run 10x less often than CPython's default (``FULL_EVERY``: after 100
middle-generation collections instead of 10). With a thousand devices each one walks every
session and takes 25-50 ms. At ~6,700 paced msg/s (half the saturated rate) there were 10-13
in a 40-second run, and near saturation each stall takes hundreds of ms to work off. At that
rate, 7 interleaved runs each (docs/benchmarks.md, "Publish → Kafka p99 at half the
maximum"): publish -> Kafka p99 median 240 -> 134 ms, full-collection time per run 245-372
-> 23-30 ms. The price is memory: cyclic garbage that reaches the oldest generation waits
longer to be freed. With 10,000 devices connecting, peak RSS was 243.0 MB against 231.7 MB
before (one run each; the target is 250).

The young-generation threshold stays at CPython's default (700 allocations). Raising it
to 10,000 or 50,000 made a backlog drain without live traffic 5 to 8 % cheaper per row, but
raised the PUBACK p99 at 1,000 devices x 1 msg/s from ~6 to ~9 ms (fewer, longer
collections; docs/benchmarks.md, "Drain"), and latency is the promise.
"""

from __future__ import annotations

import gc

__all__ = ["BATCH_YOUNG", "FULL_EVERY", "gc_status", "tune_gc"]

FULL_EVERY = 100
"""Middle-generation collections between two full ones (CPython's default: 10)."""


BATCH_YOUNG = 50_000
"""The young-generation threshold of a process that only builds and sends batches (the send
worker's child): no PUBACK waits on its collections, and each batch allocates ~10 objects a
row that refcounting frees, so collections every 700 allocations were pure overhead."""


def tune_gc(young: int | None = None) -> int:
    """Freeze the objects alive now and space full collections out. Call once, when the
    process has started; ``young``: a young-generation threshold other than CPython's.
    Returns how many objects were frozen (counting walks them all: keep the figure rather
    than ask again)."""
    gc.collect()
    gc.freeze()
    default_young, middle, _ = gc.get_threshold()
    gc.set_threshold(young or default_young, middle, FULL_EVERY)
    return gc.get_freeze_count()


def gc_status(frozen: int) -> dict[str, int]:
    """The collector's settings and work so far, for ``/status``; ``frozen``: what
    :func:`tune_gc` returned."""
    stats = gc.get_stats()
    young, _, full_every = gc.get_threshold()
    return {
        "gen0_threshold": young,
        "full_collection_every": full_every,
        "frozen_objects": frozen,
        "collections": sum(s["collections"] for s in stats),
    }
