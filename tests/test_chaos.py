"""The chaos harness: its pure parts (schedule, proxy, proxied Kafka listener) and seeded runs
against real Kafka, the real gateway process and a paho fleet.

``test_chaos_ci`` is the CI run of issue 5: ≥ 5 gateway SIGKILLs with a non-empty buffer,
≥ 2 Kafka outages (a broker stop/start that keeps data, proxy cuts between bridge and Kafka),
a reconnect storm, 50 devices publishing QoS1 → nothing acknowledged missing, nothing
reordered. The three-broker leader-kill scenario is in the long suite (``-m long``).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from device_sim.chaos import ChaosOptions, run_chaos
from device_sim.chaos_report import ChaosResult
from device_sim.chaos_schedule import (
    FAULT_KINDS,
    FaultSpec,
    ScheduleError,
    build_schedule,
    parse_fault_counts,
)
from device_sim.tcp_proxy import TcpProxy
from gateway.dev.kafka_props import BrokerTls, NodeLayout, server_properties
from gateway.dev.kafka_state import BrokerState, KafkaState, state_from_json, state_to_json

# ---------------------------------------------------------------------- schedule


def test_schedule_is_seeded_and_complete() -> None:
    spec = FaultSpec(
        duration_s=300, counts={"gateway_kill": 6, "proxy_cut": 2, "broker_restart": 1}
    )
    first = build_schedule(spec, seed=7)
    assert first == build_schedule(spec, seed=7)
    assert first != build_schedule(spec, seed=8)
    kinds = [f.kind for f in first]
    assert kinds.count("gateway_kill") == 6
    assert kinds.count("proxy_cut") == 2
    assert kinds.count("broker_restart") == 1
    times = [f.at_s for f in first]
    assert times == sorted(times)
    assert times[0] >= spec.warmup_s
    assert times[-1] <= spec.duration_s - spec.tail_s
    assert [f.index for f in first] == list(range(9))
    assert all(f.hold_s == 0 for f in first if f.kind == "gateway_kill")
    assert all(f.hold_s > 0 for f in first if f.kind == "proxy_cut")


def test_schedule_rejects_what_does_not_fit() -> None:
    with pytest.raises(ScheduleError, match="do not fit"):
        build_schedule(FaultSpec(duration_s=60, counts={"broker_restart": 5}), seed=1)
    with pytest.raises(ScheduleError, match="no room"):
        build_schedule(
            FaultSpec(duration_s=30, counts={"gateway_kill": 1}, warmup_s=20, tail_s=20), seed=1
        )
    with pytest.raises(ScheduleError, match="unknown"):
        build_schedule(FaultSpec(duration_s=300, counts={"meteor": 1}), seed=1)
    assert build_schedule(FaultSpec(duration_s=300, counts={}), seed=1) == ()


def test_parse_fault_counts() -> None:
    counts = parse_fault_counts("gateway-kill=3, proxy_cut=1")
    assert counts["gateway_kill"] == 3
    assert counts["proxy_cut"] == 1
    assert set(counts) == set(FAULT_KINDS)
    for bad in ("gateway_kill", "gateway_kill=x", "nope=1", "storm=-1"):
        with pytest.raises(ScheduleError):
            parse_fault_counts(bad)


# ---------------------------------------------------------------------- proxy


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(2.0):
            return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def _send_and_read(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    async with asyncio.timeout(2.0):
        writer.write(data)
        await writer.drain()
        return await reader.readexactly(len(data))


async def test_proxy_relays_cuts_and_restores() -> None:
    server = await _echo_server()
    upstream = server.sockets[0].getsockname()[1]
    async with TcpProxy(upstream) as proxy:
        assert await _roundtrip(proxy.port, b"hello") == b"hello"
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x")
        await writer.drain()
        assert await reader.readexactly(1) == b"x"
        assert proxy.cut() == 1
        # The established connection is reset, a new one is refused (closed at once).
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _send_and_read(reader, writer, b"y")
        writer.close()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(proxy.port, b"refused")
        assert proxy.stats.refused >= 1
        proxy.restore()
        assert await _roundtrip(proxy.port, b"back") == b"back"
    server.close()
    await server.wait_closed()


async def test_proxy_pause_holds_bytes_and_drop_all_keeps_accepting() -> None:
    server = await _echo_server()
    async with TcpProxy(server.sockets[0].getsockname()[1]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        proxy.pause()
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.readexactly(4)
        proxy.resume()
        async with asyncio.timeout(2):
            assert await reader.readexactly(4) == b"held"
        assert proxy.drop_all() == 1
        writer.close()
        assert await _roundtrip(proxy.port, b"again") == b"again"
        proxy.set_upstream(None)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(proxy.port, b"nowhere")
    server.close()
    await server.wait_closed()


# ---------------------------------------------------------------------- kafka plumbing


def test_proxied_listener_properties_and_state() -> None:
    tls = BrokerTls(ca_pem="CA", cert_pem="CERT", key_pem="KEY")
    node = NodeLayout(
        node_id=1,
        ssl_port=10010,
        internal_port=10011,
        controller_port=10012,
        node_dir=Path("/d/node-1"),
        proxied_port=10013,
        proxy_advertised_port=20000,
    )
    props = server_properties(node, [node], tls=tls, partitions=3)
    assert props["listeners"].endswith(",PROXIED://127.0.0.1:10013")
    assert props["advertised.listeners"].endswith(",PROXIED://127.0.0.1:20000")
    assert "PROXIED:SSL" in props["listener.security.protocol.map"]
    broker = BrokerState(1, 42, 10010, 10011, 10012, Path("/l"), Path("/p"), 10013, 20000)
    state = KafkaState(
        "4.4.0", "id", "127.0.0.1:10010", Path("/d"), "now", Path("/k"), Path("/ca"),
        Path("/c"), Path("/k"), (broker,),
    )  # fmt: skip
    assert state_from_json(state_to_json(state)) == state
    assert state.proxy_bootstrap == "127.0.0.1:20000"
    plain = KafkaState(
        "4.4.0", "id", "127.0.0.1:10010", Path("/d"), "now", Path("/k"), Path("/ca"),
        Path("/c"), Path("/k"), (BrokerState(1, 42, 10010, 10011, 10012, Path("/l"), Path("/p")),),
    )  # fmt: skip
    assert "proxy" not in state_to_json(plain)
    assert plain.proxy_bootstrap is None


# ---------------------------------------------------------------------- seeded runs

# Run the gateway from another source tree (e.g. `git archive HEAD` while the working tree
# is mid-edit); the harness itself always runs from this checkout.
_GATEWAY_SRC = os.environ.get("TIDEGATE_CHAOS_GATEWAY_SRC")
_SRC = Path(_GATEWAY_SRC).resolve() if _GATEWAY_SRC else None


def _assert_clean(result: ChaosResult, *, kills: int, outages: int) -> None:
    summary = json.dumps(
        {k: v for k, v in result.to_json().items() if k not in ("options", "fleets")}, indent=1
    )
    assert result.acknowledged > 0, summary
    assert result.missing == 0, summary
    assert result.out_of_order == 0, summary
    if result.delivery == "exactly_once":
        assert result.duplicates == 0, summary
    assert result.kills >= kills, summary
    assert result.kills_nonempty == result.kills, summary
    assert result.kafka_outages >= outages, summary
    assert not result.problems, summary
    assert result.exit_code == 0, summary


@pytest.mark.kafka
@pytest.mark.timeout(600)
async def test_chaos_ci(tmp_path: Path) -> None:
    """~3 minutes of load: 6 kills, a broker restart, 2 proxy cuts, a storm; 50 devices."""
    options = ChaosOptions(
        work_dir=tmp_path / "chaos",
        seed=20261127,
        duration_s=180.0,
        faults={"gateway_kill": 6, "broker_restart": 1, "proxy_cut": 2, "storm": 1},
        devices=50,
        rate=10.0,
        storm_devices=100,
        gateway_src=_SRC,
    )
    result = await run_chaos(options)
    _assert_clean(result, kills=5, outages=2)
    assert result.acknowledged > 50 * 10 * 100  # the fleet kept publishing through it all


@pytest.mark.long
@pytest.mark.kafka
@pytest.mark.timeout(1800)
async def test_chaos_three_brokers_leader_kill(tmp_path: Path) -> None:
    """Three brokers (RF 3, min ISR 2): SIGKILL the leader of the written partitions."""
    options = ChaosOptions(
        work_dir=tmp_path / "chaos3",
        seed=3,
        duration_s=420.0,
        faults={
            "gateway_kill": 10,
            "leader_kill": 4,
            "broker_restart": 1,
            "proxy_cut": 2,
            "storm": 1,
        },
        brokers=3,
        devices=50,
        rate=10.0,
        gateway_src=_SRC,
    )
    result = await run_chaos(options)
    _assert_clean(result, kills=10, outages=6)
    leader_kills = [f for f in result.faults if f.kind == "leader_kill" and f.status == "done"]
    assert len(leader_kills) == 4


@pytest.mark.long
@pytest.mark.kafka
@pytest.mark.timeout(3000)
async def test_chaos_long(tmp_path: Path) -> None:
    """The 30-minute run: 55 kills and every other fault kind (three brokers)."""
    options = ChaosOptions(
        work_dir=tmp_path / "chaos-long",
        seed=30,
        duration_s=1800.0,
        faults={
            "gateway_kill": 55,
            "leader_kill": 6,
            "broker_restart": 4,
            "proxy_cut": 8,
            "disk_full": 2,
            "storm": 4,
        },
        brokers=3,
        devices=50,
        rate=10.0,
        max_file_mb=64,
        gateway_src=_SRC,
    )
    result = await run_chaos(options)
    _assert_clean(result, kills=50, outages=15)
