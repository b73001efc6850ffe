"""The simulator's device side of commands: apply, report, PUBACK after, repeats not applied."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from device_sim.commands import CommandApplier
from gateway.dev.kafka import KafkaState
from tests.harness import REPO, running_gateway, sim_args
from tests.test_commands_e2e import (
    _config,
    command,
    has,
    results_until,
    send,
    statuses,
    wait_registered,
)


def test_applier_executes_once_and_reports_repeats() -> None:
    applier = CommandApplier(failure_rate=0.0, rng=random.Random(1))
    first = applier.receive(b'{"command_id": "c1", "name": "x"}')
    again = applier.receive(b'{"command_id": "c1", "name": "x"}')
    assert first is not None
    assert again is not None
    assert (first.status, first.repeat) == ("executed", False)
    assert (again.status, again.repeat) == ("executed", True)
    assert applier.executions == {"c1": 1}
    assert json.loads(again.report())["command_id"] == "c1"
    assert applier.receive(b"garbage") is None
    failing = CommandApplier(failure_rate=1.0, rng=random.Random(1))
    outcome = failing.receive(b'{"command_id": "c2"}')
    assert outcome is not None
    assert outcome.status == "failed"


@pytest.mark.kafka
async def test_simulated_fleet_executes_commands(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    config, commands, results = _config(tmp_path, kafka, kafka_topic_factory)
    summary = tmp_path / "sim.json"
    with running_gateway(config) as gateway:
        # The gateway's consumer group must have joined before the devices' linger starts
        # counting (a join takes seconds on a busy machine): a probe command for an unknown
        # device comes back rejected once the consumer is live.
        probe = command("nobody-here")
        await send(kafka, commands, probe)
        await results_until(
            kafka, results, lambda r: has(r, probe["command_id"], "rejected"), within_s=90
        )
        sim = await asyncio.create_subprocess_exec(
            *[
                sys.executable,
                "-m",
                "gateway.cli",
                "sim",
                *sim_args(gateway.mqtt_port, 3, prefix="sim-"),
                "--count",
                "1",
                "--classes",
                "event",
                "--commands",
                "--command-delay",
                "0.05",
                "--linger",
                "20",
                "--quiet",
                "--json",
                str(summary),
            ],
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            devices = [f"sim-{i:05d}" for i in range(3)]
            for device in devices:
                wait_registered(gateway, device, True)
            sent = [command(d, params={"i": i}) for i, d in enumerate(devices) for _ in range(2)]
            await send(kafka, commands, *sent)
            found = await results_until(
                kafka, results, lambda r: all(has(r, c["command_id"], "executed") for c in sent)
            )
            async with asyncio.timeout(90):  # linger 20 s, then the sim leaves
                _, err = await sim.communicate()
        finally:
            if sim.returncode is None:
                sim.kill()
                await sim.wait()
    assert sim.returncode == 0, err
    for c in sent:
        assert statuses(found, c["command_id"]) == ["accepted", "delivered", "executed"]
    counters = json.loads(summary.read_text())["counters"]
    assert counters["commands_executed"] == len(sent)
    assert counters["commands_failed"] == 0
