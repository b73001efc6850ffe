"""The project's own local Apache Kafka (KRaft, mutual TLS, loopback only).

Used by the test session, CI and the demo; never by the gateway in production. The broker
jars come from Maven Central (``kafka_dist``), the config is rendered by pure functions
(``kafka_props``), the chosen ports and pids go to a state file (``kafka_state``), the JVMs
are run by ``kafka_proc`` and topics are made through ``kafka_admin``; this module holds the
lifecycle and re-exports the names callers need; ``kafka_ops`` stops, kills, freezes and
restarts single brokers with their data kept (the chaos harness's faults).

Version pin: Kafka 4.4.0, the newest on Maven Central here (4.0.0 … 4.4.0 are served).
Nothing had to be given up for it: aiokafka 0.14 works against it for idempotent produce
with acks=all, consumer groups committing offsets, transactions (commit, abort,
send_offsets_to_transaction) and read_committed consumers (tests/test_kafka_local.py).
A fresh 4.4 cluster finalizes ``transaction.version=2``; aiokafka still speaks the older
transaction requests (AddPartitionsToTxn and friends), which the broker keeps serving.
Re-check those tests before moving the pin; if a newer 4.x breaks aiokafka, step back
toward 4.0.x, then 3.9.x, and record what broke here.

Sync API (start/stop are blocking process management; from async code call them through
``asyncio.to_thread``). Topic creation has an async form for code already in a loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import shutil
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError as AIOKafkaError

from gateway.dev.kafka_admin import (
    DEFAULT_PARTITIONS,
    client_ssl_context,
    create_topics,
    create_topics_async,
    registered_brokers,
    run_sync,
)
from gateway.dev.kafka_dist import ensure_kafka_libs
from gateway.dev.kafka_ops import (
    broker_alive,
    freeze_brokers,
    partition_leaders,
    restart_broker,
    stop_broker,
    thaw_brokers,
    under_replicated,
)
from gateway.dev.kafka_proc import (
    format_storage,
    is_alive,
    launch_node,
    log_tail,
    looks_like_our_broker,
    pick_free_ports,
    port_open,
    terminate_groups,
)
from gateway.dev.kafka_props import (
    KAFKA_VERSION,
    BrokerTls,
    NodeLayout,
    bootstrap_string,
    new_cluster_id,
    render_log4j2,
    render_properties,
    server_properties,
)
from gateway.dev.kafka_sasl import (
    SASL_MECHANISMS,
    new_sasl_user,
    scram_format_args,
    write_password_file,
)
from gateway.dev.kafka_state import (
    BrokerState,
    KafkaState,
    SaslState,
    read_state,
    state_path,
    write_private_text,
    write_state,
)
from gateway.errors import LocalKafkaError
from gateway.pki import init_pki

__all__ = [
    "DEFAULT_PARTITIONS",
    "DEFAULT_TOPICS",
    "KAFKA_VERSION",
    "BrokerStatus",
    "KafkaState",
    "KafkaStatus",
    "LocalKafka",
    "broker_alive",
    "client_ssl_context",
    "create_topics",
    "create_topics_async",
    "freeze_brokers",
    "kafka_status",
    "partition_leaders",
    "read_state",
    "restart_broker",
    "start_kafka",
    "state_path",
    "stop_broker",
    "stop_kafka",
    "thaw_brokers",
    "under_replicated",
]

_log = logging.getLogger(__name__)

DEFAULT_TOPICS: tuple[str, ...] = (
    "iot.telemetry",
    "iot.events",
    "iot.bulk",
    "iot.dlq",
    "iot.commands",
    "iot.commands.tidegate-dev",  # configs/dev.toml: [commands] topic for gateway tidegate-dev
    "iot.command-results",
    "iot.lifecycle",
    "iot.firmware",
    "iot.firmware-status",
)

_PORT_ATTEMPTS = 3
_STOP_TIMEOUT_S = 30.0


def start_kafka(
    data_dir: Path,
    pki_dir: Path,
    *,
    brokers: int = 1,
    version: str = KAFKA_VERSION,
    topics: Sequence[str] = DEFAULT_TOPICS,
    partitions: int = DEFAULT_PARTITIONS,
    ready_timeout_s: float = 180.0,
    proxy_ports: Sequence[int] | None = None,
) -> KafkaState:
    """Start a fresh local cluster in ``data_dir`` and return its state (also written to
    ``<data_dir>/state.json``).

    Creates the PKI in ``pki_dir`` if missing (an existing CA is kept), fetches the jars on
    first use, formats storage, launches ``brokers`` combined broker+controller nodes, waits
    until every broker is registered (over mutual TLS, as a client would), then creates
    ``topics``. Each start wipes the previous node directories: data does not survive.
    Every node also gets a SASL_SSL listener (``state.sasl_bootstrap``) with a dev user whose
    random password is written to ``<data_dir>/sasl-password`` (0600; gateway/dev/kafka_sasl.py).
    Raises :class:`LocalKafkaError` if a cluster is already running in ``data_dir`` or the
    start fails; on failure nothing is left running.

    ``proxy_ports`` (one per broker, ports of TCP proxies the caller already listens on) adds
    a second mutual-TLS client listener ``PROXIED`` on each node, advertised as that proxy
    port: a client bootstrapping through ``state.proxy_bootstrap`` reaches every broker only
    through the proxies (the chaos harness cuts them). The proxies forward to each broker's
    ``proxied_port``. ``state.bootstrap`` stays direct.
    """
    if not 1 <= brokers <= 5:
        raise LocalKafkaError(f"brokers must be between 1 and 5, got {brokers}")
    if proxy_ports is not None and len(proxy_ports) != brokers:
        raise LocalKafkaError(f"proxy_ports: {len(proxy_ports)} ports for {brokers} brokers")
    # Ports per node: SSL, INTERNAL, CONTROLLER, SASL, then PROXIED if asked for.
    per_node = 4 if proxy_ports is None else 5
    data_dir = data_dir.resolve()
    existing = kafka_status(data_dir)
    if existing.state is not None:
        if existing.any_alive:
            raise LocalKafkaError(
                f"a local Kafka is already running in {data_dir} ({existing.state.bootstrap}); "
                "stop it first"
            )
        state_path(data_dir).unlink(missing_ok=True)  # stale: its processes are gone

    pki = init_pki(pki_dir.resolve())
    libs = ensure_kafka_libs(version)
    data_dir.mkdir(parents=True, exist_ok=True)
    tls = BrokerTls(
        ca_pem=pki.ca_cert.read_text(),
        cert_pem=pki.broker_cert.read_text(),
        key_pem=pki.broker_key.read_text(),
    )
    log4j = data_dir / "log4j2.properties"
    log4j.write_text(render_log4j2())
    cluster_id = new_cluster_id()
    sasl_user = new_sasl_user()
    sasl = SaslState(
        username=sasl_user.username,
        password_file=write_password_file(data_dir, sasl_user),
        mechanisms=SASL_MECHANISMS,
    )

    for attempt in range(1, _PORT_ATTEMPTS + 1):
        ports = pick_free_ports(per_node * brokers)
        nodes = [
            NodeLayout(
                node_id=i + 1,
                ssl_port=ports[per_node * i],
                internal_port=ports[per_node * i + 1],
                controller_port=ports[per_node * i + 2],
                node_dir=data_dir / f"node-{i + 1}",
                sasl_port=ports[per_node * i + 3],
                proxied_port=None if proxy_ports is None else ports[per_node * i + 4],
                proxy_advertised_port=None if proxy_ports is None else proxy_ports[i],
            )
            for i in range(brokers)
        ]
        for node in nodes:
            shutil.rmtree(node.node_dir, ignore_errors=True)
            node.node_dir.mkdir(parents=True)
            settings = server_properties(
                node, nodes, tls=tls, partitions=partitions, sasl_users=[sasl_user]
            )
            # 0600: the file inlines the broker's private key.
            write_private_text(node.properties_path, render_properties(settings))
        format_storage(libs, log4j, nodes, cluster_id, scram_format_args([sasl_user]))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for node in nodes:
                procs.append(launch_node(libs, log4j, node))
        except BaseException:
            terminate_groups([proc.pid for proc in procs], timeout=_STOP_TIMEOUT_S)
            raise
        state = KafkaState(
            version=version,
            cluster_id=cluster_id,
            bootstrap=bootstrap_string(nodes),
            data_dir=data_dir,
            started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            pki_dir=pki.directory,
            ca_file=pki.ca_cert,
            cert_file=pki.gateway_cert,
            key_file=pki.gateway_key,
            brokers=tuple(
                BrokerState(
                    node_id=node.node_id,
                    pid=proc.pid,
                    ssl_port=node.ssl_port,
                    internal_port=node.internal_port,
                    controller_port=node.controller_port,
                    log=node.log_path,
                    properties=node.properties_path,
                    proxied_port=node.proxied_port,
                    proxy_port=node.proxy_advertised_port,
                    sasl_port=node.sasl_port,
                )
                for node, proc in zip(nodes, procs, strict=True)
            ),
            sasl=sasl,
        )
        # Written before readiness so that whatever happens next, the cluster is stoppable
        # from the CLI even if this process dies.
        write_state(state)
        try:
            run_sync(functools.partial(_wait_ready, state, ready_timeout_s))
        except _PortTakenError as exc:
            _stop_pids(state)
            state_path(data_dir).unlink(missing_ok=True)
            _log.warning("attempt %d: %s; retrying with new ports", attempt, exc)
            continue
        except BaseException:
            _stop_pids(state)
            state_path(data_dir).unlink(missing_ok=True)
            raise
        try:
            if topics:
                create_topics(state, topics, partitions=partitions)
        except BaseException:
            stop_kafka(state.state_file)
            raise
        return state
    raise LocalKafkaError(f"could not find free ports after {_PORT_ATTEMPTS} attempts")


def stop_kafka(state_file: Path, *, timeout_s: float = _STOP_TIMEOUT_S) -> bool:
    """Stop the cluster described by ``state_file`` (or a data dir holding ``state.json``).

    SIGTERM to every node's process group, SIGKILL for those still alive after ``timeout_s``,
    then the state file is removed. Idempotent: returns False if there was no state file.
    """
    path = state_path(state_file) if state_file.is_dir() else state_file
    if not path.exists():
        return False
    state = read_state(path)
    killed = _stop_pids(state, timeout_s=timeout_s)
    if killed:
        _log.warning("kafka nodes %s did not stop within %.0fs; killed", killed, timeout_s)
    path.unlink(missing_ok=True)
    return True


@dataclass(frozen=True)
class BrokerStatus:
    """Liveness of one node, from its pid and its client port."""

    node_id: int
    pid: int
    alive: bool
    port_open: bool


@dataclass(frozen=True)
class KafkaStatus:
    """What ``status`` found for a data dir; ``state`` is None without a state file."""

    state: KafkaState | None
    brokers: tuple[BrokerStatus, ...]

    @property
    def running(self) -> bool:
        """Every node's process is alive and accepts connections."""
        return bool(self.brokers) and all(b.alive and b.port_open for b in self.brokers)

    @property
    def any_alive(self) -> bool:
        """At least one node's process is still alive."""
        return any(b.alive for b in self.brokers)


