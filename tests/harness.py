"""Test harness: a real gateway process, real paho devices, and a Kafka read-back.

Everything waits on conditions with deadlines; nothing sleeps a fixed time.

Device credentials (anonymous devices are refused by default, docs/security.md):

* :func:`write_gateway_config` writes ``devices.passwd`` next to the config and sets
  ``broker.password_file`` (unless ``extra`` sets its own). Every test device has the password
  :data:`DEVICE_PASSWORD` (user name = client id). Its scrypt hash is computed once per
  session and reused for every id (the hash depends only on salt and password).
* Ids need not be known in advance: :func:`provision_devices` adds ids to a password file
  (atomically; a running gateway re-reads the file when it changes), and
  :func:`device_credentials` does it for the gateway listening on a port (registered by
  :meth:`GatewayProcess.start`) and returns the user name and password to send.
* :class:`Publisher` and :func:`publish_qos1` do that themselves (``password=None`` connects
  without credentials). :func:`run_cli` and :func:`sim_args` do it for ``tidegate sim`` runs:
  the fleet's ids are provisioned and ``--password`` is added.
* A test about anonymous devices sets ``allow_anonymous`` itself (``anonymous=True``, or
  ``[broker]`` in ``extra``); an in-process ``EdgeBroker`` keeps its own keyword default.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.helpers import create_ssl_context

from device_sim.options import device_id as sim_device_id
from edge.passwords import hash_password, read_entries, write_entries
from gateway.config import load_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

DEVICE_PASSWORD: Final = "tidegate-test-device"
"""Password of every device the harness provisions (user name = client id)."""

_password_files: dict[int, Path] = {}
"""MQTT port -> password file of the gateway listening there (set by GatewayProcess.start)."""
_provision_lock = threading.Lock()


@functools.cache
def device_password_hash() -> str:
    """The scrypt hash of :data:`DEVICE_PASSWORD`: computed once, shared by every id."""
    return hash_password(DEVICE_PASSWORD)


def provision_devices(password_file: Path, device_ids: Iterable[str]) -> None:
    """Add ``device_ids`` (password :data:`DEVICE_PASSWORD`) to a password file."""
    with _provision_lock:
        entries = read_entries(password_file)
        missing = [d for d in device_ids if d not in entries]
        if missing or not password_file.exists():
            entries.update(dict.fromkeys(missing, device_password_hash()))
            write_entries(password_file, entries)  # atomic: the gateway never reads half


def device_credentials(port: int, client_id: str) -> tuple[str, str]:
    """Provision ``client_id`` at the gateway on ``port`` (when the harness started it) and
    return the user name and password it connects with."""
    path = _password_files.get(port)
    if path is not None:
        provision_devices(path, [client_id])
    return client_id, DEVICE_PASSWORD


def sim_args(port: int, devices: int, prefix: str = "dev-", start_index: int = 0) -> list[str]:
    """``tidegate sim`` arguments for a fleet at ``port``: ids provisioned, password given."""
    path = _password_files.get(port)
    if path is not None:
        ids = (sim_device_id(prefix, i) for i in range(start_index, start_index + devices))
        provision_devices(path, ids)
    return [
        *("--port", str(port), "--devices", str(devices), "--prefix", prefix),
        *("--start-index", str(start_index), "--password", DEVICE_PASSWORD),
    ]


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(min(interval, left))  # poll period inside the deadline, never past it


async def eventually(
    probe: Callable[[], Any], what: str, deadline_s: float, interval: float = 0.05
) -> Any:
    """Async :func:`wait_for`: poll ``probe`` (plain or async) until it returns something
    truthy and return that; fail after ``deadline_s`` seconds."""
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                value = probe()
                if asyncio.iscoroutine(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(interval)  # poll period inside the deadline
    except TimeoutError:
        raise AssertionError(f"timed out after {deadline_s}s waiting for {what}") from None


@dataclass(frozen=True)
class KafkaTls:
    """Client TLS material for a Kafka instance."""

    cafile: Path
    certfile: Path
    keyfile: Path


def write_gateway_config(
    directory: Path,
    *,
    bootstrap: str,
    tls: KafkaTls,
    topics: Mapping[str, str],
    gateway_id: str = "gw-test",
    shutdown_deadline_s: float = 10.0,
    send_deadline_s: float = 8.0,
    request_timeout_s: float = 5.0,
    extra: str = "",
    devices: Iterable[str] = (),
    anonymous: bool | None = None,
    kafka_extra: str = "",
) -> Path:
    """A gateway config on port 0 (MQTT and admin) for one test, with a password file for
    ``devices`` (more can be added later, see the module docstring). ``anonymous`` sets
    ``broker.allow_anonymous`` (None: the default, refused)."""
    password_file = directory / "devices.passwd"
    provision_devices(password_file, devices)
    broker = [] if "password_file" in extra else [f'password_file = "{password_file}"']
    if anonymous is not None:
        broker.append(f"allow_anonymous = {str(anonymous).lower()}")
    if "\n[broker]\n" in f"\n{extra}":  # one [broker] table only: add to the test's
        extra = f"\n{extra}".replace(
            "\n[broker]\n", "\n[broker]\n" + "".join(f"{b}\n" for b in broker), 1
        )
    elif broker:
        extra = "\n[broker]\n" + "".join(f"{b}\n" for b in broker) + extra
    classes = "\n".join(
        f'[classes.{name}]\nkafka_topic = "{topic}"\npriority = {5 + i}\n'
        for i, (name, topic) in enumerate(topics.items())
    )
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[gateway]
id = "{gateway_id}"
data_dir = "{directory / "data"}"
shutdown_deadline_s = {shutdown_deadline_s}

[[broker.listeners]]
name = "tcp"
host = "127.0.0.1"
port = 0

{classes}

[routing]
dead_letter_topic = "{topics.get("dlq", next(iter(topics.values())))}"

[kafka]
bootstrap_servers = ["{bootstrap}"]
send_deadline_s = {send_deadline_s}
request_timeout_s = {request_timeout_s}
retry_backoff_max_s = 1.0
{kafka_extra}
[kafka.tls]
cafile = "{tls.cafile}"
certfile = "{tls.certfile}"
keyfile = "{tls.keyfile}"

[admin]
port = 0
{extra}
"""
    )
    return path


