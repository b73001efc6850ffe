"""Pure decisions about a batch: what to send, what can never be delivered, what to release.

A message that can never be delivered is dead-lettered and counts as *done* for ordering
(the rows behind it in its device's stream may go on). A message that failed for a reason
time can fix (broker down, leader moving, topic not created yet) is retried and blocks the
rows behind it in its own stream only.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from aiokafka import errors as kerr

from bridge.records import KafkaRecord, record_size
from edge.buffer import StoredMessage

__all__ = [
    "BatchPlan",
    "TopicWatch",
    "Verdict",
    "classify_error",
    "narrow_to_suspects",
    "plan_batch",
    "releasable",
]

_SIZE_ERRORS = (
    kerr.MessageSizeTooLargeError,
    kerr.RecordTooLargeError,
    kerr.RecordListTooLargeError,
)
_PERMANENT: dict[type[BaseException], str] = {
    kerr.InvalidTopicError: "Kafka rejected the topic name as invalid",
    kerr.TopicAuthorizationFailedError: "not authorized to write the topic",
    kerr.UnsupportedForMessageFormatError: "record format not supported by the topic",
    kerr.InvalidTimestampError: "Kafka rejected the record timestamp",
    kerr.CorruptRecordException: "Kafka rejected the record as corrupt",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a record whose send failed."""

    dead_reason: str | None = None
    """Set when the record can never be delivered: dead-letter it with this reason."""
    size_suspect: bool = False
    """Kafka rejected its batch as too large: send it alone to find out whether it is the
    culprit (a broker rejects the whole produce batch, not one record)."""


def classify_error(exc: BaseException) -> Verdict:
    """Sort an aiokafka error into retry / dead letter / size suspect."""
    if isinstance(exc, _SIZE_ERRORS):
        return Verdict(size_suspect=True)
    for kind, reason in _PERMANENT.items():
        if isinstance(exc, kind):
            return Verdict(dead_reason=f"{reason} ({type(exc).__name__})")
    return Verdict()


def narrow_to_suspects(
    batch: Sequence[StoredMessage], suspects: Collection[int]
) -> list[StoredMessage]:
    """Cut a batch so that a size suspect is sent alone.

    The prefix before the first suspect is safe to send as is; a suspect at the head goes
    alone. Cutting a batch at any point keeps per-stream order, since the rest is leased
    again later.
    """
    for index, message in enumerate(batch):
        if message.row_id in suspects:
            return [message] if index == 0 else list(batch[:index])
    return list(batch)


class TopicWatch:
    """Remembers since when each Kafka topic has been missing."""

    def __init__(self) -> None:
        self._missing_since: dict[str, float] = {}

    def seen(self, topic: str, exists: bool, now: float) -> float:
        """Record an observation; return how long the topic has been missing (0 if it exists)."""
        if exists:
            self._missing_since.pop(topic, None)
            return 0.0
        return now - self._missing_since.setdefault(topic, now)

    @property
    def missing(self) -> list[str]:
        return sorted(self._missing_since)


@dataclass(slots=True)
class BatchPlan:
    """A leased batch split by fate. Indices refer to the batch."""

    send: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    """Not sent this round (topic missing, not yet past its deadline); they block their
    own stream only."""


def plan_batch(
    records: Sequence[KafkaRecord],
    *,
    max_record_bytes: int,
    missing_for: dict[str, float],
    missing_deadline_s: float | None,
    unauthorized: Collection[str] = (),
) -> BatchPlan:
    """Decide each record's fate before anything is sent.

    ``missing_for`` maps topics that do not exist to how long they have been missing.
    """
    plan = BatchPlan()
    for index, record in enumerate(records):
        size = record_size(record)
        if size > max_record_bytes:
            plan.dead.append(
                (
                    index,
                    f"record of {size} bytes exceeds kafka.max_request_bytes ({max_record_bytes})",
                )
            )
        elif record.topic in unauthorized:
            plan.dead.append((index, f"not authorized to write topic {record.topic!r}"))
        elif record.topic in missing_for:
            waited = missing_for[record.topic]
            if missing_deadline_s is not None and waited >= missing_deadline_s:
                plan.dead.append(
                    (index, f"Kafka topic {record.topic!r} does not exist (for {waited:.0f} s)")
                )
            else:
                plan.held.append(index)
        else:
            plan.send.append(index)
    return plan


def releasable(
    batch: Sequence[StoredMessage],
    acked: Sequence[bool],
    topics: Sequence[str],
    dead: Collection[int] = (),
) -> list[StoredMessage]:
    """The rows of a batch that may be deleted after a partly failed send.

    A row is released only if it was acked and every earlier row of the same device and
    Kafka topic (one partition stream) was acked or dead-lettered: releasing a later row
    while an earlier one is resent would put the stream out of order. Dead-lettered rows
    (``dead``: row ids) are done for ordering purposes but are not released here (they
    move to the dead letters instead).
    """
    blocked: set[tuple[str, str]] = set()
    out: list[StoredMessage] = []
    for message, ok, topic in zip(batch, acked, topics, strict=True):
        if message.row_id in dead:
            continue
        stream = (message.device_id, topic)
        if ok and stream not in blocked:
            out.append(message)
        else:
            blocked.add(stream)
    return out
