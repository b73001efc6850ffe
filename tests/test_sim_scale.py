"""The simulator at scale: profiles (pure), a multi-process profile run through the real
gateway into real Kafka with the merged ledger verified, and (long) 10,000 devices at once."""

from __future__ import annotations

import argparse
import json
import random
import resource
from pathlib import Path
from typing import Any

import cbor2
import pytest

from bench.fleet_scale import cheap_password_entries, count_established
from device_sim.behaviour import plan_for
from device_sim.ledger import read_ack_ledger
from device_sim.options import FleetOptions, SimOptionsError, source_address
from device_sim.profile import Profile, apply_profile, is_hit, load_profile
from device_sim.sensors import Sensor
from gateway.dev.kafka import KafkaState
from tests.harness import (
    REPO,
    eventually,
    kafka_tls,
    run_cli,
    running_gateway,
    write_gateway_config,
)

CI_PROFILE = REPO / "configs/sim/ci.toml"
PASSWORD = "ci-fleet-password"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profile.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ pure


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[[device_types]]\nname = "a"\ncount = 1\nrate = -1\n', "device_types.0.rate"),
        ('[[device_types]]\nname = "a"\ncount = 0\n', "device_types.0.count"),
        ('[[device_types]]\nname = "a"\ncount = 1\nsensr = "gps"\n', "device_types.0.sensr"),
        (
            '[[device_types]]\nname = "a"\ncount = 1\n'
            "misbehave = { garbage = 0.7, oversized = 0.5 }\n",
            "device_types.0.misbehave",
        ),
        ('[[device_types]]\nname = "a"\ncount = 1\n[[bursts]]\nat_s = 1\ntypes = ["b"]\n', "b"),
        ("[fleet]\nduration_s = 5\ncount = 3\n[[device_types]]\nname='a'\ncount=1\n", "fleet"),
        ("device_types = []\n", "device_types"),
        ("[[device_types]\n", "not TOML"),
    ],
)
def test_profile_errors_name_the_field_path(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(SimOptionsError) as info:
        load_profile(_write(tmp_path, text))
    assert where in str(info.value)
    assert str(info.value).startswith("--profile:")


def test_every_example_profile_is_valid() -> None:
    for path in sorted((REPO / "configs/sim").glob("*.toml")):
        assert load_profile(path).devices > 0, path


def test_plans_follow_types_events_and_bursts() -> None:
    profile = load_profile(CI_PROFILE)
    options = apply_profile(FleetOptions(), profile, explicit=set()).validated()
    rng = random.Random(1)
    plans = [plan_for(options, i, rng) for i in range(profile.devices)]
    assert plans[0].device_id == "thermo-00000"
    assert plans[299].device_id == "broken-00299"
    assert {p.type_name for p in plans} == {"thermo", "vibration", "tracker", "broken"}
    # Staggered: trackers start after 1 s, each type ramps at connect_rate.
    tracker = [p for p in plans if p.type_name == "tracker"]
    assert tracker[0].connect_at_s == 1.0
    assert tracker[-1].connect_at_s == pytest.approx(1.0 + 59 / 300)
    # Offline: only trackers, about 20 % of them; storm: only thermo/vibration, ~30 %.
    offline = [p for p in plans if any(e.kind == "offline" for e in p.events)]
    assert offline
    assert {p.type_name for p in offline} == {"tracker"}
    assert 4 <= len(offline) <= 20
    storm = [p for p in plans if any(e.kind == "storm" for e in p.events)]
    assert {p.type_name for p in storm} == {"thermo", "vibration"}
    assert 40 <= len(storm) <= 100
    # Burst x5 for thermo between 3 and 6 s only.
    assert plans[0].interval(4.0) == pytest.approx(0.2)
    assert plans[0].interval(7.0) == pytest.approx(1.0)
    assert plans[160].interval(4.0) == pytest.approx(1.0)
    # The same device is hit in every process (no hash randomisation).
    assert is_hit(profile.offline[0], "tracker", 250, 1000) == is_hit(
        profile.offline[0], "tracker", 250, 1000
    )


def test_misbehaviour_shares() -> None:
    profile = load_profile(CI_PROFILE)
    options = FleetOptions(profile=profile, devices=300, count=None, duration_s=10)
    plan = plan_for(options, 295, random.Random(2))
    rng = random.Random(3)
    picks = [plan.pick_misbehaviour(rng) for _ in range(10_000)]
    assert 1700 < picks.count("garbage") < 2300
    assert 300 < picks.count("oversized") < 700
    assert 800 < picks.count("wrong_topic") < 1200
    assert plan_for(options, 0, rng).pick_misbehaviour(rng) is None


def test_sensor_readings_decode_and_drift() -> None:
    rng = random.Random(4)
    temps = [
        json.loads(Sensor("temperature", "json", rng, size=0, filler=b"").reading(i))
        for i in range(3)
    ]
    assert all(10 < t["celsius"] < 35 for t in temps)
    gps = Sensor("gps", "cbor", rng, size=0, filler=b"")
    a, b = cbor2.loads(gps.reading(1)), cbor2.loads(gps.reading(2))
    assert abs(a["lat"] - b["lat"]) < 0.01
    assert a["sensor"] == "gps"
    vib = cbor2.loads(Sensor("vibration", "cbor", rng, size=64, filler=b"").reading(1))
    assert len(vib["samples"]) == 16


def test_command_line_options_override_the_profile() -> None:
    profile = Profile.model_validate(
        {
            "fleet": {"count": 7, "processes": 3, "connect_rate": 50},
            "device_types": [{"name": "a", "count": 5}, {"name": "b", "count": 4}],
        }
    )
    base = FleetOptions(count=10, processes=1, connect_rate=500)
    merged = apply_profile(base, profile, explicit=set()).validated()
    assert (merged.devices, merged.count, merged.processes, merged.connect_rate) == (9, 7, 3, 50)
    mine = apply_profile(
        FleetOptions(count=None, duration_s=5, processes=2, connect_rate=500),
        profile,
        explicit={"duration", "processes"},
    ).validated()
    assert (mine.count, mine.duration_s, mine.processes, mine.connect_rate) == (None, 5, 2, 50)


def test_bench_password_entries_verify() -> None:
    from edge.passwords import verify_password

    text = cheap_password_entries(["a-00000", "b-00001"], "pw-12345678", 1 << 4)
    lines = dict(line.split(":", 1) for line in text.splitlines())
    assert verify_password("pw-12345678", lines["b-00001"])
    assert not verify_password("wrong-password", lines["a-00000"])


# ------------------------------------------------------------------ end to end


@pytest.mark.kafka
@pytest.mark.timeout(150)
def test_profile_fleet_over_two_processes_verified_end_to_end(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    """300 devices, 2 worker processes, spread source addresses, every profile feature;
    passwords required; the merged ledger verifies against Kafka (exit 0)."""
    topics = {name: kafka_topic_factory(name) for name in ("telemetry", "event", "dlq")}
    profile = load_profile(CI_PROFILE)
    ids = [f"{profile.type_of(i)[0].id_prefix}{i:05d}" for i in range(profile.devices)]
    passwords = tmp_path / "devices.passwd"
    passwords.write_text(cheap_password_entries(ids, PASSWORD, 1 << 8))
    passwords.chmod(0o600)
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=kafka_tls(kafka),
        topics=topics,
        extra=f"""
[broker]
allow_anonymous = false
password_file = "{passwords}"

[broker.acl]
enabled = true
""",
    )
    ledger, summary = tmp_path / "acks.jsonl", tmp_path / "sim.json"
    with running_gateway(config) as gateway:
        port = gateway.mqtt_port
        sim = run_cli(
            "sim",
            *("--profile", str(CI_PROFILE), "--port", str(port), "--password", PASSWORD),
            *("--ledger", str(ledger), "--json", str(summary), "--seed", "7"),
            timeout=120,
        )
        result = json.loads(summary.read_text())
        c = result["counters"]
        assert sim.returncode == 0, (sim.stdout[-3000:], sim.stderr[-3000:])
        assert result["processes"] == 2
        assert c["ever_connected"] == 300
        assert c["gave_up"] == 0
        assert c["offline_windows"] > 0
        assert c["storm_drops"] > 0
        assert c["sent_garbage"] > 0
        assert c["sent_oversized"] > 0
        assert c["sent_wrong_topic"] > 0
        assert c["acked"] == c["sent"] > 300
        status = gateway.status()
        assert status["security"]["publishes_denied"] > 0  # the wrong-topic messages
        assert "connected=" in sim.stderr  # progress lines (stderr is not a terminal here)
        verify = run_cli(
            "verify", "-c", str(config), "--ledger", str(ledger), "--wait", "30", timeout=120
        )
    assert verify.returncode == 0, verify.stdout[-3000:]
    entries = list(read_ack_ledger(ledger))
    assert len(entries) == c["acked"]
    assert len({e.device_id for e in entries}) >= 290  # merged from both workers
    headers = [line for line in ledger.read_text().splitlines() if '"ledger"' in line]
    assert len(headers) == 2  # one per worker part
    assert "missing=0" in verify.stdout


# ------------------------------------------------------------------ long


@pytest.mark.long
@pytest.mark.kafka
@pytest.mark.timeout(1000)
def test_ten_thousand_devices_connected_at_once(tmp_path: Path, kafka: KafkaState) -> None:
    """bench.fleet_scale with its default profile: 10,000 devices connected at once."""
    from bench import fleet_scale

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 12_000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 12,000")
    args = argparse.Namespace(
        profile=REPO / "configs/sim/scale-10k.toml",
        duration=240.0,  # the last wave connects by ~140 s on a busy 2-core machine
        scrypt_n=1 << 10,
        time_box=600.0,
        kafka_state=None,
        no_verify=False,
        out=None,
    )
    root = tmp_path / "run"
    root.mkdir()
    result = fleet_scale.run(args, root, kafka)
    (tmp_path / "result.json").write_text(json.dumps(result, indent=2))
    assert not result["timed_out"]
    assert result["max_connections_seen"] >= 10_000
    assert result["sim"]["counters"]["gave_up"] == 0
    assert result["verify"]["exit_code"] == 0, result["verify"]


def test_source_addresses_spread_and_established_count() -> None:
    addresses = {source_address(i) for i in range(10_000)}
    assert len(addresses) == 10_000
    assert all(a.startswith("127.") and not a.endswith((".0", ".255")) for a in addresses)
    assert count_established(1) == 0  # nothing listens on port 1


# ------------------------------------------------------------------ gateway side


def test_slim_session_states_match_amqtt_machine() -> None:
    """edge.session_state replaces amqtt's per-session transitions.Machine: same table,
    same enter callbacks (reflexive included), same MachineError."""
    from amqtt.session import Session
    from transitions import MachineError

    from edge.session_state import SessionStates, slim_session

    sequences = [
        ["connect", "disconnect", "connect", "disconnect", "disconnect"],
        ["disconnect", "connect", "connect"],
        ["connect", "connect"],
        ["disconnect", "disconnect", "connect"],
    ]
    for steps in sequences:
        outcomes = []
        for slim in (False, True):
            session = Session()
            if slim:
                slim_session(session)
                assert isinstance(session.transitions, SessionStates)
            seen: list[tuple[str, str, Any]] = []
            for step in steps:
                try:
                    getattr(session.transitions, step)()
                    seen.append(
                        (step, session.transitions.state, session.last_disconnect_time is None)
                    )
                except MachineError:
                    seen.append((step, "error", None))
            outcomes.append((seen, session.transitions.is_connected()))
        assert outcomes[0] == outcomes[1], steps


def test_gateway_raises_its_open_file_limit() -> None:
    from gateway.limits import raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        now = raise_fd_limit()
        assert now == (65_536 if hard == resource.RLIM_INFINITY else min(65_536, hard))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_lazy_queue_behaves_like_asyncio_queue() -> None:
    import asyncio

    from edge.session_state import LazyQueue

    queue: LazyQueue[int] = LazyQueue(2)
    assert "_getters" not in queue.__dict__  # nothing built yet
    assert queue.empty()
    waiter = asyncio.ensure_future(queue.get())
    await eventually(lambda: queue.__dict__.get("_getters"), "the getter to wait", 5)
    await queue.put(1)
    assert await waiter == 1
    queue.put_nowait(2)
    queue.put_nowait(3)
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(4)
    for _ in range(2):
        queue.get_nowait()
    for _ in range(3):
        queue.task_done()
    async with asyncio.timeout(1):
        await queue.join()
    async with asyncio.timeout(1):
        await LazyQueue[int]().join()  # never used: join returns at once


def test_live_progress_lines_and_table() -> None:
    import io

    from rich.console import Console

    from device_sim.live import LiveProgress
    from device_sim.stats import FleetCounters

    out = io.StringIO()
    with LiveProgress(Console(file=out, width=200), line_every_s=0) as live:
        live(FleetCounters(devices=10, connected=3, sent=5, acked=4))
        live(FleetCounters(devices=10, connected=10, sent=50, acked=40, sent_garbage=2))
        lines = out.getvalue().splitlines()
        assert lines[-1].startswith("connected=10/10 sent=50 acked=40")
        assert "bad=2" in lines[-1]
        assert "workers=1" in lines[-1]
        live.workers({0: FleetCounters(devices=5, connected=5), 1: FleetCounters(devices=5)})
        live(FleetCounters(devices=10, connected=5))
        assert out.getvalue().splitlines()[-1].endswith("workers=2")
        table = Console(file=io.StringIO(), width=200)
        table.print(live._table())
        text = table.file.getvalue()  # type: ignore[attr-defined]
        assert "5/5" in text
        assert "total" in text
