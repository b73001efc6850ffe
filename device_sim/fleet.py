"""Run a fleet of simulated devices: one asyncio loop per process, K processes if asked.

:func:`run_fleet` runs every device of one process on the current loop;
:func:`run_simulation` is the synchronous entry point the CLI uses, which shards devices over
``options.processes`` spawned processes (each its own loop and ledger part, merged at the end)
when one loop's CPU is not enough (above ~2,000 devices).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from device_sim.device import FleetContext, SimDevice
from device_sim.envelope import new_run_id
from device_sim.ledger import AckLedgerWriter, concat_ledgers
from device_sim.link import PahoLoopDriver
from device_sim.options import FleetOptions
from device_sim.stats import FleetCounters, LatencyHistogram
from gateway.errors import TidegateError

__all__ = [
    "FleetError",
    "FleetResult",
    "ProgressCallback",
    "WorkerProgressCallback",
    "raise_nofile_limit",
    "run_fleet",
    "run_simulation",
]

ProgressCallback = Callable[[FleetCounters], None]
"""Called about once a second with a snapshot of the counters."""
WorkerProgressCallback = Callable[[dict[int, FleetCounters]], None]
"""Called about once a second with each worker process's latest counters."""

log = logging.getLogger(__name__)

_FDS_PER_PROCESS = 64
"""File descriptors a process needs besides one socket per device (ledger, pipes, stdio)."""


class FleetError(TidegateError):
    """The fleet could not run at all (limits, ledger, worker processes)."""


@dataclass
class FleetResult:
    """What a run did, merged over all processes."""

    run_id: str
    counters: FleetCounters
    latency: LatencyHistogram
    elapsed_s: float
    ledger: Path | None
    peak_rss_mb: float
    """Peak RSS of the (largest) simulator process."""
    steady_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    """PUBACK latency once each process's devices had all connected (no connect ramp)."""
    processes: int = 1
    total_rss_mb: float = 0.0
    """Sum of every process's peak RSS."""
    notes: list[str] = field(default_factory=list)

    @property
    def msgs_per_s(self) -> float:
        """Acknowledged (QoS0: written) messages per second over the send window."""
        window = self.counters.send_window_s
        done = self.counters.acked if self.counters.acked else self.counters.sent
        return done / window if window > 0 else 0.0


def raise_nofile_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``needed`` (up to the hard limit).

    Returns the new soft limit; raises :class:`FleetError` when the hard limit is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise FleetError(
            f"need {needed} file descriptors but the hard limit is {hard}: raise it "
            "(ulimit -Hn, or systemd LimitNOFILE) or shard with --processes"
        )
    return soft


def _largest_filler(options: FleetOptions) -> int:
    if options.profile is None:
        return options.payload_size
    return max(t.payload_size for t in options.profile.device_types)


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run_fleet(options: FleetOptions, progress: ProgressCallback | None = None) -> FleetResult:
    """Run ``options.devices`` devices on the running loop until count/duration, then drain.

    Failures of single devices are counted, not raised. Raises :class:`FleetError` only if
    the fleet cannot start (file-descriptor limit, ledger file).
    """
    options = options.validated()
    raise_nofile_limit(options.devices + _FDS_PER_PROCESS)
    loop = asyncio.get_running_loop()
    run_id = options.run_id or new_run_id()
    counters = FleetCounters(devices=options.devices)
    latency, steady_latency = LatencyHistogram(), LatencyHistogram()
    ledger = None if options.ledger is None else AckLedgerWriter(options.ledger, run_id=run_id)
    executor = ThreadPoolExecutor(
        max_workers=options.connect_concurrency, thread_name_prefix="sim-connect"
    )

    def on_error(client: mqtt.Client, exc: BaseException) -> None:
        counters.errors += 1

    driver = PahoLoopDriver(loop, on_error)
    started = loop.time()
    limit = options.duration_s if options.duration_s is not None else options.max_time_s
    ctx = FleetContext(
        options=options,
        run_id=run_id,
        driver=driver,
        counters=counters,
        latency=latency,
        steady_latency=steady_latency,
        ledger=ledger,
        connect_gate=asyncio.Semaphore(options.connect_concurrency),
        connect_in_thread=partial(loop.run_in_executor, executor),
        started=started,
        # Publishing stops here even if devices connected late: the run is bounded in time.
        publish_deadline=started + limit,
        body=os.urandom(max(4096, _largest_filler(options) * 2)),
    )
    devices = [
        SimDevice(ctx, index)
        for index in range(options.start_index, options.start_index + options.devices)
    ]

    async def guarded(device: SimDevice) -> None:
        # One device's bug must not cancel the fleet (TaskGroup would): count it.
        try:
            await device.run()
        except Exception:
            log.exception("device %s failed", device.device_id)
            counters.errors += 1

    async def housekeeping() -> None:
        # One timer for the whole fleet: keepalives, periodic ledger flush, progress.
        while True:
            await asyncio.sleep(1.0)
            driver.misc()
            if ledger is not None:
                ledger.maybe_flush()
            if progress is not None:
                progress(counters.copy())

    try:
        async with asyncio.TaskGroup() as group:
            keeper = group.create_task(housekeeping(), name="sim-housekeeping")
            device_tasks = [
                group.create_task(guarded(device), name=f"sim-{device.device_id}")
                for device in devices
            ]
            await asyncio.gather(*device_tasks)
            keeper.cancel()
    finally:
        # A connect still running in a thread (cut off by the deadline) may open a socket
        # after its device gave up: wait for the threads, then close what is left.
        await loop.run_in_executor(None, partial(executor.shutdown, wait=True))
        for device in devices:
            driver.forget(device.client)
        if ledger is not None:
            ledger.close()
    if progress is not None:
        progress(counters.copy())
    return FleetResult(
        run_id=run_id,
        counters=counters,
        latency=latency,
        steady_latency=steady_latency,
        elapsed_s=loop.time() - started,
        ledger=options.ledger,
        peak_rss_mb=_peak_rss_mb(),
        total_rss_mb=_peak_rss_mb(),
    )


