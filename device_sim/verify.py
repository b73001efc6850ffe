"""The oracle: compare what devices were promised (ack ledger) with what is in Kafka.

Pure code, no I/O: :class:`Oracle` takes ledger entries, then Kafka records one at a time
(in partition order, partitions may interleave), and :meth:`Oracle.finish` produces a
:class:`VerifyReport`. :mod:`device_sim.kafka_reader` feeds it from a real cluster; tests feed
it lists.

Definitions (per device and class, and in total):

* ``acknowledged`` - ledger entries (the device got a PUBACK: the gateway promised delivery).
* ``found`` - acknowledged messages present in Kafka at least once.
* ``missing`` - acknowledged, not in Kafka, and not in the drop ledger. A broken promise.
* ``dropped`` - acknowledged, not in Kafka, recorded in the drop ledger (a configured policy).
* ``duplicates`` - extra copies of a msg id (a record whose msg id was already seen).
* ``out_of_order`` - a first copy whose ``seq`` is below the highest ``seq`` seen before it
  in the same device+class stream of the same simulator run (duplicates are not counted here).
* ``not_in_ledger`` - decodable records whose msg id is not in the ledger: normal for messages
  stored but never acknowledged (the device lost its PUBACK), or records from other runs.
* ``undecodable`` - records whose value is not a device envelope.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from device_sim.envelope import parse_msg_id, try_decode_envelope
from device_sim.ledger import AckEntry, DropEntry

__all__ = [
    "Oracle",
    "RecordView",
    "StreamStats",
    "VerifyReport",
    "analyze",
]

UNKNOWN = "?"


@dataclass(frozen=True, slots=True)
class RecordView:
    """The parts of a Kafka record the oracle looks at."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """``topic/partition@offset`` for reports."""
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass
class StreamStats:
    """Counts for one device+class stream (or a sum of streams)."""

    acknowledged: int = 0
    found: int = 0
    missing: int = 0
    dropped: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    not_in_ledger: int = 0

    def add(self, other: StreamStats) -> None:
        """Sum ``other`` into this."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def problems(self) -> int:
        """Missing + duplicates + out of order: what sorts the "worst devices" list."""
        return self.missing + self.duplicates + self.out_of_order


