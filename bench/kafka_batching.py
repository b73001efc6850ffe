"""Choose the producer's batching and compression: aiokafka → local Kafka over mutual TLS.

``python -m bench.kafka_batching [--records 40000] [--runs 5] [--out FILE.json]``

Sends ``--records`` records shaped like tidegate's (a ~100 B CBOR envelope as value, one of
1,000 device ids as key, the 8 ``tg-*`` headers) with acks=all and idempotence, the way the
forwarder does it: chunks of 2,000 ``send()`` futures (one leased batch), each chunk awaited
before the next. For every combination of linger_ms, max_batch_size and compression it
reports msg/s, client CPU µs per record (this process: aiokafka runs on its loop thread),
the Kafka JVM's CPU µs per record and the bytes appended to the partition logs per record,
median over ``--runs`` (configs interleaved per run; the best run too, since on a shared
machine the least disturbed run is the closest to the capacity).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cbor2
from aiokafka import AIOKafkaProducer
from aiokafka.codec import has_lz4, has_zstd

from bench.ingest import machine_info
from bench.procs import REPO, cpu_sample, system_cpu
from gateway.dev.kafka import (
    KafkaState,
    client_ssl_context,
    create_topics,
    start_kafka,
    stop_kafka,
)

__all__ = ["Config", "Result", "build_records", "main"]

TOPIC = "bench.batching"
CHUNK = 2000
"""Records per awaited chunk: the gateway's default lease_batch."""
_DEADLINE_S = 60.0

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]


@dataclass(frozen=True)
class Config:
    linger_ms: int
    max_batch_size: int
    compression: str

    @property
    def label(self) -> str:
        return f"linger={self.linger_ms} batch={self.max_batch_size // 1024}KiB {self.compression}"


@dataclass
class Result:
    config: Config
    run: int
    records: int
    seconds: float
    msgs_per_s: float
    client_cpu_us: float
    broker_cpu_us: float
    chunk_p50_ms: float
    log_bytes_per_rec: float
    """Bytes the broker appended to the partition logs per record (batch framing, headers and
    compression included): what crosses the uplink and what Kafka stores."""
    foreign_cpu_pct: float = 0.0
    """CPU used by other processes on the shared machine meanwhile, in % of one core."""


def build_records(count: int, devices: int = 1000) -> list[Record]:
    """``count`` records like the forwarder's: CBOR envelope value, device key, tg-* headers."""
    records: list[Record] = []
    seqs = [0] * devices
    now_ms = time.time_ns() // 1_000_000
    for i in range(count):
        dev = i % devices
        seqs[dev] += 1
        device = f"dev-{dev:05d}"
        # Envelope as the simulator sends it: ~100 B. The 32 B body is fresh random bytes per
        # record (no shared slices), so compression is not flattered by repeats across records.
        value = cbor2.dumps(
            {
                "msg_id": f"{device}:9f1eaef2:telemetry:{seqs[dev]}",
                "seq": seqs[dev],
                "ts": now_ms + i,
                "body": os.urandom(32),
            }
        )
        headers = [
            ("tg-message-id", f"gw-bench:{i + 1}".encode()),
            ("tg-device-id", device.encode()),
            ("tg-gateway-id", b"gw-bench"),
            ("tg-mqtt-topic", f"d/{device}/up/telemetry".encode()),
            ("tg-class", b"telemetry"),
            ("tg-content-type", b"application/octet-stream"),
            ("tg-ingest-ts", str(now_ms + i).encode()),
            ("tg-qos", b"1"),
        ]
        records.append((device.encode(), value, headers))
    return records


def _log_bytes(state: KafkaState) -> int:
    """Size of the benchmark topic's log segments on every broker."""
    total = 0
    for broker in state.brokers:
        data = broker.properties.parent / "data"  # log.dirs, see gateway/dev/kafka_props.py
        total += sum(f.stat().st_size for f in data.glob(f"{TOPIC}-*/*.log"))
    return total


async def _send_all(state: KafkaState, config: Config, records: list[Record]) -> Result:
    batch = config.max_batch_size
    producer = AIOKafkaProducer(
        bootstrap_servers=state.bootstrap,
        security_protocol="SSL",
        ssl_context=client_ssl_context(state),
        acks="all",
        enable_idempotence=True,
        linger_ms=config.linger_ms,
        max_batch_size=batch,
        max_request_size=max(batch, 1 << 20),
        compression_type=None if config.compression == "none" else config.compression,
    )
    async with asyncio.timeout(_DEADLINE_S):
        await producer.start()
    try:
        # Warm-up: connection, metadata, producer id — not part of the measurement.
        key, value, headers = records[0]
        async with asyncio.timeout(_DEADLINE_S):
            await (await producer.send(TOPIC, value, key=key, headers=headers))
        broker_pid = state.brokers[0].pid
        log_before = _log_bytes(state)
        broker_before = cpu_sample(broker_pid)
        cpu_before = time.process_time()
        busy_before, _ = system_cpu()
        started = time.perf_counter()
        chunk_times: list[float] = []
        async with asyncio.timeout(_DEADLINE_S * 5):
            for offset in range(0, len(records), CHUNK):
                chunk_started = time.perf_counter()
                futures = [
                    await producer.send(TOPIC, value, key=key, headers=headers)
                    for key, value, headers in records[offset : offset + CHUNK]
                ]
                await asyncio.gather(*futures)
                chunk_times.append(time.perf_counter() - chunk_started)
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_before
        broker_cpu = cpu_sample(broker_pid).total_s - broker_before.total_s
        foreign = system_cpu()[0] - busy_before - client_cpu - broker_cpu
        log_bytes = _log_bytes(state) - log_before
    finally:
        async with asyncio.timeout(_DEADLINE_S):
            await producer.stop()
    n = len(records)
    return Result(
        config=config,
        run=0,
        records=n,
        seconds=round(seconds, 3),
        msgs_per_s=round(n / seconds, 1),
        client_cpu_us=round(client_cpu * 1e6 / n, 1),
        broker_cpu_us=round(broker_cpu * 1e6 / n, 1),
        chunk_p50_ms=round(statistics.median(chunk_times) * 1000, 1),
        log_bytes_per_rec=round(log_bytes / n, 1),
        foreign_cpu_pct=round(max(0.0, foreign) / seconds * 100, 1),
    )


