"""Faults on a running local cluster, for the chaos harness: stop, kill, freeze and restart
single brokers while keeping their data, and find partition leaders.

``start_kafka`` formats fresh storage on every start; :func:`restart_broker` instead relaunches
one node with its existing ``server.properties`` and log dir (same node id, same ports, no
format), as an operator restarting a broker would, and records the new pid in the state file.

Sync API for process management (call through ``asyncio.to_thread`` from a loop);
:func:`partition_leaders` is async.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Iterable

from gateway.dev.kafka_admin import open_admin
from gateway.dev.kafka_dist import ensure_kafka_libs
from gateway.dev.kafka_proc import (
    is_alive,
    launch_node,
    log_tail,
    looks_like_our_broker,
    port_open,
    terminate_groups,
)
from gateway.dev.kafka_props import NodeLayout
from gateway.dev.kafka_state import BrokerState, KafkaState, write_state
from gateway.errors import LocalKafkaError

__all__ = [
    "broker_alive",
    "freeze_brokers",
    "partition_leaders",
    "restart_broker",
    "stop_broker",
    "thaw_brokers",
    "under_replicated",
]


def broker_alive(broker: BrokerState) -> bool:
    """The broker's recorded process runs and is really that broker (pid-reuse safe)."""
    return is_alive(broker.pid) and looks_like_our_broker(broker.pid, broker.properties)


def stop_broker(
    state: KafkaState, node_id: int, *, kill: bool = False, timeout_s: float = 30.0
) -> None:
    """Stop one node, keeping its data: SIGTERM (controlled shutdown; SIGKILL after
    ``timeout_s``), or SIGKILL at once with ``kill=True`` (a crash). Waits until it is gone.

    A node that is not running is left alone.
    """
    broker = state.broker(node_id)
    if not broker_alive(broker):
        return
    if kill:
        _signal_group(broker.pid, signal.SIGKILL)
        timeout_s = 10.0
    terminate_groups([broker.pid], timeout=timeout_s)
    if is_alive(broker.pid):
        raise LocalKafkaError(f"kafka node {node_id} (pid {broker.pid}) did not stop")


def restart_broker(
    state: KafkaState, node_id: int, *, ready_timeout_s: float = 120.0
) -> KafkaState:
    """Relaunch a stopped node from its existing properties and data (no format), wait until
    its client port accepts connections, write the new pid to the state file, return the new
    state. Raises :class:`LocalKafkaError` if the node is still running or does not come up.
    """
    broker = state.broker(node_id)
    if broker_alive(broker):
        raise LocalKafkaError(f"kafka node {node_id} is still running (pid {broker.pid})")
    if not broker.properties.is_file():
        raise LocalKafkaError(f"kafka node {node_id}: {broker.properties} is gone")
    libs = ensure_kafka_libs(state.version)
    log4j = state.data_dir / "log4j2.properties"
    layout = NodeLayout(
        node_id=broker.node_id,
        ssl_port=broker.ssl_port,
        internal_port=broker.internal_port,
        controller_port=broker.controller_port,
        node_dir=broker.properties.parent,
        proxied_port=broker.proxied_port,
        proxy_advertised_port=broker.proxy_port,
        sasl_port=broker.sasl_port,
    )
    proc = launch_node(libs, log4j, layout)
    restarted = dataclasses.replace(broker, pid=proc.pid)
    new_state = dataclasses.replace(
        state,
        brokers=tuple(restarted if b.node_id == node_id else b for b in state.brokers),
    )
    # Written at once so the relaunched JVM is stoppable from the CLI whatever happens next.
    write_state(new_state)
    deadline = time.monotonic() + ready_timeout_s
    while not port_open(broker.ssl_port):
        if not is_alive(proc.pid):
            raise LocalKafkaError(
                f"kafka node {node_id} exited during restart; log {broker.log}:\n"
                f"{log_tail(broker.log)}"
            )
        if time.monotonic() > deadline:
            raise LocalKafkaError(
                f"kafka node {node_id} did not listen within {ready_timeout_s:.0f}s after "
                f"restart; log {broker.log}:\n{log_tail(broker.log)}"
            )
        time.sleep(0.2)  # polling a condition with a deadline
    return new_state


def freeze_brokers(state: KafkaState, node_ids: Iterable[int] | None = None) -> list[int]:
    """SIGSTOP the given nodes (default: all running ones): they keep their sockets open but
    answer nothing, like a hung broker or a black-holed network. Returns the frozen node ids;
    :func:`thaw_brokers` must follow."""
    return _signal_brokers(state, node_ids, signal.SIGSTOP)


def thaw_brokers(state: KafkaState, node_ids: Iterable[int] | None = None) -> list[int]:
    """SIGCONT the given nodes (default: all running ones)."""
    return _signal_brokers(state, node_ids, signal.SIGCONT)


async def partition_leaders(
    state: KafkaState, topics: Iterable[str], *, timeout_s: float = 15.0
) -> dict[tuple[str, int], int]:
    """``(topic, partition) → leader node id`` from the cluster's metadata (-1: no leader).

    Asks over the direct (not proxied) listeners, so it works while a proxy is cut.
    """
    names = list(dict.fromkeys(topics))
    async with asyncio.timeout(timeout_s):
        admin = await open_admin(state)
        try:
            described = await admin.describe_topics(names)
        finally:
            await admin.close()
    leaders: dict[tuple[str, int], int] = {}
    for topic in described:
        for part in topic.get("partitions", []):
            leaders[(topic["topic"], int(part["partition"]))] = int(part["leader"])
    return leaders


async def under_replicated(
    state: KafkaState, topics: Iterable[str], *, timeout_s: float = 15.0
) -> int:
    """How many partitions of ``topics`` have fewer in-sync replicas than replicas, or no
    leader (0: the cluster is whole again after a restart)."""
    names = list(dict.fromkeys(topics))
    async with asyncio.timeout(timeout_s):
        admin = await open_admin(state)
        try:
            described = await admin.describe_topics(names)
        finally:
            await admin.close()
    count = 0
    for topic in described:
        for part in topic.get("partitions", []):
            if int(part["leader"]) < 0 or len(part["isr"]) < len(part["replicas"]):
                count += 1
    return count


def _signal_brokers(
    state: KafkaState, node_ids: Iterable[int] | None, sig: signal.Signals
) -> list[int]:
    wanted = None if node_ids is None else set(node_ids)
    done: list[int] = []
    for broker in state.brokers:
        if wanted is not None and broker.node_id not in wanted:
            continue
        if broker_alive(broker):
            _signal_group(broker.pid, sig)
            done.append(broker.node_id)
    return done


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Brokers run in their own session (launch_node), so the group id is the pid.
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
