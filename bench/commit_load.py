"""Group commits of the buffer alone: commit latency and CPU per commit for a batch size,
with the event loop idle or busy (no broker, no Kafka).

    python -m bench.commit_load [--batch 93] [--rounds 200] [--busy 0.8] [--keys 1]
        [--spread] [--code DIR] [--out FILE]

Each round enqueues ``--batch`` QoS1 publishes from as many devices (envelopes with a seq:
one dedup key each, as the intake makes them since session 11; ``--keys 2`` adds the
packet-id key, as opaque payloads and the intake before then) and waits until they are
durable; every 20 rounds the
rows are leased and released, as the forwarder would. ``--busy 0.8`` keeps the event loop
running Python 80 % of the time, in 1 ms slices with a wait for I/O between them, as ingest
does under load: the commit runs in aiosqlite's thread and needs the GIL back after every
SQLite step, so this shows what the hand-backs cost (docs/benchmarks.md, "Commits under
load"). ``--spread`` takes each round's devices at random from 1,000 (seeded), as live
traffic does, instead of neighbours in id order, which share pages of the registry and the
retransmission memory. ``written_kib_per_round`` is what the process handed to write
calls (``/proc/self/io``: the WAL, and checkpoints into the file). ``--code`` runs another
checkout's buffer, for an A/B in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2


def _written_bytes() -> int:
    """Bytes this process passed to write calls so far (0 where /proc is missing)."""
    try:
        io = Path("/proc/self/io").read_text()
    except OSError:
        return 0
    return next(int(line.split()[1]) for line in io.splitlines() if line.startswith("wchar:"))


async def _run(batch: int, rounds: int, busy: float, keys: int, spread: bool) -> dict[str, Any]:
    pick = random.Random(1)
    buffer_module = importlib.import_module("edge.buffer")
    config = importlib.import_module("gateway.config")
    classes = {"telemetry": config.ClassConfig(kafka_topic="t", priority=5)}
    with tempfile.TemporaryDirectory(prefix="tidegate-commit-load-") as tmp:
        buffer = buffer_module.Buffer(Path(tmp) / "b.sqlite3", config.BufferConfig(), classes)
        async with buffer:
            stop = asyncio.Event()

            async def loop_work() -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    while time.perf_counter() - started < 0.001:
                        sum(range(200))
                    await asyncio.sleep(0.001 * (1 - busy) / busy)  # waiting for I/O

            worker = asyncio.create_task(loop_work() if busy else stop.wait())
            latencies: list[float] = []
            cpu_started, written_before = time.process_time(), _written_bytes()
            for round_no in range(rounds):
                if spread:
                    devices = pick.sample(range(1000), min(batch, 1000))
                else:
                    devices = [(round_no * batch + i) % 1000 for i in range(batch)]
                futures = [
                    _publish(buffer, round_no, i, devices[i % len(devices)], keys)
                    for i in range(batch)
                ]
                started = time.perf_counter()
                await asyncio.gather(*futures)
                latencies.append((time.perf_counter() - started) * 1000)
                if round_no % 20 == 19:
                    await buffer.release(await buffer.lease(batch * 20))
            cpu_s = time.process_time() - cpu_started
            written = _written_bytes() - written_before
            stop.set()
            await worker
            commits = buffer.stats.commits
    latencies.sort()
    return {
        "batch": batch,
        "rounds": rounds,
        "busy_loop_share": busy,
        "keys_per_publish": keys,
        "devices": "spread" if spread else "neighbours",
        "commits": commits,
        "commit_p50_ms": round(statistics.median(latencies), 3),
        "commit_p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
        "commit_max_ms": round(latencies[-1], 3),
        "process_cpu_ms_per_round": round(cpu_s / rounds * 1000, 3),
        "written_kib_per_round": round(written / rounds / 1024, 2),
    }


def _publish(buffer: Any, round_no: int, index: int, device_no: int, keys: int) -> Any:
    device = f"dev-{device_no:04d}"
    msg_id = f"{device}:{round_no}:{index}"
    payload = cbor2.dumps({"msg_id": msg_id, "seq": round_no, "ts": 0, "body": b"x" * 100})
    return buffer.enqueue(
        device_id=device,
        class_name="telemetry",
        topic=f"d/{device}/up/telemetry",
        qos=1,
        payload=payload,
        ingest_ms=1_000 + round_no,
        priority=5,
        msg_id=msg_id,
        dedup_keys=(
            (f"mtelemetry:{round_no % 64}", msg_id),
            (f"p{(round_no * 7 + index) % 64}", f"{round_no}:{index}"),
        )[:keys],
        check_dedup=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=93, help="publishes per commit")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument(
        "--busy", type=float, default=0.0, help="share of the time the event loop runs Python"
    )
    parser.add_argument(
        "--keys", type=int, choices=(1, 2), default=1, help="dedup keys per publish"
    )
    parser.add_argument(
        "--spread", action="store_true", help="each round's devices at random from 1,000"
    )
    parser.add_argument("--code", type=Path, help="a checkout whose buffer to run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        parser.error("--batch and --rounds must be positive")
    if not 0 <= args.busy < 1:
        parser.error("--busy is a share of the time: 0 <= busy < 1")
    if args.code is not None:
        sys.path.insert(0, str(args.code.resolve()))
    result = asyncio.run(_run(args.batch, args.rounds, args.busy, args.keys, args.spread))
    result["code"] = str(args.code) if args.code else "this checkout"
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