def kafka_status(data_dir: Path) -> KafkaStatus:
    """Read ``<data_dir>/state.json`` (if any) and check each node's pid and port."""
    path = state_path(data_dir)
    if not path.exists():
        return KafkaStatus(state=None, brokers=())
    state = read_state(path)
    return KafkaStatus(
        state=state,
        brokers=tuple(
            BrokerStatus(
                node_id=b.node_id,
                pid=b.pid,
                alive=is_alive(b.pid) and looks_like_our_broker(b.pid, b.properties),
                port_open=port_open(b.ssl_port),
            )
            for b in state.brokers
        ),
    )


class LocalKafka:
    """A local cluster as a context manager: ``with LocalKafka(dir, pki) as state: ...``.

    ``start`` and ``stop`` are idempotent; ``stop`` also runs when the block raises.
    """

    def __init__(self, data_dir: Path, pki_dir: Path, *, brokers: int = 1, **options: Any) -> None:
        self._data_dir = data_dir
        self._pki_dir = pki_dir
        self._brokers = brokers
        self._options = options
        self._state: KafkaState | None = None

    @property
    def state(self) -> KafkaState:
        """The running cluster's state; raises if not started."""
        if self._state is None:
            raise LocalKafkaError("local Kafka is not started")
        return self._state

    def start(self) -> KafkaState:
        """Start the cluster unless this object already did."""
        if self._state is None:
            self._state = start_kafka(
                self._data_dir, self._pki_dir, brokers=self._brokers, **self._options
            )
        return self._state

    def stop(self) -> None:
        """Stop the cluster if this object started it."""
        if self._state is not None:
            stop_kafka(self._state.state_file)
            self._state = None

    def __enter__(self) -> KafkaState:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _PortTakenError(LocalKafkaError):
    """A node could not bind a chosen port (taken between picking and binding)."""