def run_simulation(
    options: FleetOptions,
    progress: ProgressCallback | None = None,
    worker_progress: WorkerProgressCallback | None = None,
) -> FleetResult:
    """Synchronous entry point: one loop here, or ``options.processes`` worker processes."""
    options = options.validated()
    if options.run_id is None:
        options = replace(options, run_id=new_run_id())
    if options.processes == 1:
        return asyncio.run(run_fleet(options, progress))
    return _run_sharded(options, progress, worker_progress)


# ----------------------------------------------------------------- multi-process


def _shard_main(options: FleetOptions, index: int, out: Any) -> None:
    """Worker process: run one shard, stream progress, send the result (or the error)."""

    def report(snapshot: FleetCounters) -> None:
        out.put(("progress", index, snapshot))

    try:
        result = asyncio.run(run_fleet(options, report))
    except Exception as exc:
        out.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    out.put(("result", index, result))


def _run_sharded(
    options: FleetOptions,
    progress: ProgressCallback | None,
    worker_progress: WorkerProgressCallback | None,
) -> FleetResult:
    started = time.monotonic()
    count = options.processes
    shards = [options.shard(i, count) for i in range(count)]
    # spawn, not fork: the parent may hold threads (and an event loop) that fork would copy.
    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_shard_main, args=(shard, i, out), name=f"sim-shard-{i}")
        for i, shard in enumerate(shards)
    ]
    for proc in procs:
        proc.start()
    # Bounded: connect ramp and retries, publishing, drain, plus slack for process start-up.
    connect_budget = options.devices / max(1.0, options.connect_rate or 1000.0) / count
    if options.profile is not None:
        connect_budget = max(
            t.connect_after_s + t.count / max(1.0, t.connect_rate or options.connect_rate or 1000.0)
            for t in options.profile.device_types
        )
    deadline = (
        started
        + options.max_time_s
        + options.drain_timeout_s
        + connect_budget
        + options.connect_attempts * (options.connect_timeout_s + options.backoff_max_s)
        + 60
    )
    snapshots: dict[int, FleetCounters] = {}
    results: dict[int, FleetResult] = {}
    errors: list[str] = []
    last_progress = 0.0
    try:
        while len(results) + len(errors) < count and time.monotonic() < deadline:
            try:
                kind, index, payload = out.get(timeout=1.0)
            except queue.Empty:
                dead = [
                    i
                    for i, p in enumerate(procs)
                    if not p.is_alive() and i not in results and p.exitcode not in (0, None)
                ]
                for i in dead:
                    if all(not e.startswith(f"shard {i}:") for e in errors):
                        errors.append(f"shard {i}: exited with code {procs[i].exitcode}")
                continue
            if kind == "progress":
                snapshots[index] = payload
                # Every shard reports each second: print the sum once a second, not K times.
                if progress is not None and time.monotonic() - last_progress >= 0.95:
                    last_progress = time.monotonic()
                    if worker_progress is not None:
                        worker_progress(dict(snapshots))
                    total = FleetCounters()
                    for snap in snapshots.values():
                        total.merge(snap)
                    progress(total)
            elif kind == "result":
                results[index] = payload
            else:
                errors.append(f"shard {index}: {payload}")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    if len(results) + len(errors) < count:
        errors.append("worker processes did not finish before the deadline")
    if errors and not results:
        raise FleetError("; ".join(errors))
    counters = FleetCounters()
    latency, steady_latency = LatencyHistogram(), LatencyHistogram()
    for result in results.values():
        counters.merge(result.counters)
        latency.merge(result.latency)
        steady_latency.merge(result.steady_latency)
    if options.ledger is not None:
        parts = [shard.ledger for shard in shards if shard.ledger is not None]
        concat_ledgers([p for p in parts if p.exists()], options.ledger)
    return FleetResult(
        run_id=options.run_id or "",
        counters=counters,
        latency=latency,
        steady_latency=steady_latency,
        elapsed_s=time.monotonic() - started,
        ledger=options.ledger,
        peak_rss_mb=max((r.peak_rss_mb for r in results.values()), default=0.0),
        processes=count,
        total_rss_mb=sum(r.peak_rss_mb for r in results.values()),
        notes=errors,
    )
