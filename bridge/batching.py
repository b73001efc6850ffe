"""Group a batch of records into Kafka record batches, one run per topic-partition.

``AIOKafkaProducer.send`` costs a coroutine, a future, a metadata check and a pure-Python
murmur2 hash per record; for a forwarder that already holds a whole batch in order that was
the largest single cost of a backlog drain. The forwarder instead picks each record's
partition here (the same murmur2 choice as aiokafka's default partitioner, so a device's
records land where they always did, also across an upgrade), and the producer fills one
``BatchBuilder`` per partition run and sends it with ``send_batch``.

Order: records of one key always map to one partition and keep their relative order in
its run, so per-device order is what it was with ``send``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from aiokafka.partitioner import murmur2

from bridge.records import KafkaRecord

__all__ = ["PartitionChooser", "PartitionRun", "plan_partition_runs"]

_CACHE_LIMIT = 100_000
"""Keys remembered per topic (a device id is a few dozen bytes: a few MB at most)."""


@dataclass(frozen=True, slots=True)
class PartitionRun:
    """The records (indices into the batch, in batch order) bound for one topic-partition."""

    topic: str
    partition: int
    indices: list[int]


class PartitionChooser:
    """aiokafka's default partitioner for keyed records, with the hash cached per key.

    The cache is per topic and dropped when the topic's partition count changes (a topic
    grown by an operator re-maps keys exactly as the Java and aiokafka clients would).
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, dict[bytes, int]]] = {}

    def choose(self, topic: str, key: bytes, partitions: Collection[int]) -> int:
        """The partition of ``key`` among ``partitions`` (all of the topic's, not only those
        with a leader: aiokafka hashes over all of them too)."""
        count = len(partitions)
        cached = self._cache.get(topic)
        if cached is None or cached[0] != count or len(cached[1]) >= _CACHE_LIMIT:
            cached = (count, {})
            self._cache[topic] = cached
        by_key = cached[1]
        partition = by_key.get(key)
        if partition is None:
            ordered = sorted(partitions)
            partition = ordered[(murmur2(key) & 0x7FFFFFFF) % count]
            by_key[key] = partition
        return partition


def plan_partition_runs(
    records: Sequence[KafkaRecord],
    partitions_of: dict[str, Collection[int]],
    chooser: PartitionChooser,
) -> list[PartitionRun]:
    """One run per topic-partition, in order of each run's first record.

    ``partitions_of`` maps every topic of ``records`` to its partitions (from metadata).
    """
    runs: dict[tuple[str, int], PartitionRun] = {}
    for index, record in enumerate(records):
        topic = record.topic
        partition = chooser.choose(topic, record.key, partitions_of[topic])
        run = runs.get((topic, partition))
        if run is None:
            run = runs[(topic, partition)] = PartitionRun(topic, partition, [])
        run.indices.append(index)
    return list(runs.values())
