"""Memory per connected device of the embedded broker: RSS and traced Python heap.

Run (about a minute per fleet size; no Kafka needed; nothing else heavy should run meanwhile):

    .venv/bin/python -m bench.conn_memory --devices 1000 2000 --repeat 3
    .venv/bin/python -m bench.conn_memory --devices 1000 --trace 8   # where the bytes are

An in-process :class:`~edge.broker.EdgeBroker` (uvloop when installed, as ``tidegate run``
uses it; a sink that stores instantly: the buffer's memory does not grow with connections)
and a fleet of idle devices in a child process on loopback: each sends CONNECT
(clean session, keep-alive 60 s), one QoS 1 PUBLISH, reads CONNACK and PUBACK, then stays
connected. 50 devices connect first (warm-up: caches, first allocations of each kind), then
N more; the figures are (after - before) / N with garbage collected before each sample.

``--trace F`` also runs ``tracemalloc`` with F frames per allocation and prints the
allocation sites that grew most, in bytes per connection (tracemalloc itself inflates RSS,
so RSS is reported from the runs without it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import struct
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from edge.broker import EdgeBroker
from edge.ingest import InboundPublish

__all__ = ["main"]

_HOST = "127.0.0.1"
_WARMUP = 50
_BATCH = 100
"""Devices connecting at once (well under the listen backlog)."""


class _InstantSink:
    """Stores nothing and acknowledges at once: the broker's own memory is measured."""

    def submit(self, publish: InboundPublish) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([first]) + bytes(encoded) + body


def _connect_and_publish(client_id: str) -> bytes:
    connect = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _string(client_id)
    publish = _string(f"d/{client_id}/t") + struct.pack("!H", 1) + b'{"v": 1}'
    return _packet(0x10, connect) + _packet(0x32, publish)


async def _fleet(port: int, count: int, prefix: str) -> None:
    """Child process: connect ``count`` devices, print "ready", hold until stdin closes."""
    writers: list[asyncio.StreamWriter] = []

    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection(_HOST, port)
        writer.write(_connect_and_publish(f"{prefix}{index}"))
        answer = await asyncio.wait_for(reader.readexactly(8), 60)  # CONNACK + PUBACK
        if answer[:4] != b"\x20\x02\x00\x00" or answer[4] != 0x40:
            raise RuntimeError(f"device {index}: unexpected answer {answer!r}")
        writers.append(writer)

    for start in range(0, count, _BATCH):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + _BATCH))))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.close()


async def _connect_fleet(port: int, count: int, prefix: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "bench.conn_memory", "--fleet", str(port), str(count), prefix]
    child = subprocess.Popen(  # noqa: ASYNC220  # started once, read in a thread
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 120 + count / 20)
    if line.strip() != "ready":
        child.kill()
        raise RuntimeError(f"fleet of {count} did not connect (exit {child.wait()})")
    return child


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _settled(broker: EdgeBroker, connected: int) -> None:
    live = broker.amqtt_broker.edge.live
    async with asyncio.timeout(60):
        while len(live) < connected:  # noqa: ASYNC110  # the broker has no such event
            await asyncio.sleep(0.1)  # polling the broker's table until the fleet is in
    await asyncio.sleep(0.5)  # let the last PUBACK writes finish
    gc.collect()


def _types() -> Counter[str]:
    return Counter(type(obj).__name__ for obj in gc.get_objects())


async def _measure(devices: int, frames: int) -> dict[str, Any]:
    if frames:
        tracemalloc.start(frames)
    broker = EdgeBroker(
        listeners=[("default", _HOST, 0)],
        sink=_InstantSink(),
        observer=None,
        max_inflight_per_session=16,
    )
    await broker.start()
    fleets: list[subprocess.Popen[str]] = []
    try:
        port = broker.bound_addresses["default"][1]
        fleets.append(await _connect_fleet(port, _WARMUP, "warm-"))
        await _settled(broker, _WARMUP)
        rss0, types0 = _rss(), _types()
        snap0 = tracemalloc.take_snapshot() if frames else None
        fleets.append(await _connect_fleet(port, devices, "dev-"))
        await _settled(broker, _WARMUP + devices)
        rss1, types1 = _rss(), _types()
        result: dict[str, Any] = {
            "devices": devices,
            "rss_per_connection": (rss1 - rss0) / devices,
            "objects_per_connection": {
                name: round((types1[name] - types0[name]) / devices, 2)
                for name, _ in (types1 - types0).most_common(25)
            },
        }
        if snap0 is not None:
            snap1 = tracemalloc.take_snapshot()
            stats = snap1.compare_to(snap0, "traceback")
            result["traced_per_connection"] = sum(s.size_diff for s in stats) / devices
            result["sites"] = [
                {
                    "bytes": round(s.size_diff / devices),
                    "count": round(s.count_diff / devices, 2),
                    "trace": [f"{Path(f.filename).name}:{f.lineno}" for f in s.traceback],
                }
                for s in stats[:150]
                if s.size_diff > 0
            ]
        return result
    finally:
        for child in fleets:
            if child.stdin is not None:
                child.stdin.close()
        await broker.stop()
        for child in fleets:
            child.wait(timeout=60)
        if frames:
            tracemalloc.stop()


def _run(devices: int, frames: int) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_measure(devices, frames))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_measure(devices, frames))


def _one_process(devices: int, frames: int) -> dict[str, Any]:
    """Each measurement in a fresh interpreter: earlier runs' freed memory would hide RSS."""
    argv = [sys.executable, "-m", "bench.conn_memory", "--one", str(devices), str(frames)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=os.environ)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conn_memory")
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (median)")
    parser.add_argument("--trace", type=int, default=0, help="tracemalloc frames (0: off)")
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    parser.add_argument("--fleet", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fleet:
        port, count, prefix = args.fleet
        asyncio.run(_fleet(int(port), int(count), prefix))
        return 0
    if args.one:
        print(json.dumps(_run(*args.one)))
        return 0
    if max(args.devices) > 2000:
        parser.error("at most 2,000 devices (a shared machine)")
    results: list[dict[str, Any]] = []
    for devices in args.devices:
        runs = [_one_process(devices, 0) for _ in range(args.repeat)]
        rss = [run["rss_per_connection"] for run in runs]
        entry: dict[str, Any] = {
            "devices": devices,
            "rss_per_connection_median": statistics.median(rss),
            "rss_per_connection_runs": rss,
            "objects_per_connection": runs[0]["objects_per_connection"],
        }
        if args.trace:
            traced = [_one_process(devices, args.trace) for _ in range(args.repeat)]
            per = [run["traced_per_connection"] for run in traced]
            entry["traced_per_connection_median"] = statistics.median(per)
            entry["traced_per_connection_runs"] = per
            entry["sites"] = traced[0]["sites"]
        results.append(entry)
        print(
            f"{devices} devices: RSS {entry['rss_per_connection_median'] / 1024:.1f} KB/conn"
            + (
                f", traced {entry['traced_per_connection_median'] / 1024:.1f} KB/conn"
                if args.trace
                else ""
            ),
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
