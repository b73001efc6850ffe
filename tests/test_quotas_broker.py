"""Quotas enforced by the embedded broker: real amqtt, real sockets, a fake sink (the gateway
acceptance test with Kafka is tests/test_quotas_gateway.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge.audit import AuditLog
from edge.broker import EdgeBroker
from edge.broker_state import Security
from edge.mqtt_wire import PUBACK, SUBSCRIBE, RawPacket, encode_packet
from edge.quotas import QuotaLimits, Quotas, QuotaSettings
from tests.test_edge_broker import (
    FakeSink,
    Harness,
    RawClient,
    _string,
    eventually,
    harness,
    port_of,
    publish_packet,
)

__all__ = ["harness"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.timeout(60)


async def quota_broker(
    h: Harness, sink: FakeSink, settings: QuotaSettings, tmp_path: Path
) -> tuple[EdgeBroker, Quotas]:
    quotas = Quotas(settings, AuditLog(tmp_path / "audit.jsonl"))
    broker = await h.broker(sink, security=Security(quotas=quotas, audit=quotas.audit))
    return broker, quotas


def subscribe_packet(packet_id: int, topic_filter: str) -> bytes:
    body = packet_id.to_bytes(2, "big") + _string(topic_filter) + b"\x01"
    return encode_packet(RawPacket(SUBSCRIBE, 0x02, body))


async def test_throttle_caps_the_rate_and_acks_everything(harness: Harness, tmp_path: Path) -> None:
    sink = FakeSink()
    limits = QuotaLimits(messages_per_s=50.0, messages_burst=5.0)
    _broker, quotas = await quota_broker(harness, sink, QuotaSettings(default=limits), tmp_path)
    client = await harness.raw_client(_broker, "flood")
    count = 30
    started = time.monotonic()
    # The whole flood is written at once; the broker must pace reading it, not drop it.
    await client.send(
        b"".join(
            publish_packet("d/x/up/t", b"%d" % i, qos=1, packet_id=i + 1) for i in range(count)
        )
    )
    for i in range(count):
        await client.expect(PUBACK, i + 1)
    elapsed = time.monotonic() - started
    # 5 at once, then 25 more at 50/s: at least 0.5 s; all stored in order.
    assert elapsed >= 0.45, elapsed
    assert [p.payload for p in sink.received] == [b"%d" % i for i in range(count)]
    # Usually 25 waits; fewer on a loaded machine, where the broker's own slowness lets
    # tokens refill between packets (the pacing above is the real check).
    assert quotas.counters.throttled > 0
    assert quotas.counters.rate_disconnects == 0
    assert any(r["event"] == "quota_throttled" for r in AuditLog(tmp_path / "audit.jsonl").read())


async def test_disconnect_policy_closes_without_acking_the_excess(
    harness: Harness, tmp_path: Path
) -> None:
    sink = FakeSink()
    settings = QuotaSettings(
        policy="disconnect", default=QuotaLimits(messages_per_s=1.0, messages_burst=3.0)
    )
    broker, quotas = await quota_broker(harness, sink, settings, tmp_path)
    good = await harness.device(broker, "good")  # a paho client with the same limits
    client = await harness.raw_client(broker, "flood")
    await client.send(
        b"".join(publish_packet("d/x/up/t", b"x", qos=1, packet_id=i + 1) for i in range(10))
    )
    acked = []
    while (packet := await client.read()) is not None:
        assert packet.packet_type == PUBACK
        acked.append(int.from_bytes(packet.body, "big"))
    # The 4th publish closed the connection unacknowledged; the three within the burst
    # were stored (acknowledged unless the close came first: the device resends those).
    assert acked == [1, 2, 3][: len(acked)]
    assert len([p for p in sink.received if p.device_id.endswith("flood")]) == 3
    assert quotas.counters.rate_disconnects == 1
    # A reconnect at once does not buy a fresh burst: the debt stays with the device id.
    again = await harness.raw_client(broker, "flood")
    await again.send(publish_packet("d/x/up/t", b"x", qos=1, packet_id=1))
    await again.expect_closed()
    mid = good.publish("d/good/up/t", b"ok", 1)
    await eventually(lambda: mid in good.acked, "another device is not affected")
    events = [r["event"] for r in AuditLog(tmp_path / "audit.jsonl").read()]
    assert events.count("quota_disconnect") == 2


@pytest.mark.parametrize("policy", ["disconnect", "puback_discard"])
async def test_oversize_payload(harness: Harness, tmp_path: Path, policy: str) -> None:
    sink = FakeSink()
    settings = QuotaSettings(
        on_oversize=policy,  # type: ignore[arg-type]  # parametrized literal
        default=QuotaLimits(max_payload_bytes=100),
    )
    broker, quotas = await quota_broker(harness, sink, settings, tmp_path)
    client = await harness.raw_client(broker, "big")
    await client.send(publish_packet("d/x/up/t", b"a" * 100, qos=1, packet_id=1))
    await client.expect(PUBACK, 1)  # at the limit is fine
    await client.send(publish_packet("d/x/up/t", b"b" * 101, qos=1, packet_id=2))
    await client.send(publish_packet("d/x/up/t", b"c", qos=1, packet_id=3))
    if policy == "disconnect":
        await client.expect_closed()
        assert quotas.counters.oversize_disconnects == 1
        assert [p.payload for p in sink.received] == [b"a" * 100]
    else:
        await client.expect(PUBACK, 2)  # acknowledged in its turn, never stored
        await client.expect(PUBACK, 3)
        assert quotas.counters.oversize_discarded == 1
        assert [p.payload for p in sink.received] == [b"a" * 100, b"c"]
    (record,) = [r for r in AuditLog(tmp_path / "audit.jsonl").read()]
    assert (record["event"], record["size"], record["action"]) == ("quota_oversize", 101, policy)


async def test_max_subscriptions_refuses_further_filters(harness: Harness, tmp_path: Path) -> None:
    settings = QuotaSettings(default=QuotaLimits(max_subscriptions=2))
    broker, quotas = await quota_broker(harness, FakeSink(), settings, tmp_path)
    client = await harness.raw_client(broker, "subs")
    granted = []
    for packet_id, topic_filter in enumerate(["a/1", "a/2", "a/3", "a/1"], start=1):
        await client.send(subscribe_packet(packet_id, topic_filter))
        suback = await client.read()
        assert suback is not None
        granted.append(suback.body[2])
    assert granted == [1, 1, 0x80, 1]  # the third filter is refused; re-subscribing is fine
    assert quotas.counters.subscriptions_refused == 1
    assert quotas.subscription_count(f"{harness.name}-subs") == 2
    await client.close()
    # A clean session's subscriptions end with it: the next connection may subscribe again.
    await eventually(lambda: quotas.subscription_count(f"{harness.name}-subs") == 0, "cleanup")


async def test_connection_rate_limit_per_address(harness: Harness, tmp_path: Path) -> None:
    settings = QuotaSettings(connections_per_s=0.01, connections_burst=3.0)
    broker, quotas = await quota_broker(harness, FakeSink(), settings, tmp_path)
    accepted = [await harness.raw_client(broker, f"c{i}") for i in range(3)]
    refused = await RawClient.open(port_of(broker))
    harness.raw.append(refused)
    await refused.expect_closed()  # closed before any CONNECT was read
    assert quotas.counters.connections_refused == 1
    for client in accepted:  # the connections already accepted are untouched
        await client.ping()
    events = [r["event"] for r in AuditLog(tmp_path / "audit.jsonl").read()]
    assert events == ["quota_connection_refused"]


async def test_quotas_survive_a_security_reload(harness: Harness, tmp_path: Path) -> None:
    settings = QuotaSettings(default=QuotaLimits(messages_per_s=1.0, messages_burst=1.0))
    broker, quotas = await quota_broker(harness, FakeSink(), settings, tmp_path)
    broker.replace_security(Security())  # what a SIGHUP reload does with new ACL settings
    # The [quotas] section needs a restart; the live buckets must not be reset by a reload.
    assert broker.security.quotas is quotas
    assert broker.amqtt_broker.edge.security.quotas is quotas
