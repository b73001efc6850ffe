"""The exactly-once progress record. Pure code.

In exactly-once mode every batch is sent in one Kafka transaction together with one record
on the compacted progress topic: key = gateway id, value = the batch's row ids (as compact
ranges) and a batch sequence. The forwarder has one batch in flight and deletes rows only
after the commit, so the last committed progress record names exactly the rows that may
still be in the buffer although Kafka has them: after a crash those are released, not resent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PROGRESS_VERSION", "Progress", "from_ranges", "to_ranges"]

PROGRESS_VERSION = 1


def to_ranges(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive ranges: ``[5, 1, 2, 3, 9] -> [(1, 3), (5, 5), (9, 9)]``."""
    out: list[tuple[int, int]] = []
    for value in sorted(set(ids)):
        if out and value == out[-1][1] + 1:
            out[-1] = (out[-1][0], value)
        else:
            out.append((value, value))
    return out


def from_ranges(ranges: Iterable[tuple[int, int]]) -> list[int]:
    """The ids of inclusive ranges, in order."""
    return [i for low, high in ranges for i in range(low, high + 1)]


@dataclass(frozen=True, slots=True)
class Progress:
    """One committed batch of one gateway."""

    gateway_id: str
    batch_seq: int
    ranges: tuple[tuple[int, int], ...]
    """Uplink row ids the transaction delivered to their topics."""
    committed_ms: int
    dead_ranges: tuple[tuple[int, int], ...] = ()
    """Dead-letter ids the transaction delivered to the dead-letter topic."""

    @property
    def row_ids(self) -> list[int]:
        return from_ranges(self.ranges)

    @property
    def dead_letter_ids(self) -> list[int]:
        return from_ranges(self.dead_ranges)

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": PROGRESS_VERSION,
                "gateway": self.gateway_id,
                "seq": self.batch_seq,
                "ranges": [list(r) for r in self.ranges],
                "dead": [list(r) for r in self.dead_ranges],
                "ts": self.committed_ms,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> Progress | None:
        """The progress in a record value; None for anything else (never raises)."""
        if not value:
            return None
        try:
            data = json.loads(value)
            if data.get("v") != PROGRESS_VERSION:
                return None
            ranges = tuple((int(low), int(high)) for low, high in data["ranges"])
            dead = tuple((int(low), int(high)) for low, high in data.get("dead", ()))
            if any(low > high for low, high in ranges + dead):
                return None
            return cls(str(data["gateway"]), int(data["seq"]), ranges, int(data["ts"]), dead)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
