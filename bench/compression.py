"""What each ``kafka.compression`` choice does to a record batch of the gateway's records:
bytes per record and CPU per record (append, close, compress), no network.

    python -m bench.compression [--rows 700] [--devices 1000] [--reps 7] [--out FILE]

The rows come from :func:`bench.drain.fill_backlog` (device envelopes around temperature
readings, what a backlog holds), read back the way the send worker's child reads them, built
into records by :class:`bridge.records.RecordBuilder` and encoded into one partition's batch
per codec with aiokafka's ``BatchBuilder``. Codecs are timed interleaved, medians reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from bench.drain import fill_backlog
from bench.speed_probe import speed_probe
from bridge.records import KafkaRecord, RecordBuilder
from bridge.send_worker_child import _READ_SPAN

_CODECS = ("none", "gzip", "lz4", "zstd")


def _encode(records: list[KafkaRecord], codec: int) -> tuple[int, float]:
    """(batch bytes, seconds) for ``records`` in one batch compressed with ``codec``."""
    started = time.perf_counter()
    batch = BatchBuilder(64 << 20, codec)
    for record in records:
        batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers)
    size = len(batch._build())
    return size, time.perf_counter() - started


def run(rows: int, devices: int, reps: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tidegate-compression-"))
    try:
        path = work / "buffer.sqlite3"
        fill_backlog(path, rows, devices)
        with sqlite3.connect(path) as db:
            span = db.execute(_READ_SPAN, ("telemetry", 0, 1 << 62)).fetchall()
        db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    builder = RecordBuilder(
        gateway_id="edge-gw-01",
        class_topics={"telemetry": "iot.telemetry"},
        content_types={"telemetry": "application/cbor"},
        dead_letter_topic="iot.dlq",
    )
    records = builder.build_rows(span)
    codecs = {name: 0 for name in _CODECS}
    for name in _CODECS[1:]:
        available, codecs[name] = AIOKafkaProducer._COMPRESSORS[name]
        if not available():
            raise SystemExit(f"{name}: codec library missing (install aiokafka's extras)")
    sizes: dict[str, int] = {}
    seconds: dict[str, list[float]] = {name: [] for name in _CODECS}
    for _ in range(reps):
        for name, codec in codecs.items():
            sizes[name], took = _encode(records, codec)
            seconds[name].append(took)
    return {
        name: {
            "bytes_per_record": round(sizes[name] / len(records), 1),
            "ratio": round(sizes["none"] / sizes[name], 1),
            "cpu_us_per_record": round(statistics.median(seconds[name]) / len(records) * 1e6, 2),
        }
        for name in _CODECS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=700, help="records in the batch")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rows < 1 or args.devices < 1 or args.reps < 1:
        parser.error("--rows, --devices and --reps must be positive")
    result = {
        "command": "python -m bench.compression "
        f"--rows {args.rows} --devices {args.devices} --reps {args.reps}",
        "speed_probe": speed_probe(),
        "codecs": run(args.rows, args.devices, args.reps),
    }
    print("| codec | bytes per record | ratio | CPU µs per record (append + compress) |")
    print("|---|--:|--:|--:|")
    for name, figures in result["codecs"].items():
        print(
            f"| {name} | {figures['bytes_per_record']} | {figures['ratio']}x"
            f" | {figures['cpu_us_per_record']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
