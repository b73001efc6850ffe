"""Commands at fleet scale: 1,000 commands to 100 devices, 30 of them offline for a window,
with a gateway SIGKILL in the middle of delivery."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.dev.kafka import KafkaState
from tests.harness import GatewayProcess
from tests.test_commands_e2e import (
    CmdDevice,
    _config,
    command,
    results_until,
    send,
    statuses,
    wait_registered,
)

# About 1-3 minutes (100 paho clients, 1,000 commands, a kill and restart): a long run.
pytestmark = [pytest.mark.kafka, pytest.mark.long]

DEVICES = 100
OFFLINE = 30
PER_DEVICE = 10
SHORT_TTL_S = 4.0


@pytest.fixture
def devices() -> Iterator[list[CmdDevice]]:
    made: list[CmdDevice] = []
    yield made
    for device in made:
        device.disconnect()


def _done(results: dict[str, list[dict[str, Any]]], command_id: str) -> bool:
    return bool({"executed", "expired"} & set(statuses(results, command_id)))


async def test_thousand_commands_offline_window_and_sigkill(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any, devices: list[CmdDevice]
) -> None:
    config, commands, results = _config(tmp_path, kafka, kafka_topic_factory)
    ids = [f"fleet-{i:03d}" for i in range(DEVICES)]
    offline = set(ids[:OFFLINE])
    gateway = GatewayProcess(config)
    try:
        gateway.start()
        fleet = {d: CmdDevice(gateway.mqtt_port, d).connect() for d in ids}
        devices.extend(fleet.values())
        for d in ids:
            wait_registered(gateway, d, True)
        for d in offline:
            fleet[d].disconnect()
        for d in offline:
            wait_registered(gateway, d, False)
        # A first command shows the consumer has joined its group (short TTLs must not run
        # out before intake).
        probe = command(ids[-1], command_id="probe")
        await send(kafka, commands, probe)
        await results_until(kafka, results, lambda r: "executed" in statuses(r, "probe"))
        # Offline devices: every other command has a TTL shorter than the offline window.
        batch = [
            command(
                d,
                params={"n": n},
                ttl_s=SHORT_TTL_S if d in offline and n % 2 else 600,
                priority=n % 3,
            )
            for n in range(PER_DEVICE)
            for d in ids
        ]
        short = {c["command_id"] for c in batch if c["ttl_s"] == SHORT_TTL_S}
        started = time.time()
        await send(kafka, commands, *batch)
        # The offline window lasts until every short command has expired.
        await results_until(
            kafka, results, lambda r: all("expired" in statuses(r, c) for c in short), within_s=90
        )
        window_end = time.time()
        print(f"window ended after {window_end - started:.1f}s")  # shown on failure
        # The window ends: the offline devices come back; the gateway is killed while it
        # delivers their backlog, restarted, and the devices reconnect to it.
        for d in offline:
            fleet[d].connect()
        gateway.wait_status(lambda s: s["commands"]["delivered"] >= 750, 60, "delivery")
        print(f"killed after {time.time() - started:.1f}s")
        gateway.kill9()
        for device in fleet.values():
            device.disconnect()
        gateway.start()
        for device in fleet.values():
            device.port = gateway.mqtt_port
            device.connect()
        found = await results_until(
            kafka, results, lambda r: all(_done(r, c["command_id"]) for c in batch), within_s=120
        )
    finally:
        gateway.stop()
    expired = {c for c, items in found.items() if any(r["status"] == "expired" for r in items)}
    assert expired == short  # exactly the commands whose TTL was shorter than the window
    for c in batch:
        history = statuses(found, c["command_id"])
        if c["command_id"] in short:
            assert history == ["accepted", "expired"]
            continue
        assert history.count("executed") == 1, (c["command_id"], history)
        assert history[0] == "accepted"
    for d, device in fleet.items():
        wanted = {c["command_id"] for c in batch if c["device_id"] == d} - short
        if d == ids[-1]:
            wanted.add("probe")
        assert set(device.executions) == wanted, d
        assert set(device.executions.values()) == {1}
    received_late = [t for d in offline for t, _c in fleet[d].received]
    assert min(received_late) >= window_end - 1  # nothing reached an offline device early
