"""Commands end to end: Kafka → a real gateway process → paho devices → results in Kafka."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from aiokafka import AIOKafkaProducer

from gateway.dev.kafka import KafkaState, create_topics
from tests.fixtures_kafka import make_ssl_context, topic_name_for
from tests.harness import (
    REPO,
    GatewayProcess,
    KafkaTls,
    device_credentials,
    eventually,
    read_topics,
    running_gateway,
    wait_for,
    write_gateway_config,
)

pytestmark = pytest.mark.kafka


class CmdDevice:
    """A device that applies commands, PUBACKs after applying (manual ack), reports the
    result, and ignores command ids it already executed."""

    def __init__(self, port: int, device_id: str) -> None:
        self.port = port
        self.device_id = device_id
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.executions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        # Reports not yet PUBACKed by the gateway, kept across reconnects (a real device
        # keeps its outbound queue): re-published on every connect.
        self._unreported: dict[str, bytes] = {}
        self._report_mids: dict[int, str] = {}

    def connect(self) -> CmdDevice:
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            manual_ack=True,
        )
        subscribed = threading.Event()
        client.on_connect = lambda c, *_: c.subscribe(f"d/{self.device_id}/cmd", qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = self._on_message
        client.on_publish = self._on_report_acked
        client.username_pw_set(*device_credentials(self.port, self.device_id))
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        self._client = client
        assert subscribed.wait(10), "subscription not acknowledged"
        with self._lock:
            unreported = list(self._unreported.items())
        for command_id, report in unreported:
            self._report(client, command_id, report)
        return self

    def _report(self, client: mqtt.Client, command_id: str, report: bytes) -> None:
        with self._lock:
            self._unreported[command_id] = report
            info = client.publish(f"d/{self.device_id}/cmd/result", report, qos=1)
            self._report_mids[info.mid] = command_id

    def _on_report_acked(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._lock:
            command_id = self._report_mids.pop(mid, None)
            if command_id is not None:
                self._unreported.pop(command_id, None)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        command = json.loads(msg.payload)
        command_id = command["command_id"]
        with self._lock:
            self.received.append((time.time(), command))
            first = command_id not in self.executions
            self.executions[command_id] = self.executions.get(command_id, 0) + first
        if first:
            status = "failed" if command["name"] == "explode" else "executed"
            result = {"command_id": command_id, "status": status, "output": {"ok": True}}
            self._report(client, command_id, json.dumps(result).encode())
        client.ack(msg.mid, msg.qos)

    def ids(self) -> list[str]:
        with self._lock:
            return [c["command_id"] for _t, c in self.received]

    def disconnect(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


@pytest.fixture
def devices() -> Iterator[list[CmdDevice]]:
    made: list[CmdDevice] = []
    yield made
    for device in made:
        device.disconnect()


def _tls(kafka: KafkaState) -> KafkaTls:
    return KafkaTls(kafka.ca_file, kafka.cert_file, kafka.key_file)


def _config(tmp_path: Path, kafka: KafkaState, topic: Callable[..., str]) -> tuple[Path, str, str]:
    commands, results = topic("commands"), topic("results")
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": topic("events")},
        extra=f"""