class GatewayProcess:
    """``tidegate run`` as a child process, as an operator would run it."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.data_dir = config.parent / "data"
        self.log_path = config.parent / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime: dict[str, Any] = {}

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        log.close()
        proc = self.proc

        def ready() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited with {proc.returncode}:\n{self.log()}")
            try:
                runtime: dict[str, Any] = json.loads((self.data_dir / "runtime.json").read_text())
            except (OSError, ValueError):
                return None
            return runtime if runtime.get("pid") == proc.pid else None

        self.runtime = wait_for(ready, timeout, "the gateway to listen")
        try:
            password_file = load_config(self.config, check_files=False).broker.password_file
        except ConfigError:
            password_file = None
        if password_file is not None:
            for listener in self.runtime["mqtt"]:
                _password_files[int(listener["port"])] = password_file
        return self

    @property
    def mqtt_port(self) -> int:
        return int(self.runtime["mqtt"][0]["port"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        admin = self.runtime["admin"]
        url = f"http://{admin['host']}:{admin['port']}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
        return data

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status()
            return status if predicate(status) else None

        result: dict[str, Any] = wait_for(check, timeout, what, interval=0.1)
        return result

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float) -> float:
        """SIGTERM; return the seconds until the process exited."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return time.monotonic() - started

    def stop(self) -> None:
        """Cleanup: make sure the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class Publisher:
    """Devices publishing QoS1 with paho; records what was PUBACKed, per device, in order."""

    port: int
    devices: list[str]
    topic_class: str = "event"
    payload_padding: int = 0
    """Extra bytes per payload (to fill a buffer faster)."""
    password: str | None = DEVICE_PASSWORD
    """Devices authenticate with this (provisioned at the harness's gateway on ``port``);
    None: no credentials."""
    acked: dict[str, list[int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    errors: int = 0

    def start(self, per_device: int, inflight: int = 20) -> Publisher:
        if self.password is not None:
            path = _password_files.get(self.port)
            if path is not None:
                provision_devices(path, self.devices)
        for device in self.devices:
            self.acked[device] = []
            thread = threading.Thread(
                target=self._run, args=(device, per_device, inflight), daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def total_acked(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.acked.values())

    def _run(self, device: str, per_device: int, inflight: int) -> None:
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=device,
            clean_session=True,
        )
        client.max_inflight_messages_set(inflight)
        if self.password is not None:
            client.username_pw_set(device, self.password)
        pending: dict[int, int] = {}
        early: set[int] = set()  # PUBACKs that beat the publisher to recording the mid
        pending_lock = threading.Condition()  # notified on every PUBACK

        def record(seq: int) -> None:
            with self._lock:
                self.acked[device].append(seq)

        def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
            with pending_lock:
                seq = pending.pop(mid, None)
                if seq is None:
                    early.add(mid)
                pending_lock.notify_all()
            if seq is not None:
                record(seq)

        client.on_publish = on_publish
        try:
            client.connect("127.0.0.1", self.port, keepalive=30)
        except OSError:
            self.errors += 1
            return
        client.loop_start()
        try:
            for seq in range(1, per_device + 1):
                if self._stop.is_set():
                    break
                body = {"device": device, "seq": seq}
                if self.payload_padding:
                    body["pad"] = "x" * self.payload_padding
                payload = json.dumps(body).encode()
                info = client.publish(f"d/{device}/up/{self.topic_class}", payload, qos=1)
                with pending_lock:
                    acked_already = info.mid in early
                    early.discard(info.mid)
                    if not acked_already:
                        pending[info.mid] = seq
                if acked_already:
                    record(seq)
                # Keep paho's own queue short so a dead gateway does not pile up messages.
                with pending_lock:
                    room = lambda: len(pending) < inflight or self._stop.is_set()  # noqa: E731
                    while not pending_lock.wait_for(room, timeout=1.0):
                        pass  # blocked gateway: keep waiting (stop() is seen within 1 s)
            # A well-behaved device waits for its last PUBACKs before it disconnects.
            with pending_lock:
                pending_lock.wait_for(lambda: not pending or self._stop.is_set(), timeout=30)
        finally:
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()  # waiting publishers re-check within a second (wait_for timeout)
        for thread in self._threads:
            thread.join(timeout)

    def wait_done(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in self._threads if t.is_alive()]
        if alive:
            raise AssertionError(f"{len(alive)} publishers still running after {timeout}s")


@dataclass(frozen=True)
class ReadRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    timestamp: int = 0
    """Kafka record timestamp (ms; the producer's send time)."""


async def read_topics(
    bootstrap: str,
    tls: KafkaTls,
    topics: list[str],
    deadline_s: float = 30.0,
    isolation: str = "read_uncommitted",
) -> list[ReadRecord]:
    """Every record in ``topics`` up to the end offsets taken now, in partition order.

    ``isolation="read_committed"`` reads as an exactly-once consumer does (up to the last
    stable offset, aborted transactions skipped)."""
    context = create_ssl_context(
        cafile=str(tls.cafile), certfile=str(tls.certfile), keyfile=str(tls.keyfile)
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        security_protocol="SSL",
        ssl_context=context,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation,
    )
    records: list[ReadRecord] = []
    async with asyncio.timeout(deadline_s):
        await consumer.start()
        try:
            partitions = [
                TopicPartition(t, p) for t in topics for p in sorted(await _partitions(consumer, t))
            ]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            remaining = {tp for tp in partitions if ends[tp] > 0}
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=500)
                for tp, messages in batch.items():
                    for m in messages:
                        if m.offset < ends[tp]:
                            records.append(
                                ReadRecord(
                                    m.topic,
                                    m.partition,
                                    m.offset,
                                    m.key,
                                    m.value,
                                    {k: bytes(v) for k, v in m.headers},
                                    m.timestamp,
                                )
                            )
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        finally:
            await consumer.stop()
    return records


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    while True:
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        await consumer._client.force_metadata_update()  # metadata for a new topic


def per_device_sequences(records: list[ReadRecord]) -> dict[str, list[int]]:
    """Device → the ``seq`` values in Kafka order (payloads written by :class:`Publisher`)."""
    out: dict[str, list[int]] = {}
    for record in records:
        body = json.loads(record.value)
        out.setdefault(body["device"], []).append(int(body["seq"]))
    return out


@contextlib.contextmanager
def running_gateway(config: Path) -> Iterator[GatewayProcess]:
    """A started gateway that is killed at the end of the block, whatever happens."""
    gateway = GatewayProcess(config)
    try:
        yield gateway.start()
    finally:
        gateway.stop()


def assert_all_acked_arrived(acked: Mapping[str, list[int]], records: list[ReadRecord]) -> None:
    """Every PUBACKed seq is in Kafka, and each device's stream is in order (dups allowed)."""
    arrived = per_device_sequences(records)
    for device, seqs in acked.items():
        got = arrived.get(device, [])
        missing = set(seqs) - set(got)
        assert not missing, (
            f"{device}: {len(missing)} acked messages missing, e.g. {sorted(missing)[:5]}"
        )
        # Order: the first occurrences must be increasing (a resend may repeat a tail).
        first_seen: list[int] = []
        seen: set[int] = set()
        for seq in got:
            if seq not in seen:
                seen.add(seq)
                first_seen.append(seq)
        assert first_seen == sorted(first_seen), f"{device}: out of order in Kafka"


@contextlib.contextmanager
def frozen_kafka(brokers: Iterable[Any]) -> Iterator[None]:
    """SIGSTOP every broker: connections hang and nothing is acked (Kafka "down" without
    losing its data); SIGCONT on exit, whatever happens."""
    pids = [broker.pid for broker in brokers]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def kafka_tls(kafka: Any) -> KafkaTls:
    """The client TLS files of a local Kafka's state (gateway.dev.kafka.KafkaState)."""
    return KafkaTls(kafka.ca_file, kafka.cert_file, kafka.key_file)


def publish_qos1(
    port: int,
    client_id: str,
    messages: list[tuple[str, bytes]],
    *,
    in_order: bool = True,
    password: str | None = DEVICE_PASSWORD,
) -> None:
    """Publish QoS1 with paho over a real socket and wait for every PUBACK. The device
    authenticates (see the module docstring) unless ``password`` is None."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if password is not None:
        if password == DEVICE_PASSWORD:
            device_credentials(port, client_id)
        client.username_pw_set(client_id, password)
    if in_order:
        client.max_inflight_messages_set(1)  # strictly one after the other
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=20)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def _with_sim_credentials(args: tuple[str, ...]) -> tuple[str, ...]:
    """``sim --port P ...`` against a harness gateway: provision the fleet, add --password."""
    if not args or args[0] != "sim" or "--password" in args or "--port" not in args:
        return args
    port = int(args[args.index("--port") + 1])
    if port not in _password_files:
        return args

    def option(name: str, default: str) -> str:
        return args[args.index(name) + 1] if name in args else default

    fleet = sim_args(
        port,
        int(option("--devices", "10")),
        option("--prefix", "dev-"),
        int(option("--start-index", "0")),
    )
    return (*args, "--password", fleet[-1])


def run_cli(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """``tidegate ARGS`` as a user runs it; output captured, never raises on exit codes.
    A ``sim`` run against a harness gateway gets device credentials (module docstring)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *_with_sim_credentials(args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
