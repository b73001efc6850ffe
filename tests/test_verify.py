"""The verifier oracle: pure analysis first, then against the project's real local Kafka."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from typer.testing import CliRunner

from device_sim.envelope import encode_envelope, make_msg_id
from device_sim.kafka_reader import KafkaSource, read_topics
from device_sim.ledger import AckEntry, AckLedgerWriter, DropEntry
from device_sim.verify import Oracle, RecordView, VerifyReport, analyze

RUN = "r1"


def ack(device: str, seq: int, class_name: str = "telemetry", run: str = RUN) -> AckEntry:
    return AckEntry(device, class_name, make_msg_id(device, run, class_name, seq), seq, run, 0)


def value(device: str, seq: int, class_name: str = "telemetry", run: str = RUN) -> bytes:
    return encode_envelope(
        msg_id=make_msg_id(device, run, class_name, seq), seq=seq, ts=1, body=b"x"
    )


class Topic:
    """Builds records in partition order, the way one partition of a topic would hold them."""

    def __init__(self, name: str = "iot.telemetry", partition: int = 0) -> None:
        self.name, self.partition, self.records = name, partition, list[RecordView]()

    def put(self, device: str, seq: int, class_name: str = "telemetry", run: str = RUN) -> None:
        self.raw(device, value(device, seq, class_name, run), class_name)

    def raw(self, device: str, data: bytes | None, class_name: str = "telemetry") -> None:
        headers = {"tg-device-id": device, "tg-class": class_name}
        self.records.append(
            RecordView(self.name, self.partition, len(self.records), device.encode(), data, headers)
        )


def stream(n: int, device: str = "dev-00001", class_name: str = "telemetry") -> list[AckEntry]:
    return [ack(device, s, class_name) for s in range(1, n + 1)]


# ------------------------------------------------------------------ pure analysis


def test_clean_run_is_ok() -> None:
    topic = Topic()
    acks = stream(5) + stream(3, "dev-00002")
    for entry in acks:
        topic.put(entry.device_id, entry.seq)
    report = analyze(acks, topic.records)
    assert report.ok(strict=True)
    assert report.total_line().startswith(
        "acknowledged=8 in_kafka=8 missing=0 duplicates=0 out_of_order=0 not_in_ledger=0"
    )


def test_missing_message_is_named() -> None:
    topic = Topic()
    for seq in (1, 2, 4, 5):
        topic.put("dev-00001", seq)
    report = analyze(stream(5), topic.records)
    assert not report.ok()
    assert report.total.missing == 1
    assert report.samples["missing"] == [make_msg_id("dev-00001", RUN, "telemetry", 3)]
    assert report.total.out_of_order == 0  # a gap is not reordering


def test_lost_tail_of_a_stream_is_missing() -> None:
    topic = Topic()
    for seq in (1, 2, 3):
        topic.put("dev-00001", seq)
    report = analyze(stream(6), topic.records)
    assert report.total.missing == 3
    assert report.streams[("dev-00001", "telemetry")].missing == 3
    assert [m.rsplit(":", 1)[1] for m in report.samples["missing"]] == ["4", "5", "6"]


def test_duplicate_is_counted_once_and_not_as_out_of_order() -> None:
    topic = Topic()
    # A gateway restart replaying 2..3 after 3: two duplicates, no reordering.
    for seq in (1, 2, 3, 2, 3, 4):
        topic.put("dev-00001", seq)
    report = analyze(stream(4), topic.records)
    assert (report.total.duplicates, report.total.out_of_order, report.total.missing) == (2, 0, 0)
    assert report.ok()
    assert not report.ok(strict=True)


def test_swapped_pair_is_out_of_order() -> None:
    topic = Topic()
    for seq in (1, 3, 2, 4):
        topic.put("dev-00001", seq)
    report = analyze(stream(4), topic.records)
    assert report.total.out_of_order == 1
    assert "seq 2 after seq 3" in report.samples["out_of_order"][0]
    assert report.ok()
    assert not report.ok(strict=True)


def test_order_is_judged_per_device_and_class_and_partition_order_not_input_order() -> None:
    events, telemetry = Topic("iot.events"), Topic("iot.telemetry", partition=2)
    for seq in (1, 2):
        events.put("dev-00001", seq, "event")
    for seq in (1, 2, 3):
        telemetry.put("dev-00001", seq)
    # Interleave the partitions and reverse the input: analyze sorts by (topic, partition,
    # offset), so neither makes anything out of order.
    records = list(reversed(events.records + telemetry.records))
    report = analyze(stream(2, class_name="event") + stream(3), records)
    assert report.ok(strict=True)
    assert set(report.by_class()) == {"event", "telemetry"}


def test_seq_restart_in_a_new_run_is_not_out_of_order() -> None:
    topic = Topic()
    for seq in (1, 2, 3):
        topic.put("dev-00001", seq, run="old")
    for seq in (1, 2):
        topic.put("dev-00001", seq)
    report = analyze(stream(2), topic.records)
    assert report.ok(strict=True)
    assert report.total.not_in_ledger == 3  # the old run's records, reported separately


def test_unacked_but_stored_records_are_not_in_ledger() -> None:
    topic = Topic()
    for seq in (1, 2, 3):
        topic.put("dev-00001", seq)
    report = analyze(stream(2), topic.records)  # the PUBACK for 3 never arrived
    assert report.ok(strict=True)
    assert report.total.not_in_ledger == 1
    assert report.streams[("dev-00001", "telemetry")].not_in_ledger == 1


def test_drop_ledger_is_subtracted_from_missing() -> None:
    topic = Topic()
    topic.put("dev-00001", 1)
    drops = [
        DropEntry("dev-00001", "telemetry", "drop_oldest", msg_id=ack("dev-00001", 2).msg_id),
        DropEntry("dev-00001", "telemetry", "expired", gateway_message_id="gw:9", seq=3),
        DropEntry("dev-00009", "telemetry", "expired", msg_id="dev-00009:r1:telemetry:1"),
    ]
    report = analyze(stream(4), topic.records, drops)
    assert (report.total.dropped, report.total.missing) == (2, 1)
    assert report.samples["missing"] == [ack("dev-00001", 4).msg_id]
    assert report.unmatched_drops == 1
    assert any("drop_oldest" in s for s in report.samples["dropped"])


def test_undecodable_values_are_counted_not_fatal() -> None:
    topic = Topic()
    topic.put("dev-00001", 1)
    topic.raw("dev-00001", b"\xff\x00 not cbor")
    topic.raw("dev-00001", None)
    topic.raw("other", b'{"json": true}')
    topic.put("dev-00001", 2)
    report = analyze(stream(2), topic.records)
    assert report.undecodable == 3
    assert report.records == 5
    assert report.ok(strict=True)
    assert report.samples["undecodable"][0] == "iot.telemetry/0@1"


def test_wrong_key_is_reported() -> None:
    topic = Topic()
    topic.put("dev-00001", 1)
    topic.records[0] = RecordView("iot.telemetry", 0, 0, b"someone-else", topic.records[0].value)
    report = analyze(stream(1), topic.records)
    assert report.key_mismatch == 1


def test_oracle_is_incremental_and_json_is_serialisable() -> None:
    oracle = Oracle(stream(3) + stream(3))  # the same ledger given twice
    topic = Topic()
    for seq in (1, 3, 3):
        topic.put("dev-00001", seq)
    for record in topic.records:
        oracle.add(record)
    report = oracle.finish()
    assert report.ledger_duplicates == 3
    data = json.loads(json.dumps(report.to_json(strict=True)))
    assert data["ok"] is False
    assert data["total"]["missing"] == 1
    assert data["total"]["duplicates"] == 1
    assert data["streams"][0]["device_id"] == "dev-00001"
    assert report.worst_devices()[0][0] == ("dev-00001", "telemetry")


# ------------------------------------------------------------------ against real Kafka


async def _produce(
    bootstrap: list[str],
    context: ssl.SSLContext,
    topic: str,
    messages: Iterable[tuple[str, int, str]],
    *,
    raw: Iterable[bytes] = (),
) -> None:
    """Produce records in the gateway's contract format (docs/kafka-records.md)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        security_protocol="SSL",
        ssl_context=context,
        acks="all",
    )
    async with asyncio.timeout(60):
        await producer.start()
    try:
        futures = []
        for counter, (device, seq, class_name) in enumerate(messages, start=1):
            headers = [
                ("tg-message-id", f"gw-test:{counter}".encode()),
                ("tg-device-id", device.encode()),
                ("tg-gateway-id", b"gw-test"),
                ("tg-mqtt-topic", f"d/{device}/up/{class_name}".encode()),
                ("tg-class", class_name.encode()),
                ("tg-content-type", b"application/cbor"),
                ("tg-ingest-ts", b"1700000000000"),
                ("tg-qos", b"1"),
            ]
            futures.append(
                await producer.send(
                    topic,
                    value=value(device, seq, class_name),
                    key=device.encode(),
                    headers=headers,
                )
            )
        for data in raw:
            futures.append(await producer.send(topic, value=data, key=b"foreign"))
        async with asyncio.timeout(60):
            await asyncio.gather(*futures)
    finally:
        async with asyncio.timeout(30):
            await producer.stop()


