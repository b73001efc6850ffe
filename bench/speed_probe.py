"""How fast this machine runs the drain's kind of work right now, recorded beside every result.

The same commit drained 86k rows/s on one machine of this kind and 53k on another (sessions
7 and 8, docs/benchmarks.md): machines of the same kind differ, and a shared one differs from
hour to hour. Figures from different sessions can only be compared next to a measure of the
machine itself. This probe times a fixed piece of per-row Python work (tuples, a frozen
dataclass-like object, pickle, an in-memory SQLite insert, select and delete) on one core,
before the load starts. Lower is faster; a ratio of two probes says how far two machines'
figures are apart.

    python -m bench.speed_probe          # prints the figure
"""

from __future__ import annotations

import json
import pickle
import sqlite3
import statistics
import time
from dataclasses import dataclass

__all__ = ["PROBE_ROWS", "speed_probe"]

PROBE_ROWS = 20_000
"""Rows per repetition: ~40-80 ms of work here, long enough to be above timer noise."""


@dataclass(slots=True)
class _Row:
    row_id: int
    device_id: str
    payload: bytes


def _once() -> float:
    payload = b"x" * 120
    started = time.perf_counter()
    rows = [(i, f"dev-{i % 1000:05d}", payload) for i in range(PROBE_ROWS)]
    objects = [_Row(*row) for row in rows]
    wire = pickle.loads(pickle.dumps([(o.row_id, o.device_id, o.payload) for o in objects]))
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, device TEXT, payload BLOB)")
    db.executemany("INSERT INTO t VALUES (?, ?, ?)", wire)
    read = db.execute("SELECT id, device, payload FROM t ORDER BY id").fetchall()
    db.execute("DELETE FROM t WHERE id <= ?", (read[-1][0],))
    db.close()
    return time.perf_counter() - started


def speed_probe(repetitions: int = 7) -> dict[str, float]:
    """``us_per_row``: the median over ``repetitions`` (the fastest and the slowest too,
    to show how steady the machine was while probing)."""
    times = [_once() / PROBE_ROWS * 1e6 for _ in range(repetitions)]
    return {
        "us_per_row": round(statistics.median(times), 3),
        "fastest": round(min(times), 3),
        "slowest": round(max(times), 3),
    }


if __name__ == "__main__":
    print(json.dumps(speed_probe()))