[commands]
topic = "{commands}"
results_topic = "{results}"
poll_interval_s = 0.1
retry_interval_s = 1.0
""",
    )
    return config, commands, results


def command(device: str, name: str = "reboot", **fields: Any) -> dict[str, Any]:
    return {
        "command_id": fields.pop("command_id", f"c-{uuid.uuid4().hex[:10]}"),
        "device_id": device,
        "name": name,
        "params": fields.pop("params", {"x": 1}),
        "priority": fields.pop("priority", 5),
        "ttl_s": fields.pop("ttl_s", 60),
        **fields,
    }


async def produce(kafka: KafkaState, topic: str, items: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap,
        security_protocol="SSL",
        ssl_context=make_ssl_context(kafka),
        acks="all",
    )
    await producer.start()
    try:
        for key, value in items:
            await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


async def send(kafka: KafkaState, topic: str, *commands: dict[str, Any]) -> None:
    await produce(kafka, topic, [(c["device_id"], json.dumps(c).encode()) for c in commands])


async def results_until(
    kafka: KafkaState,
    topic: str,
    done: Callable[[dict[str, list[dict[str, Any]]]], bool],
    within_s: float = 30.0,
) -> dict[str, list[dict[str, Any]]]:
    """Results by command id (each result id once), polled until ``done`` holds."""
    last: dict[str, list[dict[str, Any]]] = {}

    async def probe() -> dict[str, list[dict[str, Any]]] | None:
        by_command: dict[str, list[dict[str, Any]]] = {}
        seen: set[str] = set()
        for record in await read_topics(kafka.bootstrap, _tls(kafka), [topic]):
            item = json.loads(record.value)
            if item["result_id"] not in seen:
                seen.add(item["result_id"])
                by_command.setdefault(item["command_id"], []).append(item)
        last.clear()
        last.update(by_command)
        return by_command if done(by_command) else None

    try:
        result: dict[str, list[dict[str, Any]]] = await eventually(
            probe, "command results", within_s + 1, interval=0.2
        )
    except AssertionError:
        tail = {c: [r["status"] for r in items] for c, items in list(last.items())[-5:]}
        raise AssertionError(
            f"timed out waiting for results of {len(last)} commands; last: {tail}"
        ) from None
    return result


def statuses(results: dict[str, list[dict[str, Any]]], command_id: str) -> list[str]:
    return [r["status"] for r in sorted(results.get(command_id, []), key=lambda r: r["at_ms"])]


def has(results: dict[str, list[dict[str, Any]]], command_id: str, status: str) -> bool:
    return status in statuses(results, command_id)


def wait_registered(gateway: GatewayProcess, device_id: str, connected: bool) -> None:
    admin = gateway.runtime["admin"]

    def check() -> bool:
        url = f"http://{admin['host']}:{admin['port']}/devices"
        with urllib.request.urlopen(url, timeout=5) as response:
            found = json.loads(response.read())
        devices = found["devices"] if isinstance(found, dict) else found
        return any(d["device_id"] == device_id and d["connected"] == connected for d in devices)

    wait_for(check, 15, f"{device_id} registered connected={connected}")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_online_device_executes_and_results_reach_kafka(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any, devices: list[CmdDevice]
) -> None:
    config, commands, results = _config(tmp_path, kafka, kafka_topic_factory)
    with running_gateway(config) as gateway:
        device = CmdDevice(gateway.mqtt_port, "dev-on").connect()
        devices.append(device)
        wait_registered(gateway, "dev-on", True)
        ok, bad = command("dev-on"), command("dev-on", "explode")
        await send(kafka, commands, ok, bad)
        found = await results_until(
            kafka,
            results,
            lambda r: has(r, ok["command_id"], "executed") and has(r, bad["command_id"], "failed"),
        )
        assert statuses(found, ok["command_id"]) == ["accepted", "delivered", "executed"]
        assert statuses(found, bad["command_id"]) == ["accepted", "delivered", "failed"]
        executed = found[ok["command_id"]][-1]
        assert executed["output"] == {"ok": True}
        assert executed["device_id"] == "dev-on"
        assert device.executions == {ok["command_id"]: 1, bad["command_id"]: 1}

        # The CLI: send through Kafka, read the history back from the results topic.
        sent = _cli("cmd", "send", "dev-on", "set", "--param", "level=3", "-c", str(config))
        assert sent.returncode == 0, sent.stderr
        cli_id = sent.stdout.strip()
        await results_until(kafka, results, lambda r: has(r, cli_id, "executed"))
        history = _cli("cmd", "status", cli_id, "-c", str(config), "--json")
        assert history.returncode == 0, history.stderr
        lines = [json.loads(line) for line in history.stdout.splitlines()]
        assert [x["status"] for x in lines] == ["accepted", "delivered", "executed"]
        assert device.received[-1][1]["params"] == {"level": 3}
        status = gateway.status()["commands"]
        assert status["delivered"] == 3
        assert status["consumer_error"] is None


async def test_offline_device_gets_commands_on_connect_in_priority_order_and_ttl_expires(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any, devices: list[CmdDevice]
) -> None:
    config, commands, results = _config(tmp_path, kafka, kafka_topic_factory)
    with running_gateway(config) as gateway:
        device = CmdDevice(gateway.mqtt_port, "dev-off").connect()
        device.disconnect()
        wait_registered(gateway, "dev-off", False)
        low1 = command("dev-off", priority=1)
        high = command("dev-off", priority=8)
        low2 = command("dev-off", priority=1)
        short = command("dev-off", priority=9, ttl_s=3.0)
        # The first command shows the consumer has joined its group (the short TTL below
        # must not run out before intake, which would be "expired on arrival").
        await send(kafka, commands, low1)
        await results_until(kafka, results, lambda r: has(r, low1["command_id"], "accepted"))
        await send(kafka, commands, high, short, low2)
        found = await results_until(
            kafka, results, lambda r: has(r, short["command_id"], "expired")
        )
        # Held while offline: accepted, nothing delivered.
        assert statuses(found, low1["command_id"]) == ["accepted"]
        assert statuses(found, short["command_id"]) == ["accepted", "expired"]
        assert device.received == []

        device.connect()
        devices.append(device)
        wanted = [high["command_id"], low1["command_id"], low2["command_id"]]
        found = await results_until(
            kafka, results, lambda r: all(has(r, c, "executed") for c in wanted)
        )
        assert device.ids() == wanted  # priority, then arrival; the expired one never sent
        for command_id in wanted:
            assert statuses(found, command_id) == ["accepted", "delivered", "executed"]


async def test_scheduled_command_waits_for_not_before(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any, devices: list[CmdDevice]
) -> None:
    config, commands, results = _config(tmp_path, kafka, kafka_topic_factory)
    with running_gateway(config) as gateway:
        device = CmdDevice(gateway.mqtt_port, "dev-at").connect()
        devices.append(device)
        wait_registered(gateway, "dev-at", True)
        # A first command shows the consumer has joined its group.
        first = command("dev-at")
        await send(kafka, commands, first)
        await results_until(kafka, results, lambda r: has(r, first["command_id"], "executed"))
        not_before = int(time.time() * 1000) + 3000
        later = command("dev-at", not_before=not_before, priority=9)
        now = command("dev-at", priority=1)
        await send(kafka, commands, later, now)
        await results_until(kafka, results, lambda r: has(r, later["command_id"], "executed"))
        times = {c["command_id"]: t for t, c in device.received}
        # The scheduled one outranks the other but waits for its time.
        assert device.ids() == [first["command_id"], now["command_id"], later["command_id"]]
        delay = times[later["command_id"]] - not_before / 1000
        assert 0 <= delay <= 2.0, delay


async def test_bad_commands_are_rejected_and_do_not_block_the_consumer(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any, devices: list[CmdDevice]
) -> None:
    config, commands, results = _config(tmp_path, kafka, kafka_topic_factory)
    with running_gateway(config) as gateway:
        device = CmdDevice(gateway.mqtt_port, "dev-r").connect()
        devices.append(device)
        wait_registered(gateway, "dev-r", True)
        unknown = command("dev-nobody")
        oversize = command("dev-r", params={"blob": "x" * 20_000})
        stale = command("dev-r", ttl_s=5, created_ms=int(time.time() * 1000) - 60_000)
        no_name = command("dev-r", name="")
        dup = command("dev-r")
        last = command("dev-r")
        first = command("dev-r")  # shows the consumer has joined (for the expiry check)
        await send(kafka, commands, first)
        await results_until(kafka, results, lambda r: has(r, first["command_id"], "executed"))
        await produce(kafka, commands, [("dev-r", b"\x00not json"), ("dev-r", b"[]")])
        await send(kafka, commands, unknown, oversize, stale, no_name, dup, dup, last)
        found = await results_until(
            kafka, results, lambda r: has(r, last["command_id"], "executed")
        )
        reasons = {
            c: [r.get("reason") for r in items if r["status"] == "rejected"]
            for c, items in found.items()
        }
        assert reasons[unknown["command_id"]] == ["unknown device"]
        assert reasons[oversize["command_id"]] == ["oversize: params larger than 16384 bytes"]
        assert reasons[stale["command_id"]] == ["expired on arrival"]
        assert reasons[no_name["command_id"]] == ["malformed: name missing or invalid"]
        assert sorted(reasons[""]) == ["malformed: not JSON", "malformed: not a JSON object"]
        # A duplicate id is accepted once and executed once.
        assert statuses(found, dup["command_id"]) == ["accepted", "delivered", "executed"]
        assert device.ids() == [first["command_id"], dup["command_id"], last["command_id"]]
        gateway.wait_status(lambda s: s["commands"]["consumed"] == 10, 10, "all consumed")


async def test_sigkill_between_intake_and_delivery_loses_no_command(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any, devices: list[CmdDevice]
) -> None:
    config, commands, results = _config(tmp_path, kafka, kafka_topic_factory)
    batch = [command("dev-k", params={"n": i}) for i in range(30)]
    ids = [c["command_id"] for c in batch]
    gateway = GatewayProcess(config)
    try:
        gateway.start()
        device = CmdDevice(gateway.mqtt_port, "dev-k").connect()
        device.disconnect()
        wait_registered(gateway, "dev-k", False)
        await send(kafka, commands, *batch)
        # Killed as soon as intake started: some commands stored, offsets maybe not
        # committed, results maybe not sent; nothing delivered (the device is offline).
        gateway.wait_status(lambda s: s["commands"]["consumed"] > 0, 20, "intake")
        gateway.kill9()
        gateway.start()
        device.port = gateway.mqtt_port  # port 0: a new one after the restart
        device.connect()
        devices.append(device)
        found = await results_until(
            kafka, results, lambda r: all(has(r, c, "executed") for c in ids), within_s=60
        )
    finally:
        gateway.stop()
    assert device.executions == dict.fromkeys(ids, 1)
    assert sorted(device.ids()) == sorted(ids)  # no command delivered twice either
    for command_id in ids:
        assert statuses(found, command_id).count("executed") == 1


async def test_two_gateways_on_one_kafka_deliver_only_their_own_commands(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any, devices: list[CmdDevice]
) -> None:
    base = topic_name_for("two-gateways", "commands")
    create_topics(kafka, [f"{base}.gw-a", f"{base}.gw-b"], partitions=3)
    results, events = kafka_topic_factory("results"), kafka_topic_factory("events")
    configs = {}
    for gw in ("gw-a", "gw-b"):
        (tmp_path / gw).mkdir()
        configs[gw] = write_gateway_config(
            tmp_path / gw,
            bootstrap=kafka.bootstrap,
            tls=_tls(kafka),
            topics={"event": events},
            gateway_id=gw,
            extra=f"""
