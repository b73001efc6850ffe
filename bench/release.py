"""What a release (the delete after Kafka's acks) costs per row: ids in lists against one
range per class (edge/buffer.py, ``_delete_class_rows``), on a real buffer file.

    python -m bench.release [--rows 200000] [--reps 3] [--out FILE]

A buffer of ``--rows`` rows of one class is filled once; each repetition drains a copy of
it, lease by lease (4,000 rows, the send worker's batch), once with ranges off and once on,
interleaved. No Kafka, no gateway: only the buffer's own work, timed around ``release``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import edge.buffer
from bench.drain import fill_backlog
from bench.speed_probe import speed_probe
from edge.buffer import Buffer
from gateway.config import BufferConfig, ClassConfig

_CLASSES = {"telemetry": ClassConfig(kafka_topic="t")}
_LEASE = 4_000
_NO_RANGES = 1 << 62


async def _drain(path: Path) -> tuple[float, float]:
    """(release wall µs per row, process CPU µs per row for lease and release)."""
    async with Buffer(path, BufferConfig(), _CLASSES) as buffer:
        released_s = 0.0
        rows = 0
        cpu0 = time.process_time()
        while batch := await buffer.lease(_LEASE):
            started = time.perf_counter()
            await buffer.release(batch)
            released_s += time.perf_counter() - started
            rows += len(batch)
        return released_s / rows * 1e6, (time.process_time() - cpu0) / rows * 1e6


def _copy(seed: Path, target: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        source = seed.with_name(seed.name + suffix)
        if source.exists():
            shutil.copy(source, target.with_name(target.name + suffix))


def run(rows: int, reps: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tidegate-release-"))
    try:
        seed = work / "seed.sqlite3"
        fill_backlog(seed, rows, 1_000)
        runs: dict[str, list[tuple[float, float]]] = {"id lists": [], "ranges": []}
        for rep in range(reps):
            for mode, range_min in (("id lists", _NO_RANGES), ("ranges", 32)):
                edge.buffer._RANGE_MIN = range_min
                copy = work / f"{rep}-{mode.replace(' ', '-')}.sqlite3"
                _copy(seed, copy)
                runs[mode].append(asyncio.run(_drain(copy)))
        return {
            "rows": rows,
            "lease": _LEASE,
            "speed_probe": speed_probe(),
            "release_us_per_row": {
                mode: {
                    "median": round(statistics.median(r[0] for r in results), 2),
                    "runs": [round(r[0], 2) for r in results],
                }
                for mode, results in runs.items()
            },
            "lease_and_release_cpu_us_per_row": {
                mode: round(statistics.median(r[1] for r in results), 2)
                for mode, results in runs.items()
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rows < _LEASE or args.reps < 1:
        parser.error(f"--rows must be at least {_LEASE} and --reps at least 1")
    result = run(args.rows, args.reps)
    result["command"] = "python -m bench.release " + " ".join(
        f"--{k} {v}" for k, v in (("rows", args.rows), ("reps", args.reps))
    )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
