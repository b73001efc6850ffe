"""Pure bridge logic with a fake clock: circuit breaker, batch planning, progress records."""

from __future__ import annotations

import random
import typing

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka import errors as kerr
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from bridge.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from bridge.outcomes import (
    TopicWatch,
    classify_error,
    narrow_to_suspects,
    plan_batch,
    releasable,
)
from bridge.progress import Progress, from_ranges, to_ranges
from bridge.records import KafkaRecord, RecordBuilder, record_size
from edge.buffer import DeadLetter, StoredMessage
from gateway.config import KafkaConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: FakeClock, **kw: float) -> CircuitBreaker:
    policy = BreakerPolicy(**{"failure_threshold": 3, "window": 10, "jitter": 0.0, **kw})  # type: ignore[arg-type]
    return CircuitBreaker(policy, clock=clock, rng=random.Random(1))


def test_breaker_opens_after_consecutive_failures_and_blocks_calls() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, open_base_s=2.0, open_max_s=30.0)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
        assert breaker.state is BreakerState.CLOSED
        clock.now += breaker.delay()  # capped exponential retry delay while closed
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.delay() == pytest.approx(2.0)
    clock.now += 1.9
    assert not breaker.allow()
    assert breaker.snapshot()["next_probe_in_s"] == pytest.approx(0.1)


def test_half_open_lets_exactly_one_probe_through_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, open_base_s=1.0)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(), "a second call while the probe is out"
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.allow()
    assert breaker.allow()


def test_cooldown_grows_exponentially_per_trip_and_is_capped() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, open_base_s=1.0, open_max_s=5.0)
    for _ in range(3):
        breaker.record_failure()
    cooldowns = []
    for _ in range(5):
        cooldowns.append(breaker.delay())
        clock.now += breaker.delay()
        assert breaker.allow()  # the probe
        breaker.record_failure()  # fails: open again, longer
        assert breaker.state is BreakerState.OPEN
    assert cooldowns == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0])
    clock.now += breaker.delay()
    assert breaker.allow()
    breaker.record_success()
    for _ in range(3):
        breaker.record_failure()
    assert breaker.delay() == pytest.approx(1.0), "a successful probe resets the growth"


def test_jitter_stays_within_bounds() -> None:
    clock = FakeClock()
    policy = BreakerPolicy(failure_threshold=1, open_base_s=4.0, open_max_s=4.0, jitter=0.5)
    seen = set()
    for seed in range(50):
        breaker = CircuitBreaker(policy, clock=clock, rng=random.Random(seed))
        breaker.record_failure()
        delay = breaker.delay()
        assert 2.0 <= delay <= 4.0
        seen.add(round(delay, 3))
    assert len(seen) > 10


def test_failure_rate_opens_without_consecutive_failures() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, failure_rate=0.5)
    for i in range(10):
        if breaker.state is BreakerState.OPEN:
            break
        clock.now += breaker.delay()
        if i % 2:
            breaker.record_failure()
        else:
            breaker.record_success()
    assert breaker.state is BreakerState.OPEN
    assert breaker.consecutive_failures == 1


def test_retry_delay_while_closed_is_capped_and_resets() -> None:
    clock = FakeClock()
    breaker = _breaker(
        clock, failure_threshold=100, failure_rate=1.0, retry_base_s=1.0, open_max_s=3.0
    )
    delays = []
    for _ in range(5):
        breaker.record_failure()
        delays.append(breaker.delay())
        assert not breaker.allow()
        clock.now += breaker.delay()
    assert delays == pytest.approx([1.0, 2.0, 3.0, 3.0, 3.0])
    breaker.record_success()
    assert breaker.delay() == 0.0
    assert breaker.allow()


def _msg(
    row_id: int, device: str = "d1", cls: str = "event", payload: bytes = b"x"
) -> StoredMessage:
    return StoredMessage(row_id, device, cls, f"d/{device}/up/{cls}", 1, payload, 0, 5)


