"""The floor: what a minimal Python QoS1 acknowledger costs per message on this machine.

``python -m bench.floor --devices 100 --rate 10 --duration 20 [--store none|sqlite|both]
[--linger-ms 0,1,2]``

Starts a stripped-down MQTT server in a child process and drives it with the simulator
(the same load as the suite's ``fixed`` phase). The server does only what any Python broker
must: one uvloop protocol per connection, packets cut with tidegate's ``PacketSplitter``,
CONNACK/PINGRESP/SUBACK, and a PUBACK per QoS1 PUBLISH; no sessions, no topics, no auth,
no Kafka. With ``--store sqlite`` each PUBACK waits for a group commit of the message into
a SQLite WAL file with ``synchronous=FULL`` in one worker thread, the durable minimum;
``--linger-ms`` makes each commit wait that long after its first message (larger commits,
later PUBACKs).

It prints the server's CPU per message between its first and last PUBLISH: the part of
tidegate's cost that no amount of work on tidegate's own code can remove on this interpreter
and machine (docs/benchmarks.md, "The floor").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

from bench.procs import free_port, port_open, wait_for
from edge.mqtt_wire import PacketSplitter, encode_acks

__all__ = ["main", "serve"]

_CONNACK = bytes((0x20, 2, 0, 0))
_PINGRESP = bytes((0xD0, 0))
_PUBLISH, _CONNECT, _SUBSCRIBE, _PINGREQ, _DISCONNECT = 3, 1, 8, 12, 14


class _Counter:
    """Messages acknowledged and the process CPU at the first and the latest one."""

    def __init__(self) -> None:
        self.count = self.commits = 0
        self.first_cpu = self.last_cpu = 0.0
        self.first_wall = self.last_wall = 0.0

    def acked(self, n: int) -> None:
        now_cpu, now_wall = time.process_time(), time.monotonic()
        if self.count == 0:
            self.first_cpu, self.first_wall = now_cpu, now_wall
        self.count += n
        self.last_cpu, self.last_wall = now_cpu, now_wall

    def report(self) -> dict[str, Any]:
        span = max(self.count - 1, 1)  # CPU between the first and the last PUBACK
        return {
            "messages": self.count,
            "cpu_us_per_msg": round((self.last_cpu - self.first_cpu) / span * 1e6, 1),
            "wall_s": round(self.last_wall - self.first_wall, 2),
            "rows_per_commit": round(self.count / self.commits, 2) if self.commits else None,
        }


class _GroupCommit:
    """One SQLite WAL file (synchronous=FULL) written by one thread; each batch of pending
    messages is one transaction; the PUBACKs of a batch go out after its commit."""

    def __init__(
        self, path: Path, loop: asyncio.AbstractEventLoop, counter: _Counter, linger_s: float
    ) -> None:
        self._loop, self._counter, self._linger_s = loop, counter, linger_s
        self._pending: list[tuple[asyncio.Transport, int, bytes]] = []
        self._busy = False
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS m (id INTEGER PRIMARY KEY, body BLOB)")
        self._work = threading.Condition()
        self._batch: list[tuple[asyncio.Transport, int, bytes]] | None = None
        threading.Thread(target=self._thread, daemon=True).start()

    def add(self, transport: asyncio.Transport, packet_id: int, body: bytes) -> None:
        self._pending.append((transport, packet_id, body))
        if not self._busy:
            self._busy = True
            if self._linger_s:
                self._loop.call_later(self._linger_s, self._start)
            else:
                self._start()

    def _start(self) -> None:
        self._busy = True
        batch, self._pending = self._pending, []
        with self._work:
            self._batch = batch
            self._work.notify()

    def _thread(self) -> None:
        while True:
            with self._work:
                while self._batch is None:
                    self._work.wait()
                batch, self._batch = self._batch, None
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT INTO m (body) VALUES (?)", [(b,) for _, _, b in batch])
            self._conn.execute("COMMIT")
            self._loop.call_soon_threadsafe(self._done, batch)

    def _done(self, batch: list[tuple[asyncio.Transport, int, bytes]]) -> None:
        for transport, packet_id, _ in batch:
            if not transport.is_closing():
                transport.write(encode_acks([(4, packet_id)]))
        self._counter.acked(len(batch))
        self._counter.commits += 1
        self._busy = False
        if self._pending:
            self._start()


class _Acker(asyncio.Protocol):
    def __init__(self, counter: _Counter, store: _GroupCommit | None) -> None:
        self._splitter = PacketSplitter(1 << 20)
        self._counter, self._store = counter, store
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        self._splitter.feed(data)
        acks: list[tuple[int, int]] = []
        while (packet := self._splitter.next_packet()) is not None:
            kind = packet.packet_type
            if kind == _PUBLISH:
                qos = (packet.flags >> 1) & 3
                if qos == 1:
                    # topic length (2 bytes) + topic, then the packet id
                    topic_len = int.from_bytes(packet.body[:2], "big")
                    packet_id = int.from_bytes(packet.body[2 + topic_len : 4 + topic_len], "big")
                    if self._store is not None:
                        self._store.add(transport, packet_id, packet.body)
                    else:
                        acks.append((4, packet_id))
            elif kind == _CONNECT:
                transport.write(_CONNACK)
            elif kind == _SUBSCRIBE:
                count = max(1, packet.body.count(b"\x00") // 2)  # only the sim's own filters
                transport.write(bytes((0x90, 2 + count)) + packet.body[:2] + bytes(count))
            elif kind == _PINGREQ:
                transport.write(_PINGRESP)
            elif kind == _DISCONNECT:
                transport.close()
        if acks:
            transport.write(encode_acks(acks))
            self._counter.acked(len(acks))


async def serve(port: int, store: str, linger_s: float, db_path: Path) -> _Counter:
    """Serve on 127.0.0.1:``port`` until SIGTERM; what was acknowledged, and its CPU."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    counter = _Counter()
    committer = None
    if store == "sqlite":
        committer = _GroupCommit(db_path, loop, counter, linger_s)
    server = await loop.create_server(lambda: _Acker(counter, committer), "127.0.0.1", port)
    await stop.wait()
    server.close()
    return counter


