"""The running gateway: buffer, embedded broker, forwarder and admin API, started and
stopped in order.

Start order is buffer → forwarder → broker → admin, so nothing is acknowledged before
the buffer can store it. Shutdown runs in reverse: the broker closes its listeners and
connections first (no new PUBACKs), the forwarder's producer is stopped within half the
shutdown deadline, and the buffer commits whatever is pending before it closes. Nothing
acknowledged can be pending: a PUBACK always follows its commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.forwarder import Forwarder
from bridge.records import RecordBuilder
from edge.broker import EdgeBroker
from edge.buffer import Buffer
from edge.ingest import SessionObserver
from edge.intake import Intake
from edge.lifecycle import internal_classes
from edge.quotas import quota_status
from edge.routing import TopicRouter
from gateway.admin import AdminServer, encode_payload, write_token
from gateway.commands_service import CommandService
from gateway.config import GatewayConfig
from gateway.device_rates import CountingSink
from gateway.errors import TidegateError
from gateway.firmware_service import FirmwareService
from gateway.gc_tuning import gc_status, tune_gc
from gateway.health import read_admin_token, readiness
from gateway.lifecycle_service import LifecycleService
from gateway.limits import raise_fd_limit
from gateway.metrics import GatewayMetrics
from gateway.reload import SecurityReloader
from gateway.security_setup import (
    broker_security,
    listener_tls_contexts,
    revocation,
    tenant_map,
    tenant_shares,
)
from gateway.shutdown import drain, drain_budget

__all__ = ["RUNTIME_FILE", "Gateway", "read_runtime"]

log = logging.getLogger(__name__)

RUNTIME_FILE = "runtime.json"
"""Written to ``gateway.data_dir`` once listening: pid, MQTT and admin addresses."""


class GatewayLockedError(TidegateError):
    """Another gateway process already owns this data directory."""


def read_runtime(data_dir: Path) -> dict[str, Any] | None:
    """The runtime file of a running gateway, or None."""
    try:
        data: dict[str, Any] = json.loads((data_dir / RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data


class Gateway:
    """One gateway. ``async with Gateway(cfg) as gw: await gw.stopped()``."""

    def __init__(self, config: GatewayConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.started_at = time.time()
        self._gc_frozen = 0
        """Objects frozen out of the garbage collector at start (gateway/gc_tuning.py)."""
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        lifecycle = config.lifecycle if config.lifecycle and config.lifecycle.enabled else None
        # Lifecycle records are rows of internal classes ("!..."): same buffer, same
        # forwarder, never reachable by a device publish (the router knows only config.classes).
        classes = {**config.classes, **(internal_classes(lifecycle) if lifecycle else {})}
        self.buffer = Buffer(
            config.buffer_path,
            config.buffer,
            classes,
            relaxed_release=config.kafka.delivery != "exactly_once",
        )
        self.tenants = tenant_map(config)
        self.buffer.tenant_shares = tenant_shares(config, self.tenants)
        router = TopicRouter(config.routing.uplink_pattern, config.classes.keys())
        self.intake = Intake(self.buffer, router, config.classes)
        self.commands = (
            None
            if config.commands is None
            else CommandService(config, config.commands, self.buffer, self.tenants)
        )
        self.firmware = (
            None
            if config.firmware is None
            else FirmwareService(config, config.firmware, self.buffer)
        )
        self.forwarder = Forwarder(
            self.buffer,
            RecordBuilder(
                gateway_id=config.gateway.id,
                class_topics={n: c.kafka_topic for n, c in classes.items()},
                content_types={n: c.content_type for n, c in classes.items()},
                dead_letter_topic=config.routing.dead_letter_topic,
                tenants=self.tenants,
            ),
            config.kafka,
            lease_batch=config.buffer.lease_batch,
            gateway_id=config.gateway.id,
        )
        self.lifecycle = (
            None
            if lifecycle is None
            else LifecycleService(
                lifecycle,
                gateway_id=config.gateway.id,
                buffer=self.buffer,
                kafka_state=self._kafka_state,
                started_at=self.started_at,
            )
        )
        self.device_counts = CountingSink(self.intake)  # the dashboard's per-device rates
        security = broker_security(config, self.tenants)
        self.broker = EdgeBroker(
            listeners=[(x.name, x.host, x.port) for x in config.broker.listeners],
            sink=self.device_counts,
            observer=self._observer(),
            max_inflight_per_session=config.broker.max_inflight_per_session,
            uplink_prefix=router.device_topic_prefix(),
            allow_anonymous=config.broker.allow_anonymous,
            tls=listener_tls_contexts(config),
            password_file=config.broker.password_file,
            security=security,
            lifecycle=self.lifecycle,
            revocation=revocation(config),
        )
        # SIGHUP re-reads the security settings from config_path (gateway/reload.py).
        self.reloader = SecurityReloader(self, config_path)
        if self.commands is not None:
            self.commands.attach(self.broker, self.intake)
        if self.firmware is not None:
            self.firmware.attach(self.broker, self.intake)
        self.admin = AdminServer(config.admin.host, config.admin.port, self)
        self.prometheus = GatewayMetrics(self)
        self._stack = contextlib.AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None

    def _observer(self) -> SessionObserver:
        observer: SessionObserver = (
            self.buffer if self.commands is None else self.commands.observer(self.buffer)
        )
        return observer if self.firmware is None else self.firmware.observer(observer)

    def request_stop(self) -> None:
        """Ask the gateway to shut down (SIGTERM handler)."""
        self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`; then shut down within the configured deadline."""
        deadline = self.config.gateway.shutdown_deadline_s
        data_dir = self.config.gateway.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock(data_dir)
        raise_fd_limit()  # one descriptor per device: 10,000 devices need more than 1,024
        self.admin.token = write_token(data_dir, read_admin_token(self.config.admin.token_file))
        try:
            async with self.buffer:
                await self.buffer.mark_all_disconnected()
                async with asyncio.TaskGroup() as tasks:
                    forwarder = tasks.create_task(self.forwarder.run(), name="forwarder")
                    commands = (
                        None
                        if self.commands is None
                        else tasks.create_task(self.commands.run(), name="commands")
                    )
                    firmware = (
                        None
                        if self.firmware is None
                        else tasks.create_task(self.firmware.run(), name="firmware")
                    )
                    heartbeat = (
                        None
                        if self.lifecycle is None
                        else tasks.create_task(self.lifecycle.run(), name="lifecycle-heartbeat")
                    )
                    try:
                        async with self.broker, self.admin:
                            self._install_sighup()
                            self._write_runtime(data_dir)
                            self._gc_frozen = tune_gc()
                            log.info(
                                "gateway %s running: mqtt %s, admin %s, buffer %s, loop %s",
                                self.config.gateway.id,
                                self.broker.bound_addresses,
                                self.admin.bound,
                                self.config.buffer_path,
                                type(asyncio.get_running_loop()).__module__.split(".")[0],
                            )
                            await self._stop.wait()
                            log.info("stopping: closing listeners")
                    finally:
                        # The broker is closed: nothing new is acknowledged. Rows that are
                        # not yet in Kafka stay in the buffer for the next start.
                        if heartbeat is not None and self.lifecycle is not None:
                            heartbeat.cancel()
                            await self.lifecycle.flush(deadline=min(2.0, deadline / 4))
                        if self._stop.is_set():  # a requested stop: hand Kafka what it takes
                            await drain(
                                lambda: self.buffer.stats.rows,
                                lambda: self.forwarder.status.forwarded,
                                drain_budget(deadline),
                            )
                        forwarder.cancel()
                        if commands is not None and self.commands is not None:
                            commands.cancel()
                            await self.commands.close(deadline=max(1.0, deadline / 4))
                        if firmware is not None and self.firmware is not None:
                            firmware.cancel()
                            await self.firmware.close(deadline=max(1.0, deadline / 4))
                        await self.forwarder.close(deadline=max(1.0, deadline / 2))
        finally:
            with contextlib.suppress(OSError):
                (data_dir / RUNTIME_FILE).unlink()
            self._release_lock()

    def _install_sighup(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # main thread
            loop.add_signal_handler(signal.SIGHUP, self.reloader.request)

    def _take_lock(self, data_dir: Path) -> None:
        fd = os.open(data_dir / "gateway.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise GatewayLockedError(
                f"{data_dir}: another gateway is running with this data directory"
            ) from exc
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _write_runtime(self, data_dir: Path) -> None:
        runtime = {
            "pid": os.getpid(),
            "gateway_id": self.config.gateway.id,
            "mqtt": [
                {"name": name, "host": host, "port": port}
                for name, (host, port) in self.broker.bound_addresses.items()
            ],
            "admin": None
            if self.admin.bound is None
            else {"host": self.admin.bound[0], "port": self.admin.bound[1]},
        }
        tmp = data_dir / (RUNTIME_FILE + ".tmp")
        tmp.write_text(json.dumps(runtime))
        tmp.replace(data_dir / RUNTIME_FILE)

    async def devices(self) -> list[dict[str, Any]]:
        """The device registry (``GET /devices``), with publishes counted since start."""
        return [
            {**dataclasses.asdict(d), "messages": self.device_counts.count(d.device_id)}
            for d in await self.buffer.devices()
        ]

    async def dead_letters(self, limit: int, after_id: int) -> list[dict[str, Any]]:
        """``GET /dead-letters``: payloads base64, message ids as on Kafka."""
        gateway_id = self.config.gateway.id
        out = []
        for dead in await self.buffer.list_dead_letters(limit=limit, after_id=after_id):
            item = dataclasses.asdict(dead)
            item["payload"] = encode_payload(dead.payload)
            item["payload_bytes"] = len(dead.payload)
            item["message_id"] = f"{gateway_id}:{dead.row_id}"
            out.append(item)
        return out

    async def replay_dead_letters(self, ids: Sequence[int] | None) -> int:
        """``POST /dead-letters/replay``: back into the uplink queue, same message ids."""
        count = await self.buffer.replay_dead_letters(ids)
        log.warning("admin: replayed %d dead letters (%s)", count, "all" if ids is None else ids)
        return count

    async def purge_dead_letters(self, ids: Sequence[int] | None) -> int:
        """``POST /dead-letters/purge``: delete for good."""
        count = await self.buffer.purge_dead_letters(ids)
        log.warning("admin: purged %d dead letters (%s)", count, "all" if ids is None else ids)
        return count

    async def drops(self, after_id: int, limit: int) -> list[dict[str, Any]]:
        """``GET /drops``: the drop ledger in the verifier's format (docs/simulator.md)."""
        gateway_id = self.config.gateway.id
        return [
            {
                "id": d.id,
                "device_id": d.device_id,
                "class": d.class_name,
                "reason": d.reason,
                "msg_id": d.msg_id,
                "seq": d.seq,
                "gateway_message_id": None
                if d.message_id is None
                else f"{gateway_id}:{d.message_id}",
                "topic": d.topic,
                "dropped_ms": d.dropped_ms,
            }
            for d in await self.buffer.list_drops(after_id=after_id, limit=limit)
        ]

    def status(self) -> dict[str, Any]:
        """The facts ``tidegate status`` prints."""
        stats = self.buffer.stats
        now_ms = time.time_ns() // 1_000_000
        fwd = self.forwarder.status
        return {
            "gateway_id": self.config.gateway.id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "listeners": {
                name: f"{host}:{port}" for name, (host, port) in self.broker.bound_addresses.items()
            },
            "security": {
                "auth_failures": self.broker.stats.auth_failures,
                "tls_handshake_failures": self.broker.stats.tls_handshake_failures,
                "publishes_denied": self.broker.stats.publishes_denied,
                "subscriptions_denied": self.broker.stats.subscriptions_denied,
                "wills_denied": self.broker.stats.wills_denied,
                "acl": self.config.broker.acl.enabled,
                "allow_anonymous": self.config.broker.allow_anonymous,
                "reload": self.reloader.status(),
            },
            "quotas": quota_status(self.broker.security.quotas),
            "buffer": {
                **dataclasses.asdict(stats),
                "path": str(self.config.buffer_path),
                "oldest_age_s": None
                if stats.oldest_ingest_ms is None
                else round((now_ms - stats.oldest_ingest_ms) / 1000, 3),
                "full": self.buffer.is_full,
                "wal": self.buffer.wal_status(),
            },
            "kafka": {
                "connected": fwd.kafka_connected,
                "bootstrap": self.config.kafka.bootstrap_servers,
                "last_error": fwd.last_error,
                "last_error_age_s": None
                if fwd.last_error_at is None
                else round(time.time() - fwd.last_error_at, 1),
                "forwarded": fwd.forwarded,
                "batches": fwd.batches,
                "failed_batches": fwd.failed_batches,
                "lease_s": round(fwd.lease_s, 3),
                "send_s": round(fwd.send_s, 3),
                "release_s": round(fwd.release_s, 3),
                "releases_overlapped": fwd.releases_overlapped,
                "producer_rebuilds": fwd.producer_rebuilds,
                "delivery": self.config.kafka.delivery,
                "breaker": self.forwarder.breaker.snapshot(),
                "dead_lettered": fwd.dead_lettered,
                "dead_letters_forwarded": fwd.dead_letters_forwarded,
                "recoveries": fwd.recoveries,
                "recovered_rows": fwd.recovered_rows,
                "send_worker": None
                if self.forwarder.send_worker is None
                else dataclasses.asdict(self.forwarder.send_worker.stats),
            },
            "intake": {"unrouted": self.intake.unrouted},
            "gc": gc_status(self._gc_frozen),
            "tenants": None
            if self.tenants is None
            else {
                "mode": self.tenants.mode,
                "names": self.tenants.names,
                "buffer": None
                if self.buffer.tenant_shares is None
                else self.buffer.tenant_shares.snapshot(),
            },
            "commands": None if self.commands is None else self.commands.status(),
            "firmware": None if self.firmware is None else self.firmware.status(),
            "lifecycle": None if self.lifecycle is None else self.lifecycle.status(),
        }

    def readiness(self) -> dict[str, Any]:
        """``GET /readyz``: ready = broker listening and buffer writable; Kafka apart."""
        return readiness(self)

    async def metrics(self) -> bytes:
        """``GET /metrics``: the Prometheus text exposition."""
        return await self.prometheus.render()

    def _kafka_state(self) -> dict[str, Any]:
        """The heartbeat's ``kafka`` object."""
        return {
            "connected": self.forwarder.status.kafka_connected,
            "breaker": self.forwarder.breaker.state.value,
        }