def configs(compressions: list[str]) -> list[Config]:
    """The grid: every linger_ms, max_batch_size and compression combination."""
    return [
        Config(linger, size, comp)
        for linger, size, comp in itertools.product(
            (0, 5, 20), (16 << 10, 256 << 10, 1 << 20), compressions
        )
    ]


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    """Per config: medians over runs, best msg/s first."""
    rows: list[dict[str, Any]] = []
    for config in dict.fromkeys(r.config for r in results):
        mine = [r for r in results if r.config == config]
        rows.append(
            {
                **asdict(config),
                "label": config.label,
                "msgs_per_s": round(statistics.median(r.msgs_per_s for r in mine)),
                "best_msgs_per_s": round(max(r.msgs_per_s for r in mine)),
                "log_bytes_per_rec": round(statistics.median(r.log_bytes_per_rec for r in mine)),
                "client_cpu_us": round(statistics.median(r.client_cpu_us for r in mine), 1),
                "broker_cpu_us": round(statistics.median(r.broker_cpu_us for r in mine), 1),
                "chunk_p50_ms": round(statistics.median(r.chunk_p50_ms for r in mine), 1),
                "foreign_cpu_pct": round(statistics.median(r.foreign_cpu_pct for r in mine)),
                "runs_msgs_per_s": [round(r.msgs_per_s) for r in mine],
            }
        )
    rows.sort(key=lambda row: -row["msgs_per_s"])
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| linger_ms | max_batch_size | compression | msg/s (median) | best | runs "
        "| client CPU µs/rec | Kafka CPU µs/rec | log B/rec | 2,000-chunk p50 ms | other CPU % |",
        "|--:|--:|---|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        runs = ", ".join(f"{v:,}" for v in row["runs_msgs_per_s"])
        lines.append(
            f"| {row['linger_ms']} | {row['max_batch_size'] // 1024} KiB | {row['compression']} "
            f"| {row['msgs_per_s']:,} | {row['best_msgs_per_s']:,} | {runs} "
            f"| {row['client_cpu_us']} | {row['broker_cpu_us']} | {row['log_bytes_per_rec']} "
            f"| {row['chunk_p50_ms']} | {row['foreign_cpu_pct']} |"
        )
    return "\n".join(lines)


async def _run(
    state: KafkaState, grid: list[Config], records: list[Record], runs: int
) -> list[Result]:
    results: list[Result] = []
    for run in range(runs):
        shift = (run * 5) % len(grid)  # rotate so no config always runs first or last
        for config in grid[shift:] + grid[:shift]:
            result = await _send_all(state, config, records)
            result.run = run
            results.append(result)
            print(f"run {run} {config.label}: {result.msgs_per_s:,.0f} msg/s", file=sys.stderr)
    return results


def _git_head() -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="aiokafka batching/compression over mTLS")
    parser.add_argument("--records", type=int, default=40_000, help="records per config and run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not CHUNK <= args.records <= 1_000_000 or not 1 <= args.runs <= 10:
        parser.error(f"--records {CHUNK}..1000000, --runs 1..10")
    compressions = ["none", "gzip"]
    skipped: list[str] = []
    for name, available in (("lz4", has_lz4()), ("zstd", has_zstd())):
        (compressions if available else skipped).append(name)
    grid = configs(compressions)
    records = build_records(args.records)
    started = time.monotonic()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-kafka-") as tmp:
        state = start_kafka(Path(tmp) / "kafka", Path(tmp) / "pki")
        try:
            create_topics(state, [TOPIC])
            results = asyncio.run(_run(state, grid, records, args.runs))
        finally:
            stop_kafka(state.state_file)
    rows = summarize(results)
    report = {
        "benchmark": "kafka_batching",
        "command": " ".join(["python -m bench.kafka_batching", *(argv or sys.argv[1:])]),
        "machine": machine,
        "loadavg_at_end": os.getloadavg(),
        "code": {"head": _git_head()},
        "records": args.records,
        "record_bytes": {
            "key": len(records[0][0]),
            "value": statistics.mean(len(r[1]) for r in records),
            "headers": statistics.mean(sum(len(k) + len(v) for k, v in r[2]) for r in records),
        },
        "chunk": CHUNK,
        "skipped_codecs": skipped,
        "elapsed_s": round(time.monotonic() - started, 1),
        "configs": rows,
        "runs": [asdict(r) for r in results],
    }
    if args.out is not None:
        out = args.out if args.out.is_absolute() else REPO / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(rows))
    print(json.dumps({k: report[k] for k in ("record_bytes", "skipped_codecs", "elapsed_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
