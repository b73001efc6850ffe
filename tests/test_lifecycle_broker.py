"""Connection ends and wills in the embedded broker: real amqtt, real sockets on port 0, a
recording sink and lifecycle listener (no buffer, no Kafka)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from edge.acl import AclPolicy
from edge.broker import EdgeBroker
from edge.broker_state import Security
from edge.lifecycle import ConnectionEnded, SessionInfo
from tests.test_edge_broker import CONNACK, FakeSink, Harness, RawClient, eventually, port_of
from tests.test_lifecycle_e2e import connect_packet

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A :class:`edge.lifecycle.LifecycleListener` that keeps what it was told."""

    def __init__(self) -> None:
        self.started: list[SessionInfo] = []
        self.ended: list[ConnectionEnded] = []
        self.order: list[str] = []

    def connection_started(self, info: SessionInfo) -> None:
        self.started.append(info)
        self.order.append("started")

    def connection_ended(self, ended: ConnectionEnded) -> None:
        self.ended.append(ended)
        self.order.append("ended")


@pytest.fixture
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h = Harness(request.node.name)
    try:
        yield h
    finally:
        await h.close()


async def connect(harness: Harness, broker: EdgeBroker, packet: bytes) -> RawClient:
    client = await RawClient.open(port_of(broker))
    harness.raw.append(client)
    await client.send(packet)
    connack = await client.read()
    assert connack is not None
    assert connack.packet_type == CONNACK
    assert connack.body[1] == 0
    return client


async def test_abrupt_close_publishes_the_will_through_the_sink(harness: Harness) -> None:
    sink, recorder = FakeSink(), Recorder()
    broker = await harness.broker(sink, lifecycle=recorder)
    client = await connect(
        harness, broker, connect_packet("dev-a", keep_alive=30, will=("d/dev-a/up/event", b"w"))
    )
    await eventually(lambda: recorder.started, "connected")
    (info,) = recorder.started
    assert (info.device_id, info.keep_alive_s, info.auth_method) == ("dev-a", 30, "anonymous")
    assert (info.will_topic, info.will_qos, info.clean_session) == ("d/dev-a/up/event", 1, True)
    client.writer.transport.abort()  # no DISCONNECT
    await eventually(lambda: recorder.ended, "disconnected")
    (ended,) = recorder.ended
    assert (ended.reason, ended.will_published) == ("connection_lost", True)
    await eventually(lambda: sink.received, "the will submitted")
    (will,) = sink.received
    assert (will.device_id, will.topic, will.payload, will.qos) == (
        "dev-a",
        "d/dev-a/up/event",
        b"w",
        1,
    )
    assert broker.stats.wills_published == 1


async def test_a_will_the_acl_forbids_is_not_published(harness: Harness) -> None:
    sink, recorder = FakeSink(), Recorder()
    broker = await harness.broker(sink, lifecycle=recorder, security=Security(acl=AclPolicy()))
    client = await connect(
        harness, broker, connect_packet("dev-a", will=("d/dev-b/up/event", b"forged"))
    )
    client.writer.transport.abort()
    await eventually(lambda: recorder.ended, "disconnected")
    assert recorder.ended[0].will_published is False
    assert broker.stats.wills_denied == 1
    assert broker.stats.wills_published == 0
    assert sink.received == []


async def test_protocol_error_and_shutdown_reasons(harness: Harness) -> None:
    sink, recorder = FakeSink(), Recorder()
    broker = await harness.broker(sink, lifecycle=recorder)
    bad = await connect(harness, broker, connect_packet("dev-bad", will=("d/dev-bad/up/x", b"1")))
    await connect(harness, broker, connect_packet("dev-stay", will=("d/dev-stay/up/x", b"2")))
    await bad.send(b"\xf0\x00")  # reserved packet type
    await eventually(lambda: recorder.ended, "protocol error")
    assert (recorder.ended[0].device_id, recorder.ended[0].reason) == ("dev-bad", "protocol_error")
    assert recorder.ended[0].will_published is True
    await broker.stop()
    await eventually(lambda: len(recorder.ended) == 2, "shutdown")
    last = recorder.ended[1]
    assert (last.device_id, last.reason, last.will_published) == (
        "dev-stay",
        "gateway_shutdown",
        False,
    )
    assert [p.topic for p in sink.received] == ["d/dev-bad/up/x"]  # no will at shutdown


@pytest.mark.parametrize("clean", [True, False])
async def test_takeover_ends_the_old_connection_first_without_its_will(
    harness: Harness, clean: bool
) -> None:
    """amqtt takes over a clean_session=0 session itself, a clean one is taken over by our
    handler: either way the old connection's end (taken_over, no will) is reported before
    the new connection's start, and the new one says it took over."""
    sink, recorder = FakeSink(), Recorder()
    broker = await harness.broker(sink, lifecycle=recorder)
    packet = connect_packet("dev-t", clean=clean, will=("d/dev-t/up/event", b"old-will"))
    old = await connect(harness, broker, packet)
    await connect(harness, broker, connect_packet("dev-t", clean=clean))
    await old.expect_closed()
    await eventually(lambda: len(recorder.started) == 2, "second connection")
    await eventually(lambda: recorder.ended, "first connection ended")
    (ended,) = recorder.ended
    assert (ended.reason, ended.will_published) == ("taken_over", False)
    assert recorder.order == ["started", "ended", "started"]
    first, second = recorder.started
    assert (first.took_over, second.took_over) == (False, True)
    assert second.session_present is (not clean)
    assert sink.received == []
    assert broker.stats.wills_published == 0