def _builder() -> RecordBuilder:
    return RecordBuilder(
        gateway_id="gw",
        class_topics={"event": "ev", "bulk": "bk"},
        content_types={},
        dead_letter_topic="dlq",
    )


def test_plan_dead_letters_oversized_and_holds_missing_topics_until_deadline() -> None:
    builder = _builder()
    batch = [_msg(1), _msg(2, payload=b"y" * 5000), _msg(3), _msg(4, cls="bulk")]
    records = [builder.build(m) for m in batch]
    plan = plan_batch(
        records, max_record_bytes=2000, missing_for={"bk": 10.0}, missing_deadline_s=60
    )
    assert plan.send == [0, 2]
    assert [i for i, _ in plan.dead] == [1]
    assert "exceeds kafka.max_request_bytes" in plan.dead[0][1]
    assert plan.held == [3]
    plan = plan_batch(
        records, max_record_bytes=2000, missing_for={"bk": 61.0}, missing_deadline_s=60
    )
    assert [i for i, _ in plan.dead] == [1, 3]
    assert "does not exist" in plan.dead[1][1]
    plan = plan_batch(
        records, max_record_bytes=10_000, missing_for={"bk": 1e9}, missing_deadline_s=None
    )
    assert plan.held == [3]
    assert not plan.dead


def test_releasable_treats_dead_letters_as_done_for_ordering() -> None:
    batch = [_msg(1), _msg(2), _msg(3), _msg(4, device="d2")]
    topics = ["ev"] * 4
    # Row 2 was dead-lettered: row 3 of the same device stream may still be released.
    done = releasable(batch, [True, False, True, False], topics, dead={2})
    assert [m.row_id for m in done] == [1, 3]
    # Without the dead letter, row 2 blocks row 3.
    assert [m.row_id for m in releasable(batch, [True, False, True, True], topics)] == [1, 4]


def test_narrowing_sends_a_size_suspect_alone() -> None:
    batch = [_msg(1), _msg(2), _msg(3)]
    assert [m.row_id for m in narrow_to_suspects(batch, {2})] == [1]
    assert [m.row_id for m in narrow_to_suspects(batch[1:], {2})] == [2]
    assert [m.row_id for m in narrow_to_suspects(batch, set())] == [1, 2, 3]


def test_error_classification() -> None:
    assert classify_error(kerr.MessageSizeTooLargeError()).size_suspect
    assert classify_error(kerr.RecordTooLargeError()).size_suspect
    assert classify_error(kerr.TopicAuthorizationFailedError()).dead_reason
    assert classify_error(kerr.InvalidTopicError()).dead_reason
    for retriable in (
        kerr.NotLeaderForPartitionError(),
        kerr.KafkaConnectionError(),
        kerr.UnknownTopicOrPartitionError(),
        kerr.RequestTimedOutError(),
    ):
        verdict = classify_error(retriable)
        assert verdict.dead_reason is None
        assert not verdict.size_suspect


def test_topic_watch_measures_how_long_a_topic_is_missing() -> None:
    watch = TopicWatch()
    assert watch.seen("t", False, 100.0) == 0.0
    assert watch.seen("t", False, 130.0) == 30.0
    assert watch.missing == ["t"]
    assert watch.seen("t", True, 140.0) == 0.0
    assert watch.seen("t", False, 150.0) == 0.0


def test_dead_letter_record_carries_reason_and_is_truncated_to_fit() -> None:
    builder = _builder()
    dead = DeadLetter(
        7, "d1", "event", "d/d1/up/event", 1, b"z" * 50_000, 5, None, "too big", 9, None
    )
    record = builder.build_dead_letter(dead, max_record_bytes=20_000)
    headers = dict(record.headers)
    assert record.topic == "dlq"
    assert record.key == b"d1"
    assert headers["tg-dead-letter-reason"] == b"too big"
    assert headers["tg-message-id"] == b"gw:7"
    assert headers["tg-dead-letter-truncated"] == b"50000"
    assert record_size(record) <= 20_000
    small = builder.build_dead_letter(
        DeadLetter(8, "d1", "event", "t", 1, b"ok", 5, None, "r", 9, None), 20_000
    )
    assert small.value == b"ok"
    assert "tg-dead-letter-truncated" not in dict(small.headers)


