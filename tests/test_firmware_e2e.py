"""Firmware end to end: releases through real Kafka into a real gateway process, campaigns,
simulated devices (paho over real sockets) pulling chunks over MQTT."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_sim.firmware import FirmwareDevice, FleetSpec, run_firmware_fleet
from edge.firmware_model import make_manifest, release_records
from gateway.dev.kafka import KafkaState
from tests.firmware_helpers import (
    campaign_state,
    fw_setup,
    provision,
    registered,
    release_state,
    status_until,
)
from tests.fixtures_kafka import make_ssl_context
from tests.harness import GatewayProcess, eventually, publish_qos1, run_cli, wait_for
from tests.test_commands_e2e import produce

pytestmark = pytest.mark.kafka

DEVICE_TYPE = "sensor-x"
CHUNK = 32768


async def _produce_release(
    kafka: KafkaState,
    topic: str,
    image: bytes,
    version: str,
    key: Ed25519PrivateKey,
    *,
    tamper_chunk: int | None = None,
) -> str:
    """Publish like ``tidegate fw publish`` does, optionally flipping a byte in one chunk."""
    manifest = make_manifest(
        image,
        version=version,
        device_type=DEVICE_TYPE,
        chunk_bytes=65536,
        key=key,
        created_ms=int(time.time() * 1000),
    )
    records = release_records(manifest, image)
    if tamper_chunk is not None:
        value, headers = records[1 + tamper_chunk]
        records[1 + tamper_chunk] = (bytes([value[0] ^ 0xFF]) + value[1:], headers)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap,
        security_protocol="SSL",
        ssl_context=make_ssl_context(kafka),
        acks="all",
    )
    await producer.start()
    try:
        for value, headers in records:
            await producer.send_and_wait(
                topic, value, key=manifest.release_id.encode(), headers=headers
            )
    finally:
        await producer.stop()
    return manifest.release_id


async def _control(kafka: KafkaState, topic: str, **value: Any) -> None:
    await produce(kafka, topic, [(str(value["campaign_id"]), json.dumps(value).encode())])


async def test_tampered_or_untrusted_release_is_refused_and_not_cached(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    setup = fw_setup(tmp_path, kafka, kafka_topic_factory)
    image = os.urandom(200_000)
    gateway = GatewayProcess(setup.config)
    try:
        gateway.start()
        good = await _produce_release(kafka, setup.releases, image, "1.0.0", setup.key)
        tampered = await _produce_release(
            kafka, setup.releases, image, "1.0.1", setup.key, tamper_chunk=1
        )
        stranger = await _produce_release(
            kafka, setup.releases, image, "1.0.2", Ed25519PrivateKey.generate()
        )
        # Bad input on the control topic: a malformed record and a campaign for the refused
        # release are rejected; the consumer goes on.
        await produce(kafka, setup.control, [("x", b"not json")])
        # Bad device messages are acknowledged, counted and ignored.
        publish_qos1(
            gateway.mqtt_port,
            "bad-dev",
            [
                ("d/bad-dev/fw/req", b"\xff garbage"),
                ("d/bad-dev/fw/status", b'{"state": "exploded"}'),
                ("d/bad-dev/fw/req", b'{"release_id": "nope@1", "index": 0}'),
            ],
        )
        await _control(kafka, setup.control, op="start", campaign_id="c-bad", release_id=tampered)
        records = await status_until(
            kafka,
            setup.status,
            lambda r: (
                all(release_state(r, x) for x in (good, tampered, stranger))
                and campaign_state(r, "c-bad") is not None
            ),
            "release verdicts",
        )
        stats = gateway.status()["firmware"]
    finally:
        gateway.stop()
    assert release_state(records, good) == "cached"
    assert release_state(records, tampered) == "refused"
    assert release_state(records, stranger) == "refused"
    reasons = {r["release_id"]: r["reason"] for r in records if r["kind"] == "release"}
    assert "sha256 mismatch" in reasons[tampered]
    assert "untrusted signing key" in reasons[stranger]
    assert campaign_state(records, "c-bad")["state"] == "rejected"  # type: ignore[index]
    assert any(r["kind"] == "campaign" and "malformed" in (r["reason"] or "") for r in records)
    cached = list((gateway.data_dir / "firmware").glob("*.img"))
    good_sha = next(r["sha256"] for r in records if r.get("release_id") == good)
    assert [p.name for p in cached] == [f"{good_sha}.img"]  # only the good one
    assert list((gateway.data_dir / "firmware" / "staging").iterdir()) == []
    assert "refused" in gateway.log()
    assert stats["invalid_messages"] == 2
    assert stats["requests_refused"] == 1  # not offered to that device: not served


async def test_campaign_pauses_itself_above_failure_threshold_and_survives_restart(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    setup = fw_setup(tmp_path, kafka, kafka_topic_factory)
    image = os.urandom(100_000)
    ids = [f"pz-{i:02d}" for i in range(10)]
    gateway = GatewayProcess(setup.config)
    fleets: list[asyncio.Task[dict[str, FirmwareDevice]]] = []
    stop = asyncio.Event()

    def start_fleet() -> None:
        # Every device fails its installation: ring 0 (2 of 10 devices) fails entirely.
        stop.clear()
        fleets.append(
            asyncio.create_task(
                run_firmware_fleet(
                    [FleetSpec(d, fail_install=True) for d in ids],
                    host="127.0.0.1",
                    port=gateway.mqtt_port,
                    device_type=DEVICE_TYPE,
                    version="1.0.0",
                    trusted=[setup.public],
                    password=provision(gateway, ids),
                    until=lambda _d: stop.is_set(),
                    within_s=90,
                )
            )
        )

    async def stop_fleet() -> None:
        stop.set()
        await asyncio.gather(*fleets, return_exceptions=True)

    try:
        gateway.start()
        release = await _produce_release(kafka, setup.releases, image, "2.0.0", setup.key)
        await status_until(
            kafka, setup.status, lambda r: release_state(r, release) == "cached", "release cached"
        )
        start_fleet()
        await eventually(lambda: registered(gateway, DEVICE_TYPE) >= set(ids), "registry", 20)
        await _control(
            kafka,
            setup.control,
            op="start",
            campaign_id="c-pause",
            release_id=release,
            rings=[20, 100],
            failure_threshold=0.1,
        )
        records = await status_until(
            kafka,
            setup.status,
            lambda r: (campaign_state(r, "c-pause") or {}).get("state") == "paused",
            "the campaign to pause itself",
        )
        paused = campaign_state(records, "c-pause")
        assert paused is not None
        assert paused["ring"] == 0
        # It pauses at the first failure past 10% of ring 0 (2 devices): the other device of
        # the ring may still be downloading; ring 1 (8 devices) has not started.
        assert paused["devices"]["waiting"] == 8
        assert paused["devices"]["failed"] >= 1
        assert "threshold" in paused["reason"]
        offered = {
            r["device_id"]
            for r in records
            if r["kind"] == "device" and r["campaign_id"] == "c-pause" and r["state"] == "offered"
        }
        assert len(offered) == 2  # ring 1 never started

        # A paused campaign lets started transfers finish: ring 0 ends with 2 failures.
        await status_until(
            kafka,
            setup.status,
            lambda r: sum(1 for x in r if x["kind"] == "device" and x["state"] == "failed") == 2,
            "ring 0 to finish",
        )

        # A restart keeps the campaign paused and the cache (no second fetch).
        await stop_fleet()
        gateway.kill9()
        gateway.start()
        start_fleet()  # on the restarted gateway's port
        # The firmware service charges its cache when its task has opened the store, which
        # may be just after /status answers: wait for that, then check nothing was refetched.
        status = gateway.wait_status(
            lambda s: s["firmware"] is not None and s["firmware"]["cache_bytes"] > 0,
            10,
            "the firmware cache to be opened",
        )
        assert status["firmware"]["releases_cached"] == 0
        assert status["firmware"]["cache_bytes"] == len(image)
        out = run_cli("fw", "status", "c-pause", "-c", str(setup.config))
        assert out.returncode == 0, out.stderr
        assert "paused" in out.stdout
        assert "waiting 8" in out.stdout

        # Resume: the operator accepts ring 0's failures; ring 1 starts (and fails again).
        assert (
            run_cli("fw", "campaign", "resume", "c-pause", "-c", str(setup.config)).returncode == 0
        )
        records = await status_until(
            kafka,
            setup.status,
            lambda r: (
                (campaign_state(r, "c-pause") or {}).get("ring") == 1
                and campaign_state(r, "c-pause")["state"] == "paused"
            ),  # type: ignore[index]
            "ring 1 to start and fail",
            within_s=40,
        )
        assert (
            run_cli("fw", "campaign", "abort", "c-pause", "-c", str(setup.config)).returncode == 0
        )
        records = await status_until(
            kafka,
            setup.status,
            lambda r: (campaign_state(r, "c-pause") or {}).get("state") == "aborted",
            "abort",
        )
    finally:
        await stop_fleet()
        gateway.stop()


async def test_rollout_with_interrupted_transfers_resumes_and_rolls_back(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    """A smaller version of the 200-device run (tests/test_firmware_fleet.py), plus CLI
    publish and a rollback to the previous release."""
    setup = fw_setup(tmp_path, kafka, kafka_topic_factory)
    old, new = tmp_path / "v1.bin", tmp_path / "v2.bin"
    old.write_bytes(os.urandom(150_000))
    new.write_bytes(os.urandom(300_000))
    cfg = str(setup.config)
    ids = [f"rs-{i:04d}" for i in range(20)]
    gateway = GatewayProcess(setup.config)
    try:
        gateway.start()
        for path, version in ((old, "1.0.0"), (new, "2.0.0")):
            out = run_cli(
                "fw",
                "publish",
                str(path),
                "--version",
                version,
                "--device-type",
                DEVICE_TYPE,
                "--key",
                str(setup.key_file),
                "--chunk-bytes",
                "65536",
                "-c",
                cfg,
            )
            assert out.returncode == 0, out.stderr
        await status_until(
            kafka,
            setup.status,
            lambda r: (
                release_state(r, f"{DEVICE_TYPE}@2.0.0") == "cached"
                and release_state(r, f"{DEVICE_TYPE}@1.0.0") == "cached"
            ),
            "releases cached",
        )
        size = new.stat().st_size
        specs = [FleetSpec(d, drop_at_chunk=3 if i % 4 == 0 else None) for i, d in enumerate(ids)]

        async def start_campaign() -> None:
            await eventually(lambda: registered(gateway, DEVICE_TYPE) >= set(ids), "registry", 20)
            out = run_cli(
                "fw",
                "campaign",
                "start",
                "c-main",
                "--release",
                f"{DEVICE_TYPE}@2.0.0",
                "--rings",
                "10,50,100",
                "-c",
                cfg,
            )
            assert out.returncode == 0, out.stderr

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
            within_s=60,
        )
        await starter
        for spec in specs:
            agent = devices[spec.device_id].agent
            assert agent.verified == f"{DEVICE_TYPE}@2.0.0"
            if spec.drop_at_chunk is not None:
                assert agent.drops == 1
                assert size <= agent.downloaded_bytes <= size + CHUNK, spec.device_id
        records = await status_until(
            kafka,
            setup.status,
            lambda r: (campaign_state(r, "c-main") or {}).get("state") == "completed",
            "completion",
        )
        assert campaign_state(records, "c-main")["devices"] == {"installed": 20}  # type: ignore[index]

        # Rollback: every device of the campaign gets 1.0.0 back.
        out = run_cli("fw", "campaign", "rollback", "c-main", "-c", cfg)
        assert out.returncode == 0, out.stderr
        # The simulator's CLI plays the devices this time (the same ids, now on 2.0.0).
        out = run_cli(
            "fw",
            "sim",
            "--trusted-key",
            f"{setup.key_file}.pub",
            "--devices",
            "20",
            "--prefix",
            "rs",
            "--device-type",
            DEVICE_TYPE,
            "--version",
            "2.0.0",
            "--until-version",
            "1.0.0",
            "--duration",
            "60",
            "--password",
            provision(gateway, ids),
            "-c",
            cfg,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.count(" 1.0.0 downloaded=150000 ") == 20  # no drops this time
        records = await status_until(
            kafka,
            setup.status,
            lambda r: (campaign_state(r, "c-main.rollback") or {}).get("state") == "completed",
            "rollback completion",
        )
        assert campaign_state(records, "c-main")["state"] == "rolled_back"  # type: ignore[index]
        wait_for(lambda: gateway.status()["firmware"]["chunks_sent"] > 0, 5, "stats")
    finally:
        gateway.stop()