def _stop_pids(state: KafkaState, *, timeout_s: float = _STOP_TIMEOUT_S) -> list[int]:
    ours = [b.pid for b in state.brokers if looks_like_our_broker(b.pid, b.properties)]
    return terminate_groups(ours, timeout=timeout_s)


async def _wait_ready(state: KafkaState, limit_s: float) -> None:
    """Poll until every node runs and all brokers are registered, or fail with log tails."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    expected = len(state.brokers)
    while True:
        for broker in state.brokers:
            if not is_alive(broker.pid):
                tail = log_tail(broker.log)
                # The whole log, not the tail: shutdown lines follow the bind error. The log is
                # fresh for each attempt (node directories are wiped), so a match is this one.
                if "Address already in use" in log_tail(broker.log, lines=100_000):
                    raise _PortTakenError(f"node {broker.node_id}: a chosen port was taken")
                raise LocalKafkaError(
                    f"kafka node {broker.node_id} exited during start; log {broker.log}:\n{tail}"
                )
        if all(port_open(b.ssl_port) for b in state.brokers):
            try:
                # Short per-probe bound: a healthy loopback broker answers in milliseconds, and
                # between probes the loop notices a node that died (e.g. port taken).
                async with asyncio.timeout(max(1.0, min(5.0, deadline - loop.time()))):
                    if await registered_brokers(state) >= expected:
                        return
            except (AIOKafkaError, OSError, TimeoutError, ssl.SSLError) as exc:
                _log.debug("kafka not ready yet: %r", exc)
        if loop.time() >= deadline:
            tails = "\n".join(
                f"--- node {b.node_id} ({b.log}):\n{log_tail(b.log)}" for b in state.brokers
            )
            raise LocalKafkaError(f"kafka did not become ready within {limit_s:.0f}s\n{tails}")
        await asyncio.sleep(0.2)  # polling a condition; the deadline above bounds it