[commands]
topic = "{base}.{{gateway_id}}"
results_topic = "{results}"
poll_interval_s = 0.1
""",
        )
    with running_gateway(configs["gw-a"]) as gw_a, running_gateway(configs["gw-b"]) as gw_b:
        dev_a = CmdDevice(gw_a.mqtt_port, "dev-a").connect()
        dev_b = CmdDevice(gw_b.mqtt_port, "dev-b").connect()
        devices.extend([dev_a, dev_b])
        wait_registered(gw_a, "dev-a", True)
        wait_registered(gw_b, "dev-b", True)
        for_a = [command("dev-a") for _ in range(5)]
        for_b = [command("dev-b") for _ in range(5)]
        stray = command("dev-b")  # sent to gw-a's topic by mistake
        await send(kafka, f"{base}.gw-a", *for_a, stray)
        await send(kafka, f"{base}.gw-b", *for_b)
        wanted = [c["command_id"] for c in for_a + for_b]
        found = await results_until(
            kafka,
            results,
            lambda r: (
                all(has(r, c, "executed") for c in wanted)
                and has(r, stray["command_id"], "rejected")
            ),
        )
    assert dev_a.ids() == [c["command_id"] for c in for_a]
    assert dev_b.ids() == [c["command_id"] for c in for_b]
    gateways = {r["command_id"]: r["gateway_id"] for items in found.values() for r in items}
    assert {gateways[c["command_id"]] for c in for_a} == {"gw-a"}
    assert {gateways[c["command_id"]] for c in for_b} == {"gw-b"}
    assert found[stray["command_id"]][0]["reason"] == "unknown device"