def test_progress_ranges_and_round_trip() -> None:
    assert to_ranges([5, 1, 2, 3, 9, 10, 2]) == [(1, 3), (5, 5), (9, 10)]
    assert from_ranges(to_ranges([5, 1, 2, 3, 9, 10])) == [1, 2, 3, 5, 9, 10]
    ids = list(range(1_000_000, 1_002_000))
    progress = Progress("gw-1", 42, tuple(to_ranges(ids)), 123, tuple(to_ranges([7])))
    encoded = progress.encode()
    assert len(encoded) < 200, "a contiguous batch encodes as one range"
    decoded = Progress.decode(encoded)
    assert decoded == progress
    assert decoded is not None
    assert decoded.row_ids == ids
    assert decoded.dead_letter_ids == [7]
    for garbage in (
        b"",
        b"{",
        b'{"v": 2}',
        b'{"v":1,"ranges":[[3,1]],"gateway":"g","seq":1,"ts":1}',
        None,
    ):
        assert Progress.decode(garbage) is None


def test_record_size_matches_aiokafka_estimate() -> None:
    record = KafkaRecord("t", b"k", b"v" * 100, [("h", b"x")])
    assert 100 < record_size(record) < 200


def test_partition_runs_match_aiokafka_default_partitioner_and_keep_order() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from bridge.batching import PartitionChooser, plan_partition_runs
    from bridge.records import KafkaRecord

    keys = [f"dev-{i:05d}".encode() for i in range(40)]
    records = [
        KafkaRecord(topic="t.a" if i % 3 else "t.b", key=keys[i % 40], value=b"%d" % i, headers=[])
        for i in range(400)
    ]
    partitions = {"t.a": {0, 1, 2, 3, 4, 5}, "t.b": {0, 1, 2}}
    chooser = PartitionChooser()
    runs = plan_partition_runs(records, partitions, chooser)
    seen: list[int] = []
    for run in runs:
        assert run.indices == sorted(run.indices)  # batch order inside a partition
        for index in run.indices:
            record = records[index]
            expected = DefaultPartitioner()(
                record.key, sorted(partitions[record.topic]), list(partitions[record.topic])
            )
            assert run.partition == expected
            assert run.topic == record.topic
        seen += run.indices
    assert sorted(seen) == list(range(400))
    # A grown topic re-maps keys like aiokafka would (the cache is per partition count).
    grown = plan_partition_runs(records[:1], {"t.b": set(range(7)), "t.a": set()}, chooser)
    assert grown[0].partition == DefaultPartitioner()(records[0].key, list(range(7)), [])


@pytest.mark.parametrize(
    "compression", typing.get_args(KafkaConfig.model_fields["compression"].annotation)
)
def test_every_compression_choice_has_its_codec_and_round_trips(compression: str) -> None:
    """A choice the config accepts but aiokafka cannot encode would fail only when the
    producer starts, on an edge box, at the first send (the codecs come from cramjam)."""
    if compression != "none":
        available, codec = AIOKafkaProducer._COMPRESSORS[compression]
        assert available(), f"{compression}: codec library missing (aiokafka extras)"
    else:
        codec = 0
    builder = BatchBuilder(1 << 20, codec)
    headers = [("tg-device-id", b"dev-1"), ("tg-qos", b"1")]
    for i in range(50):
        assert builder.append(key=b"dev-1", value=b"%d" % i, timestamp=None, headers=headers)
    batch = DefaultRecordBatch(bytearray(builder._build()))
    records = list(batch)
    assert [r.value for r in records] == [b"%d" % i for i in range(50)]
    assert records[0].headers == headers
