"""Acceptance: a 1 MB image rolled out to 200 simulated devices in rings (1%, 10%, 50%,
100%), 10% of the transfers interrupted by a power loss mid-transfer.

In the CI suite (about 30 s): the acceptance point itself, not a smaller stand-in."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from device_sim.firmware import FleetSpec, run_firmware_fleet
from gateway.dev.kafka import KafkaState
from tests.firmware_helpers import (
    campaign_state,
    fw_setup,
    provision,
    registered,
    release_state,
    status_until,
)
from tests.harness import GatewayProcess, eventually, run_cli

pytestmark = [pytest.mark.kafka]

DEVICES = 200
IMAGE_BYTES = 1 << 20
CHUNK = 32768
DEVICE_TYPE = "meter-z"


async def test_200_devices_1mb_image_10_percent_interrupted(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    setup = fw_setup(tmp_path, kafka, kafka_topic_factory)
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    cfg = str(setup.config)
    ids = [f"fz-{i:03d}" for i in range(DEVICES)]
    # Every tenth device loses power mid-transfer, after a different number of chunks.
    specs = [
        FleetSpec(d, drop_at_chunk=(5 + i) % 31 if i % 10 == 0 else None) for i, d in enumerate(ids)
    ]
    release = f"{DEVICE_TYPE}@2.0.0"
    gateway = GatewayProcess(setup.config)
    try:
        gateway.start()
        out = run_cli(
            "fw",
            "publish",
            str(image),
            "--version",
            "2.0.0",
            "--device-type",
            DEVICE_TYPE,
            "--key",
            str(setup.key_file),
            "-c",
            cfg,
        )
        assert out.returncode == 0, out.stderr
        await status_until(
            kafka, setup.status, lambda r: release_state(r, release) == "cached", "release cached"
        )

        async def start_campaign() -> float:
            await eventually(lambda: registered(gateway, DEVICE_TYPE) >= set(ids), "registry", 60)
            out = run_cli(
                "fw",
                "campaign",
                "start",
                "c-fleet",
                "--release",
                release,
                "--rings",
                "1,10,50,100",
                "--failure-threshold",
                "0.05",
                "-c",
                cfg,
            )
            assert out.returncode == 0, out.stderr
            return time.monotonic()

        starter = asyncio.create_task(start_campaign())
        devices = await run_firmware_fleet(
            specs,
            host="127.0.0.1",
            port=gateway.mqtt_port,
            device_type=DEVICE_TYPE,
            version="1.0.0",
            trusted=[setup.public],
            password=provision(gateway, ids),
            until=lambda ds: all(
                d.agent.version == "2.0.0" and d.final_acked.is_set() for d in ds.values()
            ),
            within_s=240,
        )
        rollout_s = time.monotonic() - await starter
        records = await status_until(
            kafka,
            setup.status,
            lambda r: (campaign_state(r, "c-fleet") or {}).get("state") == "completed",
            "campaign completed",
        )
        status = gateway.status()["firmware"]
    finally:
        gateway.stop()
    interrupted = [s for s in specs if s.drop_at_chunk is not None]
    assert len(interrupted) == DEVICES // 10
    for spec in specs:
        agent = devices[spec.device_id].agent
        assert agent.version == "2.0.0"
        assert agent.verified == release  # signature and hash checked before installing
        assert agent.downloaded_bytes >= IMAGE_BYTES
    for spec in interrupted:
        agent = devices[spec.device_id].agent
        assert agent.drops == 1
        # Resumed, not restarted: at most the image plus the one chunk lost with the power.
        assert agent.downloaded_bytes <= IMAGE_BYTES + CHUNK, spec.device_id
    final = campaign_state(records, "c-fleet")
    assert final is not None
    assert final["devices"] == {"installed": DEVICES}
    installed = {
        r["device_id"]
        for r in records
        if r["kind"] == "device" and r["state"] == "installed" and r["version"] == "2.0.0"
    }
    assert installed == set(ids)
    ring_starts = [r for r in records if r["kind"] == "campaign" and r["campaign_id"] == "c-fleet"]
    assert [r["ring"] for r in ring_starts if r["state"] == "running"] == [0, 1, 2, 3]
    total = sum(devices[d].agent.downloaded_bytes for d in ids)
    print(
        f"rollout {rollout_s:.1f}s; {total / 1e6:.1f} MB to devices;"
        f" chunks sent {status['chunks_sent']}, dropped requests {status['requests_dropped']}"
    )
