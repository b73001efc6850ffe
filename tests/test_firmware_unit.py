"""Pure firmware logic: rings, gates, eviction, manifests and signatures, message parsing,
and the simulated device's resume and verification."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_sim.firmware import FirmwareAgent
from edge.firmware_model import (
    FirmwareFormatError,
    chunk_payload,
    make_manifest,
    parse_manifest_record,
    release_records,
    verify_manifest,
)
from edge.firmware_rollout import (
    CacheEntry,
    RingCounts,
    decide,
    plan_eviction,
    plan_rings,
    protected_releases,
)
from edge.firmware_store import Release
from edge.firmware_wire import offer_payload, parse_control, parse_request, parse_status
from gateway.config import parse_config
from gateway.errors import ConfigError
from tests.harness import run_cli

KEY = Ed25519PrivateKey.generate()


# ------------------------------------------------------------------------- rings and gates


def test_rings_reach_cumulative_percents_and_are_stable() -> None:
    devices = [f"d{i}" for i in range(200)]
    rings = plan_rings("c1", devices, [1, 10, 50, 100])
    sizes = [sum(1 for r in rings.values() if r == i) for i in range(4)]
    assert sizes == [2, 18, 80, 100]
    assert plan_rings("c1", reversed(devices), [1, 10, 50, 100]) == rings  # order-independent
    assert plan_rings("c2", devices, [1, 10, 50, 100]) != rings  # another campaign, other picks


def test_rings_with_few_devices_leave_early_rings_empty_not_lost() -> None:
    rings = plan_rings("c", ["a", "b", "c"], [1, 10, 50, 100])
    assert sorted(rings) == ["a", "b", "c"]
    assert max(rings.values()) == 3
    assert plan_rings("c", [], [100]) == {}


def _decide(counts: RingCounts, **kw: object) -> str:
    args: dict[str, object] = {
        "state": "running",
        "ring": 0,
        "ring_count": 3,
        "failure_threshold": 0.1,
        "accepted_failures": 0,
    }
    args.update(kw)
    return decide(counts=counts, **args).action  # type: ignore[arg-type]


def test_gate_waits_advances_completes_and_pauses() -> None:
    assert _decide(RingCounts(size=10, installed=5)) == "wait"
    assert _decide(RingCounts(size=10, installed=10)) == "advance"
    assert _decide(RingCounts(size=10, installed=9, failed=1)) == "advance"  # 10% is allowed
    assert _decide(RingCounts(size=10, installed=2, failed=2)) == "pause"  # mid-ring, at once
    assert _decide(RingCounts(size=10, installed=10), ring=2) == "complete"
    assert _decide(RingCounts(size=0), ring=1) == "advance"  # an empty ring passes
    assert _decide(RingCounts(size=10, failed=5), state="paused") == "wait"
    # After a resume the failures the operator accepted do not count again.
    assert _decide(RingCounts(size=10, installed=8, failed=2), accepted_failures=2) == "advance"
    assert _decide(RingCounts(size=10, installed=6, failed=4), accepted_failures=2) == "pause"


def test_pause_reason_names_ring_and_threshold() -> None:
    decision = decide(
        state="running",
        ring=1,
        ring_count=4,
        counts=RingCounts(size=4, failed=2),
        failure_threshold=0.25,
        accepted_failures=0,
    )
    assert decision.action == "pause"
    assert decision.reason == "ring 1: 2 of 4 failed (threshold 25%)"


# -------------------------------------------------------------------------------- eviction


def _entry(rid: str, dtype: str, size: int, received: int, used: int) -> CacheEntry:
    return CacheEntry(rid, dtype, size, received, used)


def test_eviction_keeps_campaign_releases_and_two_newest_per_type() -> None:
    entries = [
        _entry("a@1", "a", 100, 1, 50),
        _entry("a@2", "a", 100, 2, 10),
        _entry("a@3", "a", 100, 3, 30),
        _entry("a@4", "a", 100, 4, 40),
        _entry("b@1", "b", 100, 5, 20),
    ]
    protected = protected_releases(entries, ["a@1"])
    assert protected == {"a@1", "a@3", "a@4", "b@1"}
    assert plan_eviction(entries, protected, cap=1000, incoming=100) == []
    assert plan_eviction(entries, protected, cap=500, incoming=100) == ["a@2"]
    assert plan_eviction(entries, protected, cap=450, incoming=100) is None  # all protected


def test_eviction_is_least_recently_used_first() -> None:
    entries = [_entry(f"x@{i}", f"t{i}", 100, i, used) for i, used in enumerate([30, 10, 20])]
    assert plan_eviction(entries, set(), cap=200, incoming=100) == ["x@1", "x@2"]


# ------------------------------------------------------------------ manifests, signatures


def test_manifest_roundtrip_and_signature() -> None:
    image = os.urandom(70_000)
    manifest = make_manifest(
        image, version="1.2.3", device_type="pump", chunk_bytes=32768, key=KEY, created_ms=1
    )
    assert manifest.chunk_count == 3
    assert manifest.sha256 == hashlib.sha256(image).hexdigest()
    records = release_records(manifest, image)
    assert len(records) == 4
    assert b"".join(v for v, _h in records[1:]) == image
    parsed = parse_manifest_record(records[0][0])
    verify_manifest(parsed, [KEY.public_key()])
    with pytest.raises(FirmwareFormatError, match="untrusted"):
        verify_manifest(parsed, [Ed25519PrivateKey.generate().public_key()])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m.replace('"size":70000', '"size":70001'), "bad signature"),
        (lambda m: m.replace('"version":"1.2.3"', '"version":"9.9.9"'), "release_id"),
        (lambda m: "[]", "not an object"),
    ],
)
def test_a_changed_manifest_does_not_verify(change: object, reason: str) -> None:
    manifest = make_manifest(
        b"x" * 70_000,
        version="1.2.3",
        device_type="pump",
        chunk_bytes=32768,
        key=KEY,
        created_ms=1,
    )
    record = manifest.record()
    record["manifest"] = change(record["manifest"])  # type: ignore[operator]
    with pytest.raises(FirmwareFormatError, match=reason):
        verify_manifest(parse_manifest_record(json.dumps(record).encode()), [KEY.public_key()])


@pytest.mark.parametrize("value", [b"", b"{", b"[]", b'{"manifest": 1, "signature": "x"}'])
def test_malformed_manifest_records_are_refused(value: bytes) -> None:
    with pytest.raises(FirmwareFormatError, match="malformed"):
        parse_manifest_record(value)


# ------------------------------------------------------------------------------- messages


def test_device_messages_parse_or_are_refused() -> None:
    assert parse_request(b'{"release_id": "a@1", "index": 3}') == ("a@1", 3)
    for bad in (b"x", b'{"release_id": "a@1", "index": -1}', b'{"index": true}'):
        assert parse_request(bad) is None
    status = parse_status(b'{"release_id": "a@1", "state": "installed", "version": "1"}')
    assert status is not None
    assert status["version"] == "1"
    assert parse_status(b'{"release_id": "a@1", "state": "exploded"}') is None


def test_control_records() -> None:
    op = parse_control(
        b'{"op": "start", "campaign_id": "c1", "release_id": "a@1",'
        b' "rings": [5, 100], "failure_threshold": 0.2}'
    )
    assert not isinstance(op, str)
    assert op.rings == (5.0, 100.0)
    assert parse_control(b'{"op": "pause", "campaign_id": "c1"}') != "x"
    assert "op must be" in str(parse_control(b'{"op": "explode", "campaign_id": "c"}'))
    assert "rings" in str(
        parse_control(b'{"op": "start", "campaign_id": "c", "release_id": "a", "rings": [50]}')
    )
    assert "malformed" in str(parse_control(b"\xff"))


# ------------------------------------------------------------------------ simulated device


def _offer(image: bytes, version: str = "2.0") -> tuple[bytes, str]:
    manifest = make_manifest(
        image, version=version, device_type="t", chunk_bytes=65536, key=KEY, created_ms=1
    )
    release = Release(
        manifest.release_id,
        "t",
        version,
        len(image),
        manifest.sha256,
        manifest.signed,
        manifest.signature,
    )
    return offer_payload("c", release, 1000), manifest.release_id


def _pull(agent: FirmwareAgent, image: bytes, release_id: str, offer: bytes) -> list[str]:
    """Answer the agent's requests until it stops asking; return the final statuses."""
    out = agent.on_offer(offer)
    states = []
    while True:
        requests = [b for leaf, b in out.publish if leaf == "req"]
        states += [b["state"] for leaf, b in out.publish if leaf == "status"]
        if out.drop or not requests:
            return states
        index = requests[0]["index"]
        out = agent.on_chunk(chunk_payload(release_id, index, image[index * 1000 :][:1000]))