def _write_ledger(path: Path, entries: Iterable[AckEntry]) -> Path:
    with AckLedgerWriter(path, run_id=RUN) as writer:
        for entry in entries:
            writer.append(entry)
    return path


def _write_config(tmp_path: Path, kafka: Any, topic: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[kafka]
bootstrap_servers = {json.dumps(kafka.bootstrap_servers)}
[kafka.tls]
cafile = "{kafka.ca_file}"
certfile = "{kafka.cert_file}"
keyfile = "{kafka.key_file}"
[classes.telemetry]
kafka_topic = "{topic}"
"""
    )
    return path


def _verify(*args: str) -> tuple[int, str]:
    from device_sim.__main__ import app

    result = CliRunner().invoke(app, ["verify", *args])
    return result.exit_code, result.output


DEVICES = [f"dev-{i:05d}" for i in range(4)]


def _full(n: int = 6) -> list[AckEntry]:
    return [ack(device, seq) for device in DEVICES for seq in range(1, n + 1)]


def _messages(entries: Iterable[AckEntry]) -> list[tuple[str, int, str]]:
    return [(e.device_id, e.seq, e.class_name) for e in entries]


@pytest.mark.kafka
def test_kafka_clean_run_exits_0(
    kafka: Any, kafka_topic: str, kafka_ssl_context: ssl.SSLContext, tmp_path: Path
) -> None:
    entries = _full()
    asyncio.run(
        _produce(kafka.bootstrap_servers, kafka_ssl_context, kafka_topic, _messages(entries))
    )
    ledger = _write_ledger(tmp_path / "acks.jsonl", entries)
    out_json = tmp_path / "report.json"
    code, output = _verify(
        "-c", str(_write_config(tmp_path, kafka, kafka_topic)),
        "--ledger", str(ledger), "--strict", "--json", str(out_json),
    )  # fmt: skip
    assert code == 0, output
    assert (
        "acknowledged=24 in_kafka=24 missing=0 duplicates=0 out_of_order=0 not_in_ledger=0"
        in output
    )
    assert json.loads(out_json.read_text())["ok"] is True


@pytest.mark.kafka
def test_kafka_never_produced_entries_fail_and_are_named(
    kafka: Any, kafka_topic: str, kafka_ssl_context: ssl.SSLContext, tmp_path: Path
) -> None:
    entries = _full()
    lost = {entries[2].msg_id, entries[9].msg_id}
    produced = [e for e in entries if e.msg_id not in lost]
    asyncio.run(
        _produce(kafka.bootstrap_servers, kafka_ssl_context, kafka_topic, _messages(produced))
    )
    ledger = _write_ledger(tmp_path / "acks.jsonl", entries)
    # Overrides instead of a config file: --bootstrap, the TLS files and --topic.
    code, output = _verify(
        "--ledger", str(ledger), "--bootstrap", kafka.bootstrap, "--topic", kafka_topic,
        "--cafile", str(kafka.ca_file), "--certfile", str(kafka.cert_file),
        "--keyfile", str(kafka.key_file),
    )  # fmt: skip
    assert code == 1, output
    assert "missing=2" in output
    for msg_id in lost:
        assert msg_id in output


@pytest.mark.kafka
def test_kafka_duplicate_and_swapped_pair_are_reported(
    kafka: Any, kafka_topic: str, kafka_ssl_context: ssl.SSLContext, tmp_path: Path
) -> None:
    entries = _full()
    messages = _messages(entries)
    # dev-00001: seq 3 twice (a replay); dev-00002: seq 4 before seq 3 (a swap).
    dup_at = messages.index(("dev-00001", 3, "telemetry"))
    messages.insert(dup_at + 1, messages[dup_at])
    swap = messages.index(("dev-00002", 3, "telemetry"))
    messages[swap], messages[swap + 1] = messages[swap + 1], messages[swap]
    asyncio.run(_produce(kafka.bootstrap_servers, kafka_ssl_context, kafka_topic, messages))
    ledger = _write_ledger(tmp_path / "acks.jsonl", entries)
    config = _write_config(tmp_path, kafka, kafka_topic)
    code, output = _verify("-c", str(config), "--ledger", str(ledger))
    assert code == 0, output  # nothing missing: not strict
    assert "missing=0 duplicates=1 out_of_order=1" in output
    assert make_msg_id("dev-00001", RUN, "telemetry", 3) in output
    assert "seq 3 after seq 4" in output
    code, output = _verify("-c", str(config), "--ledger", str(ledger), "--strict")
    assert code == 1, output


@pytest.mark.kafka
def test_kafka_lost_tail_is_caught_and_foreign_records_tolerated(
    kafka: Any, kafka_topic: str, kafka_ssl_context: ssl.SSLContext, tmp_path: Path
) -> None:
    entries = _full(8)
    tail = [e for e in entries if e.device_id == "dev-00003" and e.seq > 5]
    produced = [e for e in entries if e not in tail]
    asyncio.run(
        _produce(
            kafka.bootstrap_servers,
            kafka_ssl_context,
            kafka_topic,
            _messages(produced),
            raw=[b"\x00 not an envelope"],
        )
    )
    ledger = _write_ledger(tmp_path / "acks.jsonl", entries)
    out_json = tmp_path / "report.json"
    code, output = _verify(
        "-c", str(_write_config(tmp_path, kafka, kafka_topic)), "--ledger", str(ledger),
        "--isolation", "read_committed", "--json", str(out_json),
    )  # fmt: skip
    assert code == 1, output
    report = json.loads(out_json.read_text())
    assert report["total"]["missing"] == 3
    assert report["undecodable"] == 1
    assert sorted(report["samples"]["missing"]) == sorted(e.msg_id for e in tail)
    assert report["streams"] == [
        {
            "device_id": "dev-00003",
            "class": "telemetry",
            "acknowledged": 8,
            "found": 5,
            "missing": 3,
            "dropped": 0,
            "duplicates": 0,
            "out_of_order": 0,
            "not_in_ledger": 0,
        }
    ]


@pytest.mark.kafka
async def test_kafka_reader_reads_to_the_snapshot_end_without_a_group(
    kafka: Any, kafka_topic: str, kafka_ssl_context: ssl.SSLContext
) -> None:
    entries = _full(5)
    await _produce(kafka.bootstrap_servers, kafka_ssl_context, kafka_topic, _messages(entries))
    seen: list[RecordView] = []
    summary = await read_topics(
        KafkaSource(kafka.bootstrap_servers, kafka_ssl_context, [kafka_topic, "t.no-such-topic"]),
        seen.append,
        timeout_s=60,
    )
    assert summary.complete
    assert summary.missing_topics == ["t.no-such-topic"]
    assert len(seen) == summary.records == 20
    assert sum(end for _s, end, _r in summary.partitions.values()) == 20
    # Per partition, offsets arrive in order; headers are decoded to text.
    by_partition: dict[int, list[int]] = {}
    for record in seen:
        by_partition.setdefault(record.partition, []).append(record.offset)
        assert record.headers["tg-device-id"] == record.key.decode()  # type: ignore[union-attr]
    assert all(offsets == sorted(offsets) for offsets in by_partition.values())


@pytest.mark.kafka
def test_kafka_unreachable_is_exit_2(kafka: Any, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    ledger = _write_ledger(tmp_path / "acks.jsonl", _full(1))
    code, output = _verify(
        "--ledger", str(ledger), "--bootstrap", dead, "--topic", "t.x", "--timeout", "5",
        "--cafile", str(kafka.ca_file), "--certfile", str(kafka.cert_file),
        "--keyfile", str(kafka.key_file),
    )  # fmt: skip
    assert code == 2, output
    assert "cannot read offsets from Kafka" in output


def test_verify_usage_errors_exit_2(tmp_path: Path) -> None:
    ledger = _write_ledger(tmp_path / "acks.jsonl", _full(1))
    cases = [
        ["--ledger", str(ledger)],  # neither config nor bootstrap
        ["--ledger", str(tmp_path / "nope.jsonl"), "--bootstrap", "127.0.0.1:1"],
        ["--ledger", str(ledger), "-c", str(tmp_path / "missing.toml")],
        ["--ledger", str(ledger), "--bootstrap", "127.0.0.1:1", "--cafile", "x"],
        ["--ledger", str(ledger), "--bootstrap", "127.0.0.1:1", "--isolation", "dirty"],
        [
            "--ledger", str(ledger), "--bootstrap", "127.0.0.1:1", "--cafile", "a",
            "--certfile", "b", "--keyfile", "c",
        ],
        [],  # --ledger is required
    ]  # fmt: skip
    for args in cases:
        code, output = _verify(*args)
        assert code == 2, (args, output)
        assert "Traceback" not in output


def test_report_rendering_names_offenders() -> None:
    from io import StringIO

    from rich.console import Console

    from device_sim.report import print_verify_report

    topic = Topic()
    for seq in (1, 3, 2, 2):
        topic.put("dev-00001", seq)
    report: VerifyReport = analyze(stream(5), topic.records)
    buffer = StringIO()
    print_verify_report(Console(file=buffer, width=200), report, show=5, strict=True)
    text = buffer.getvalue()
    assert "worst streams" in text
    assert make_msg_id("dev-00001", RUN, "telemetry", 5) in text
    assert "FAIL" in text


@pytest.mark.kafka
def test_kafka_wait_reads_again_until_the_backlog_arrived(
    kafka: Any, kafka_topic: str, kafka_ssl_context: ssl.SSLContext
) -> None:
    from device_sim.cli import run_verification

    entries = _full(4)
    first, late = entries[:10], entries[10:]
    asyncio.run(_produce(kafka.bootstrap_servers, kafka_ssl_context, kafka_topic, _messages(first)))
    retries: list[int] = []

    def gateway_catches_up(report: VerifyReport) -> None:
        # Called when a read found messages missing: the "gateway" forwards the rest now.
        retries.append(report.total.missing)
        if len(retries) == 1:
            asyncio.run(
                _produce(kafka.bootstrap_servers, kafka_ssl_context, kafka_topic, _messages(late))
            )

    source = KafkaSource(kafka.bootstrap_servers, kafka_ssl_context, [kafka_topic])
    report = run_verification(
        entries, [], source, {}, timeout_s=60, wait_s=60, on_retry=gateway_catches_up
    )
    assert retries == [len(late)]
    assert report.ok(strict=True)
    assert report.total.found == len(entries)