def measure(
    devices: int, rate: float, duration: float, store: str, linger_ms: float = 0.0
) -> dict[str, Any]:
    """Run the server in a child process under the simulator's load; its report plus the
    simulator's PUBACK latency."""
    with tempfile.TemporaryDirectory(prefix="tg-floor-") as tmp:
        report, port = Path(tmp) / "floor.json", free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", "--serve", str(port), "--store", store,
             "--linger-ms", str(linger_ms), "--report", str(report)],
        )  # fmt: skip
        try:
            wait_for(lambda: server.poll() is not None or port_open(port), 20, "the floor server")
            if server.poll() is not None:
                raise RuntimeError("floor server exited at start")
            subprocess.run(
                [sys.executable, "-m", "device_sim", "sim", "--port", str(port),
                 "--devices", str(devices), "--rate", str(rate), "--duration", str(duration),
                 "--quiet", "--json", str(report.with_suffix(".sim.json"))],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=20)
        result: dict[str, Any] = json.loads(report.read_text())
        sim = json.loads(report.with_suffix(".sim.json").read_text())
    return result | {
        "store": store, "linger_ms": linger_ms, "devices": devices, "rate_per_device": rate,
        "puback_ms": sim["puback_latency_ms"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="msg/s per device")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--store", choices=("none", "sqlite", "both"), default="both")
    parser.add_argument("--linger-ms", default="0", help="comma-separated; sqlite store only")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write every run as one JSON file")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        import uvloop

        counter = uvloop.run(
            serve(
                args.serve, args.store, float(args.linger_ms) / 1000, args.report.with_suffix(".db")
            )
        )
        args.report.write_text(json.dumps(counter.report()))
        return
    lingers = [float(x) for x in args.linger_ms.split(",")]
    variants = [("none", 0.0)] if args.store in ("none", "both") else []
    if args.store in ("sqlite", "both"):
        variants += [("sqlite", linger) for linger in lingers]
    results: list[dict[str, Any]] = []
    for run in range(args.runs):  # interleaved, so every variant sees the same machine
        for store, linger in variants:
            result = measure(args.devices, args.rate, args.duration, store, linger)
            results.append(result | {"run": run})
            print(json.dumps(results[-1]), flush=True)
    if args.out is not None:
        command = "python -m bench.floor " + " ".join(sys.argv[1:])
        args.out.write_text(json.dumps({"command": command, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
