"""The Kafka record for a buffered message. Pure code; the format is documented in
docs/kafka-records.md, which a cloud team reads instead of this file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edge.buffer import StoredMessage
from edge.routing import UNROUTED_CLASS

__all__ = ["HEADER_PREFIX", "KafkaRecord", "RecordBuilder", "message_id"]

HEADER_PREFIX = "tg-"


def message_id(gateway_id: str, row_id: int) -> str:
    """The stable, never-reused id of a stored message."""
    return f"{gateway_id}:{row_id}"


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """What the producer sends for one stored message."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


class RecordBuilder:
    """Maps stored messages to Kafka records using the configured class → topic routes.

    Routing happens at forward time, not at ingest, so a backlog follows a config change.
    A row whose class is no longer configured goes to the dead-letter topic with a reason.
    """

    def __init__(
        self,
        *,
        gateway_id: str,
        class_topics: Mapping[str, str],
        content_types: Mapping[str, str],
        dead_letter_topic: str,
    ) -> None:
        self._gateway_id = gateway_id
        self._gateway_header = gateway_id.encode()
        self._class_topics = dict(class_topics)
        self._content_types = dict(content_types)
        self._dead_letter_topic = dead_letter_topic

    @property
    def topics(self) -> set[str]:
        """Every topic this builder can produce to."""
        return {*self._class_topics.values(), self._dead_letter_topic}

    def build(self, message: StoredMessage) -> KafkaRecord:
        """The record for ``message``."""
        topic = self._class_topics.get(message.class_name)
        headers = [
            ("tg-message-id", message_id(self._gateway_id, message.row_id).encode()),
            ("tg-device-id", message.device_id.encode()),
            ("tg-gateway-id", self._gateway_header),
            ("tg-mqtt-topic", message.topic.encode()),
            ("tg-class", message.class_name.encode()),
            (
                "tg-content-type",
                self._content_types.get(message.class_name, "application/octet-stream").encode(),
            ),
            ("tg-ingest-ts", str(message.ingest_ms).encode()),
            ("tg-qos", str(message.qos).encode()),
        ]
        if topic is None:
            reason = (
                "topic matched no configured class"
                if message.class_name == UNROUTED_CLASS
                else f"class {message.class_name!r} is not configured"
            )
            headers.append(("tg-dead-letter-reason", reason.encode()))
            topic = self._dead_letter_topic
        return KafkaRecord(
            topic=topic, key=message.device_id.encode(), value=message.payload, headers=headers
        )