def test_agent_resumes_after_power_loss_and_installs_verified_image() -> None:
    image = os.urandom(10_500)
    offer, release_id = _offer(image)
    agent = FirmwareAgent(version="1.0", trusted=[KEY.public_key()], drop_at_chunk=4)
    assert set(_pull(agent, image, release_id, offer)) == {"downloading"}  # no outcome yet
    agent.connection_lost()
    states = _pull(agent, image, release_id, offer)  # the gateway offers again on reconnect
    assert states[-1] == "installed"
    assert agent.version == "2.0"
    assert agent.verified == release_id
    assert agent.downloaded_bytes == len(image) + 1000  # the chunk lost with the power


def test_agent_refuses_a_tampered_chunk_and_an_untrusted_offer() -> None:
    image = os.urandom(3000)
    offer, release_id = _offer(image)
    agent = FirmwareAgent(version="1.0", trusted=[KEY.public_key()])
    tampered = bytearray(image)
    tampered[1500] ^= 1
    assert _pull(agent, bytes(tampered), release_id, offer)[-1] == "failed"
    assert agent.version == "1.0"
    assert agent.refused == [release_id]
    stranger = FirmwareAgent(version="1.0", trusted=[Ed25519PrivateKey.generate().public_key()])
    out = stranger.on_offer(offer)
    assert [(leaf, b["state"]) for leaf, b in out.publish] == [("status", "failed")]
    assert out.publish[0][1]["reason"].startswith("untrusted signing key")


