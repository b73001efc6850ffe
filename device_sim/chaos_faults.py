"""The faults the chaos harness injects, one async function per kind.

Each fault returns a :class:`FaultRecord`: what was done, when, and what was observed (rows in
the buffer before a kill, the partition leader that was killed, whether a capped buffer really
filled up). A fault that cannot run in this setup (no proxy listener, no buffer cap) is
recorded as ``skipped`` with the reason, never silently left out. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_sim.chaos_procs import GatewayRunner, SimRunner
from device_sim.chaos_schedule import PlannedFault
from device_sim.tcp_proxy import TcpProxy
from gateway.dev.kafka_ops import (
    broker_alive,
    freeze_brokers,
    partition_leaders,
    restart_broker,
    stop_broker,
    thaw_brokers,
    under_replicated,
)
from gateway.dev.kafka_state import KafkaState

__all__ = ["ChaosEnv", "FaultRecord", "inject", "restore_everything"]

_ROWS_LIVE_WAIT_S = 2.0
"""How long a kill looks for rows while Kafka flows, before it holds Kafka back."""
_ROWS_HELD_WAIT_S = 10.0
_ISR_WAIT_S = 90.0
_FULL_WAIT_S = 60.0
_RECOVER_WAIT_S = 60.0


@dataclass
class FaultRecord:
    """One injected fault, as it happened."""

    index: int
    kind: str
    planned_at_s: float
    hold_s: float
    started_at_s: float = 0.0
    ended_at_s: float = 0.0
    status: str = "done"
    """done; skipped (cannot run in this setup; ``note`` says why); failed (the gateway did
    not behave as promised, e.g. never acknowledged again); error (the harness could not
    inject it)."""
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChaosEnv:
    """Everything faults act on; ``kafka`` is replaced when a broker restarts (new pid)."""

    kafka: KafkaState
    kafka_proxies: list[TcpProxy]
    mqtt_proxy: TcpProxy
    gateway: GatewayRunner
    topics: list[str]
    rng: random.Random
    work_dir: Path
    disk_cap: bool
    storm_devices: int
    storm_args: Callable[[int], list[str]]
    """Simulator arguments for burst fleet ``k`` (without ledger/json options)."""
    t0: float = 0.0
    """time.monotonic() when the load started."""
    storms: list[SimRunner] = field(default_factory=list)
    say: Callable[[str], None] = print

    def now(self) -> float:
        """Seconds since the load started."""
        return round(time.monotonic() - self.t0, 2)


async def inject(env: ChaosEnv, planned: PlannedFault) -> FaultRecord:
    """Run one planned fault to its end (undone again); never raises except cancellation."""
    record = FaultRecord(
        index=planned.index, kind=planned.kind, planned_at_s=planned.at_s, hold_s=planned.hold_s
    )
    record.started_at_s = env.now()
    try:
        await _FAULTS[planned.kind](env, planned, record)
    except Exception as exc:
        record.status = "error"
        record.note = f"{type(exc).__name__}: {exc}"
        # Leave the system whole for the next fault and for the final drain.
        await restore_everything(env, record.details)
    record.ended_at_s = env.now()
    return record


async def restore_everything(env: ChaosEnv, details: dict[str, Any]) -> None:
    """Undo whatever a failed fault may have left: proxies, frozen or stopped brokers, a
    stopped gateway. Used after errors and before the final drain."""
    for proxy in env.kafka_proxies:
        proxy.restore()
    env.mqtt_proxy.restore()
    await asyncio.to_thread(thaw_brokers, env.kafka)
    for broker in env.kafka.brokers:
        if not broker_alive(broker):
            env.kafka = await asyncio.to_thread(restart_broker, env.kafka, broker.node_id)
            details.setdefault("restored_brokers", []).append(broker.node_id)
    if not env.gateway.running:
        await _start_gateway(env)
        details["restored_gateway"] = True


# ---------------------------------------------------------------------- helpers


async def _start_gateway(env: ChaosEnv) -> float:
    seconds = await env.gateway.start()
    env.mqtt_proxy.set_upstream(env.gateway.mqtt_port)
    return round(seconds, 2)


def _hold_kafka(env: ChaosEnv) -> str:
    """Stop Kafka answering the gateway: pause the proxies (a black hole) or SIGSTOP."""
    if env.kafka_proxies:
        for proxy in env.kafka_proxies:
            proxy.pause()
        return "proxy_pause"
    freeze_brokers(env.kafka)
    return "sigstop"


def _release_kafka(env: ChaosEnv, how: str) -> None:
    if how == "proxy_pause":
        for proxy in env.kafka_proxies:
            proxy.resume()
    else:
        thaw_brokers(env.kafka)


async def _rows_above_zero(env: ChaosEnv, within_s: float) -> int | None:
    """Poll ``buffer.rows`` until it is > 0 or time is up; returns the last value seen."""
    deadline = time.monotonic() + within_s
    rows: int | None = None
    while True:
        rows = await env.gateway.buffer_rows()
        if (rows or 0) > 0 or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.02)


async def _wait_isr(env: ChaosEnv, record: FaultRecord) -> None:
    if len(env.kafka.brokers) < 2:
        return
    deadline = time.monotonic() + _ISR_WAIT_S
    started = time.monotonic()
    while True:
        try:
            left = await under_replicated(env.kafka, env.topics)
        except Exception:  # metadata requests may fail while the node rejoins
            left = -1
        if left == 0:
            record.details["isr_whole_after_s"] = round(time.monotonic() - started, 2)
            return
        if time.monotonic() > deadline:
            record.details["under_replicated_at_end"] = left
            return
        await asyncio.sleep(0.5)


# ---------------------------------------------------------------------- faults


async def _gateway_kill(env: ChaosEnv, planned: PlannedFault, record: FaultRecord) -> None:
    if not env.gateway.running:
        await _start_gateway(env)
    rows = await _rows_above_zero(env, _ROWS_LIVE_WAIT_S)
    held = None
    if not rows:
        # Kafka keeps the buffer empty: hold it back so the kill hits stored, unsent rows.
        held = await asyncio.to_thread(_hold_kafka, env)
        rows = await _rows_above_zero(env, _ROWS_HELD_WAIT_S)
    env.mqtt_proxy.set_upstream(None)
    env.gateway.kill9()
    record.details.update(
        rows_before_kill=rows,
        buffer_nonempty=bool(rows and rows > 0),
        kafka_held=held or "no",
    )
    if held is not None:
        await asyncio.to_thread(_release_kafka, env, held)
    record.details["restart_s"] = await _start_gateway(env)


async def _broker_restart(env: ChaosEnv, planned: PlannedFault, record: FaultRecord) -> None:
    await _stop_hold_restart(env, planned, record, node_id=None, kill=False)


async def _leader_kill(env: ChaosEnv, planned: PlannedFault, record: FaultRecord) -> None:
    leaders = await partition_leaders(env.kafka, env.topics)
    counts = collections.Counter(leader for leader in leaders.values() if leader >= 0)
    if not counts:
        record.status = "skipped"
        record.note = "no partition of the written topics has a leader"
        return
    node_id, led = counts.most_common(1)[0]
    record.details["partitions_led"] = led
    record.details["partitions"] = len(leaders)
    await _stop_hold_restart(env, planned, record, node_id=node_id, kill=True)


async def _stop_hold_restart(
    env: ChaosEnv, planned: PlannedFault, record: FaultRecord, *, node_id: int | None, kill: bool
) -> None:
    if node_id is None:
        node_id = env.rng.choice([b.node_id for b in env.kafka.brokers])
    record.details["node"] = node_id
    record.details["signal"] = "SIGKILL" if kill else "SIGTERM"
    started = time.monotonic()
    await asyncio.to_thread(stop_broker, env.kafka, node_id, kill=kill)
    record.details["stop_s"] = round(time.monotonic() - started, 2)
    if kill and len(env.kafka.brokers) > 1:
        # Who took over: read while the node is down (it is not in the metadata any more).
        await asyncio.sleep(min(2.0, planned.hold_s))
        try:
            after = await partition_leaders(env.kafka, env.topics)
            record.details["leaders_after"] = sorted(set(after.values()))
        except Exception as exc:
            record.details["leaders_after"] = f"unknown ({type(exc).__name__})"
    await asyncio.sleep(max(0.0, planned.hold_s - (time.monotonic() - started)))
    env.kafka = await asyncio.to_thread(restart_broker, env.kafka, node_id)
    record.details["down_s"] = round(time.monotonic() - started, 2)
    await _wait_isr(env, record)


async def _proxy_cut(env: ChaosEnv, planned: PlannedFault, record: FaultRecord) -> None:
    if not env.kafka_proxies:
        record.status = "skipped"
        record.note = "the Kafka cluster has no proxied listener (reused without proxy ports)"
        return
    closed = sum(proxy.cut() for proxy in env.kafka_proxies)
    record.details["connections_cut"] = closed
    await asyncio.sleep(planned.hold_s)
    refused = sum(proxy.stats.refused for proxy in env.kafka_proxies)
    for proxy in env.kafka_proxies:
        proxy.restore()
    record.details["refused_total"] = refused


async def _disk_full(env: ChaosEnv, planned: PlannedFault, record: FaultRecord) -> None:
    if not env.disk_cap:
        record.status = "skipped"
        record.note = "buffer.max_file_bytes is not accepted by this gateway (check-config)"
        return
    first = await env.gateway.status()
    if first is None:
        raise RuntimeError("gateway status unavailable")
    failures0 = int(first["buffer"].get("commit_failures", 0))
    held = await asyncio.to_thread(_hold_kafka, env)
    record.details["kafka_held"] = held
    started = time.monotonic()
    reached: dict[str, Any] | None = None
    try:
        while time.monotonic() - started < _FULL_WAIT_S:
            status = await env.gateway.status()
            buf = (status or {}).get("buffer", {})
            if buf.get("full") or int(buf.get("commit_failures", 0)) > failures0:
                reached = buf
                break
            await asyncio.sleep(0.5)
        record.details["reached_full"] = reached is not None
        if reached is None:
            record.note = f"buffer not full after {_FULL_WAIT_S:.0f}s of held Kafka"
            return
        record.details["full_after_s"] = round(time.monotonic() - started, 2)
        record.details["rows_at_full"] = reached.get("rows")
        before = await env.gateway.status()
        await asyncio.sleep(planned.hold_s)
        after = await env.gateway.status()
        if before is not None and after is not None:
            grew = after["buffer"]["rows_committed"] - before["buffer"]["rows_committed"]
            record.details["rows_committed_while_full"] = grew
    finally:
        await asyncio.to_thread(_release_kafka, env, held)
    mark = await env.gateway.status()
    committed = int(mark["buffer"]["rows_committed"]) if mark else 0
    resumed_at = time.monotonic()
    while time.monotonic() - resumed_at < _RECOVER_WAIT_S:
        status = await env.gateway.status()
        if status is not None and int(status["buffer"]["rows_committed"]) > committed:
            record.details["acks_resumed_after_s"] = round(time.monotonic() - resumed_at, 2)
            break
        await asyncio.sleep(0.5)
    else:
        record.details["acks_resumed_after_s"] = None
        final = await env.gateway.status()
        record.status = "failed"
        record.note = (
            f"acknowledgements did not resume within {_RECOVER_WAIT_S:.0f}s after Kafka "
            f"returned (buffer rows {final and final['buffer']['rows']})"
        )


async def _storm(env: ChaosEnv, planned: PlannedFault, record: FaultRecord) -> None:
    dropped = env.mqtt_proxy.drop_all()
    record.details["connections_dropped"] = dropped
    if env.storm_devices > 0:
        burst = SimRunner(f"storm{len(env.storms)}", env.work_dir, env.storm_args(len(env.storms)))
        env.storms.append(burst.start())
        record.details["burst_devices"] = env.storm_devices
        record.details["burst_fleet"] = burst.name
    await asyncio.sleep(5.0)
    record.details["connections_after_5s"] = env.mqtt_proxy.active


_FAULTS: dict[str, Callable[[ChaosEnv, PlannedFault, FaultRecord], Any]] = {
    "gateway_kill": _gateway_kill,
    "broker_restart": _broker_restart,
    "leader_kill": _leader_kill,
    "proxy_cut": _proxy_cut,
    "disk_full": _disk_full,
    "storm": _storm,
}
