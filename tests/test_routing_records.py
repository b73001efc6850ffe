"""Pure logic: topic → class routing, Kafka record shape, and what may be released."""

from __future__ import annotations

from bridge.forwarder import releasable
from bridge.records import RecordBuilder
from edge.buffer import StoredMessage
from edge.routing import UNROUTED_CLASS, TopicRouter

ROUTER = TopicRouter("d/{device_id}/up/{class}", ["event", "telemetry"])


def test_contract_topics_route_to_their_class() -> None:
    assert ROUTER.route("dev-1", "d/dev-1/up/event").class_name == "event"
    assert ROUTER.route("dev-1", "d/dev-1/up/telemetry/temp/3").class_name == "telemetry"
    assert ROUTER.device_topic_prefix() == "d/"


def test_unroutable_topics_go_to_the_dead_letter_class_with_a_reason() -> None:
    cases = {
        "d/dev-1/up/unknown": "unknown class",
        "d/dev-2/up/event": "another device",
        "x/dev-1/up/event": "does not match",
        "d/dev-1": "does not match",
    }
    for topic, reason in cases.items():
        route = ROUTER.route("dev-1", topic)
        assert route.class_name == UNROUTED_CLASS
        assert route.reason is not None
        assert reason in route.reason


def _message(row_id: int, device: str = "dev-1", class_name: str = "event") -> StoredMessage:
    return StoredMessage(
        row_id, device, class_name, f"d/{device}/up/{class_name}", 1, b"\x00\xff", 1700, 8
    )


def test_record_carries_key_value_and_headers() -> None:
    builder = RecordBuilder(
        gateway_id="gw-1",
        class_topics={"event": "iot.events"},
        content_types={"event": "application/cbor"},
        dead_letter_topic="iot.dlq",
    )
    record = builder.build(_message(42))
    assert record.topic == "iot.events"
    assert record.key == b"dev-1"
    assert record.value == b"\x00\xff"
    headers = dict(record.headers)
    assert headers == {
        "tg-message-id": b"gw-1:42",
        "tg-device-id": b"dev-1",
        "tg-gateway-id": b"gw-1",
        "tg-mqtt-topic": b"d/dev-1/up/event",
        "tg-class": b"event",
        "tg-content-type": b"application/cbor",
        "tg-ingest-ts": b"1700",
        "tg-qos": b"1",
    }
    dead = builder.build(_message(43, class_name="gone"))
    assert dead.topic == "iot.dlq"
    assert b"not configured" in dict(dead.headers)["tg-dead-letter-reason"]


def test_release_stops_at_the_first_failure_of_each_stream() -> None:
    batch = [_message(1, "a"), _message(2, "b"), _message(3, "a"), _message(4, "b")]
    topics = ["t"] * 4
    done = releasable(batch, [True, False, True, True], topics)
    # b's row 2 failed, so b's row 4 must be resent after it, not released before it.
    assert [m.row_id for m in done] == [1, 3]
    assert releasable(batch, [False, True, True, True], topics)[0].row_id == 2