# ------------------------------------------------------------------------- config and CLI


def _kafka() -> dict[str, Any]:
    tls = {"cafile": "ca.pem", "certfile": "c.pem", "keyfile": "k.pem"}
    return {"bootstrap_servers": ["127.0.0.1:9093"], "tls": tls}


def test_firmware_config_errors_name_the_field() -> None:
    config = parse_config(
        {"kafka": _kafka(), "firmware": {"trusted_keys": ["k.pub"]}}, check_files=False
    )
    assert config.firmware is not None
    assert config.firmware.default_rings == [1.0, 10.0, 50.0, 100.0]
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"kafka": _kafka(), "firmware": {"trusted_keys": ["k.pub"], "default_rings": [50]}},
            check_files=False,
        )
    assert caught.value.errors[0][0] == "firmware.default_rings"
    with pytest.raises(ConfigError) as caught:
        parse_config({"kafka": _kafka(), "firmware": {}}, check_files=False)
    assert caught.value.errors[0][0] == "firmware.trusted_keys"


def test_fw_cli_bad_arguments_give_a_clear_error(tmp_path: Path) -> None:
    image = tmp_path / "fw.bin"
    image.write_bytes(b"x" * 100)
    config = tmp_path / "gw.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = ["127.0.0.1:1"]\n'
        f'[kafka.tls]\ncafile = "{image}"\ncertfile = "{image}"\nkeyfile = "{image}"\n'
        f'[firmware]\ntrusted_keys = ["{image}"]\n'
    )
    out = run_cli(
        "fw",
        "publish",
        str(image),
        "--version",
        "1 0",
        "--device-type",
        "t",
        "--key",
        str(tmp_path / "missing.pem"),
        "-c",
        str(config),
    )
    assert out.returncode == 2
    assert "missing.pem" in out.stderr
    key = tmp_path / "k.pem"
    assert run_cli("fw", "keygen", str(key)).returncode == 0
    out = run_cli(
        "fw",
        "publish",
        str(image),
        "--version",
        "1 0",
        "--device-type",
        "t",
        "--key",
        str(key),
        "-c",
        str(config),
    )
    assert out.returncode == 2
    assert "version '1 0'" in out.stderr
    assert run_cli("fw", "keygen", str(key)).returncode == 2  # never overwrites a key