@dataclass
class VerifyReport:
    """Result of one verification. ``samples`` hold the first few offenders of each kind."""

    total: StreamStats
    streams: dict[tuple[str, str], StreamStats]
    records: int = 0
    """Kafka records read."""
    undecodable: int = 0
    unmatched_drops: int = 0
    """Drop-ledger entries that match no acknowledged message."""
    dropped_but_found: int = 0
    """Acknowledged messages in the drop ledger that are in Kafka anyway."""
    key_mismatch: int = 0
    """Records of ledger messages whose Kafka key is not the device id (breaks ordering)."""
    ledger_duplicates: int = 0
    """msg ids that appear more than once in the ack ledger (e.g. a ledger given twice)."""
    samples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Reader remarks: topics not found, partitions not read to the end."""

    def by_class(self) -> dict[str, StreamStats]:
        """Totals per class."""
        out: dict[str, StreamStats] = {}
        for (_device, class_name), stats in self.streams.items():
            out.setdefault(class_name, StreamStats()).add(stats)
        return dict(sorted(out.items()))

    def worst_devices(self, limit: int = 10) -> list[tuple[tuple[str, str], StreamStats]]:
        """Streams with the most problems, worst first (only streams with problems)."""
        bad = [(key, s) for key, s in self.streams.items() if s.problems]
        bad.sort(key=lambda item: (-item[1].problems, item[0]))
        return bad[:limit]

    def ok(self, *, strict: bool = False) -> bool:
        """No acknowledged message missing (strict: also no duplicates and nothing out of
        order)."""
        if self.total.missing:
            return False
        return not strict or not (self.total.duplicates or self.total.out_of_order)

    def total_line(self) -> str:
        """The one-line summary, e.g. ``acknowledged=10000 in_kafka=10000 missing=0 …``."""
        t = self.total
        return (
            f"acknowledged={t.acknowledged} in_kafka={t.found} missing={t.missing} "
            f"duplicates={t.duplicates} out_of_order={t.out_of_order} "
            f"not_in_ledger={t.not_in_ledger} dropped={t.dropped} "
            f"undecodable={self.undecodable} records={self.records}"
        )

    def to_json(self, *, strict: bool = False) -> dict[str, Any]:
        """Machine-readable form (``--json``)."""
        return {
            "ok": self.ok(strict=strict),
            "strict": strict,
            "total": asdict(self.total),
            "records": self.records,
            "undecodable": self.undecodable,
            "unmatched_drops": self.unmatched_drops,
            "dropped_but_found": self.dropped_but_found,
            "key_mismatch": self.key_mismatch,
            "ledger_duplicates": self.ledger_duplicates,
            "by_class": {name: asdict(s) for name, s in self.by_class().items()},
            "streams": [
                {"device_id": device, "class": class_name, **asdict(stats)}
                for (device, class_name), stats in sorted(self.streams.items())
                if stats.problems or stats.dropped
            ],
            "samples": self.samples,
            "notes": self.notes,
        }


class Oracle:
    """Incremental analysis: ledger first, then records, then :meth:`finish`.

    Memory is one dict entry per msg id seen (ledger and Kafka), which is the minimum for
    finding duplicates across a whole topic.
    """

    def __init__(
        self,
        acks: Iterable[AckEntry],
        drops: Iterable[DropEntry] = (),
        *,
        topic_classes: Mapping[str, str] | None = None,
        sample_limit: int = 50,
    ) -> None:
        self._ledger: dict[str, AckEntry] = {}
        self._ledger_duplicates = 0
        for entry in acks:
            if entry.msg_id in self._ledger:
                self._ledger_duplicates += 1
            else:
                self._ledger[entry.msg_id] = entry
        self._runs = {entry.run_id for entry in self._ledger.values() if entry.run_id}
        self._topic_classes = dict(topic_classes or {})
        self._sample_limit = sample_limit
        self._samples: dict[str, list[str]] = {}
        self._drops_by_id: dict[str, DropEntry] = {}
        self._drops_by_seq: dict[tuple[str, str, int], DropEntry] = {}
        self._unusable_drops = 0
        for drop in drops:
            if drop.msg_id is not None:
                self._drops_by_id[drop.msg_id] = drop
            elif drop.seq is not None:
                self._drops_by_seq[(drop.device_id, drop.class_name, drop.seq)] = drop
            else:
                # Only a gateway message id: the message never reached Kafka, so nothing
                # links that id to a device msg id. Counted as unmatched.
                self._unusable_drops += 1
        self._seen: dict[str, int] = {}
        self._max_seq: dict[tuple[str, str, str], tuple[int, str]] = {}
        self._streams: dict[tuple[str, str], StreamStats] = {}
        self._records = 0
        self._undecodable = 0
        self._key_mismatch = 0

    def _stream(self, device: str, class_name: str) -> StreamStats:
        key = (device, class_name)
        stats = self._streams.get(key)
        if stats is None:
            stats = self._streams[key] = StreamStats()
        return stats

    def _sample(self, kind: str, text: str) -> None:
        items = self._samples.setdefault(kind, [])
        if len(items) < self._sample_limit:
            items.append(text)

    def add(self, record: RecordView) -> None:
        """Account for one Kafka record; records of one partition must come in offset order."""
        self._records += 1
        envelope = try_decode_envelope(record.value)
        if envelope is None:
            self._undecodable += 1
            self._sample("undecodable", record.where)
            return
        msg_id = envelope.msg_id
        entry = self._ledger.get(msg_id)
        if entry is not None:
            device, class_name = entry.device_id, entry.class_name
            if record.key != device.encode():
                self._key_mismatch += 1
                self._sample("key_mismatch", f"{msg_id} at {record.where}")
        else:
            device = record.headers.get("tg-device-id") or _text(record.key) or UNKNOWN
            class_name = (
                record.headers.get("tg-class") or self._topic_classes.get(record.topic) or UNKNOWN
            )
        stats = self._stream(device, class_name)
        copies = self._seen.get(msg_id, 0) + 1
        self._seen[msg_id] = copies
        if copies > 1:
            stats.duplicates += 1
            self._sample("duplicates", f"{msg_id} (copy {copies} at {record.where})")
            return
        if entry is None:
            stats.not_in_ledger += 1
            self._sample("not_in_ledger", f"{msg_id} at {record.where}")
        run = self._run_of(msg_id, entry)
        if run is None:
            return
        order_key = (device, class_name, run)
        previous = self._max_seq.get(order_key)
        if previous is not None and envelope.seq < previous[0]:
            stats.out_of_order += 1
            self._sample(
                "out_of_order",
                f"{msg_id} (seq {envelope.seq} after seq {previous[0]}, at {record.where})",
            )
        else:
            self._max_seq[order_key] = (envelope.seq, msg_id)

    def _run_of(self, msg_id: str, entry: AckEntry | None) -> str | None:
        # Order is only judged inside one simulator run (seq restarts at 1 every run), and only
        # for runs under verification: foreign producers' seq semantics are unknown.
        if entry is not None:
            return entry.run_id
        parsed = parse_msg_id(msg_id)
        if parsed is not None and parsed[1] in self._runs:
            return parsed[1]
        return None

    def finish(self) -> VerifyReport:
        """Count what the ledger promised and Kafka does not have."""
        dropped_but_found = 0
        matched_drops = 0
        for msg_id, entry in self._ledger.items():
            stats = self._stream(entry.device_id, entry.class_name)
            stats.acknowledged += 1
            drop = self._drops_by_id.get(msg_id) or self._drops_by_seq.get(
                (entry.device_id, entry.class_name, entry.seq)
            )
            if drop is not None:
                matched_drops += 1
            if self._seen.get(msg_id):
                stats.found += 1
                if drop is not None:
                    dropped_but_found += 1
            elif drop is not None:
                stats.dropped += 1
                self._sample("dropped", f"{msg_id} ({drop.reason})")
            else:
                stats.missing += 1
                self._sample("missing", msg_id)
        total = StreamStats()
        for stats in self._streams.values():
            total.add(stats)
        drop_count = len(self._drops_by_id) + len(self._drops_by_seq) + self._unusable_drops
        return VerifyReport(
            total=total,
            streams=dict(self._streams),
            records=self._records,
            undecodable=self._undecodable,
            unmatched_drops=drop_count - matched_drops,
            dropped_but_found=dropped_but_found,
            key_mismatch=self._key_mismatch,
            ledger_duplicates=self._ledger_duplicates,
            samples=self._samples,
        )


def analyze(
    acks: Iterable[AckEntry],
    records: Iterable[RecordView],
    drops: Iterable[DropEntry] = (),
    *,
    topic_classes: Mapping[str, str] | None = None,
    sample_limit: int = 50,
) -> VerifyReport:
    """One-shot analysis of in-memory records (sorted into partition order first)."""
    oracle = Oracle(acks, drops, topic_classes=topic_classes, sample_limit=sample_limit)
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        oracle.add(record)
    return oracle.finish()


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    return data.decode("utf-8", errors="replace")
