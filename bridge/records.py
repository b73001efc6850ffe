"""The Kafka record for a buffered message. Pure code; the format is documented in
docs/kafka-records.md, which a cloud team reads instead of this file."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from aiokafka.record.default_records import DefaultRecordBatchBuilder

from edge.buffer import StoredMessage
from edge.lifecycle import HEARTBEAT_CLASS
from edge.routing import UNROUTED_CLASS
from edge.tenants import TENANT_HEADER, UNASSIGNED, TenantMap, render

__all__ = [
    "HEADER_PREFIX",
    "DeadLetterLike",
    "KafkaRecord",
    "RecordBuilder",
    "RecordRow",
    "message_id",
    "record_row",
    "record_size",
]

HEADER_PREFIX = "tg-"

_SIZE_MARGIN = 512
"""Bytes kept free below the request limit for the batch header when a dead letter's
payload is truncated to fit."""


class DeadLetterLike(Protocol):
    """What the dead-letter record needs from a dead-letter row."""

    @property
    def row_id(self) -> int: ...
    @property
    def device_id(self) -> str: ...
    @property
    def class_name(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def qos(self) -> int: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def ingest_ms(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def dead_ms(self) -> int: ...


def message_id(gateway_id: str, row_id: int) -> str:
    """The stable, never-reused id of a stored message."""
    return f"{gateway_id}:{row_id}"


# Not frozen: a frozen dataclass's __init__ costs ~4x more (object.__setattr__ per
# field), and this one is built for every message on the hot path. Treat it as immutable.
@dataclass(slots=True, unsafe_hash=True)
class KafkaRecord:
    """What the producer sends for one stored message."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


_Header = tuple[str, bytes]
RecordRow = tuple[int, str, str, str, int, bytes, int]
"""What a record is built from, in the buffer's column order: id, device_id, class, topic,
qos, payload, ingest_ms (:data:`bridge.send_worker_child` reads these columns)."""


def record_row(message: StoredMessage) -> RecordRow:
    """The columns of ``message`` a record is built from."""
    return (
        message.row_id,
        message.device_id,
        message.class_name,
        message.topic,
        message.qos,
        message.payload,
        message.ingest_ms,
    )


_QOS_HEADERS: dict[int, _Header] = {qos: ("tg-qos", b"%d" % qos) for qos in (0, 1, 2)}
_CACHE_LIMIT = 100_000
"""Devices (and MQTT topics) whose encoded header parts are kept: a few MB at most."""
_ClassRoute = tuple[str, _Header, _Header, _Header | None]
"""Topic, ``tg-class``, ``tg-content-type`` and (dead-letter class only) the reason header."""


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
        tenants: TenantMap | None = None,
    ) -> None:
        self._tenants = tenants
        self._gateway_id = gateway_id
        self._gateway_header: _Header = ("tg-gateway-id", gateway_id.encode())
        self._message_id_prefix = f"{gateway_id}:".encode()
        self._devices: dict[str, tuple[bytes, _Header]] = {}
        self._mqtt_topics: dict[str, _Header] = {}
        self._class_topics = dict(class_topics)
        self._content_types = dict(content_types)
        self._dead_letter_topic = dead_letter_topic
        self._routes: dict[str, _ClassRoute] = {}

    def update_topics(self, class_topics: Mapping[str, str]) -> None:
        """New topics for these classes (a reload), used from the next record built."""
        self._class_topics.update(class_topics)
        for name in class_topics:
            self._routes.pop(name, None)

    @property
    def topics(self) -> set[str]:
        """Every topic this builder can produce to (each tenant's, with tenants)."""
        templates = {*self._class_topics.values(), self._dead_letter_topic}
        if self._tenants is None:
            return templates
        return {render(t, tenant) for t in templates for tenant in self._tenants.names}

    def _tenant(self, device_id: str, headers: list[tuple[str, bytes]]) -> tuple[bool, str | None]:
        """``(tenants on, tenant)``; adds the ``tg-tenant`` header. Decided from the device id
        at forward time, like the class route (docs/security.md)."""
        if self._tenants is None:
            return False, None
        tenant = self._tenants.tenant_of(device_id)
        headers.append((TENANT_HEADER, (tenant or UNASSIGNED).encode()))
        return True, tenant

    def build(self, message: StoredMessage) -> KafkaRecord:
        """The record for ``message``."""
        return self.build_rows([record_row(message)])[0]

    def build_all(self, messages: Iterable[StoredMessage]) -> list[KafkaRecord]:
        """The records for ``messages``, in order."""
        return self.build_rows(map(record_row, messages))

    def build_rows(self, rows: Iterable[RecordRow]) -> list[KafkaRecord]:
        """The records for rows as read from the buffer (:data:`RecordRow`), in order.

        One loop for a whole batch, with what it uses held in locals: a backlog drain
        builds tens of thousands of records a second in the send worker's child, which
        reads these columns straight from the buffer file (no object per row)."""
        routes = self._routes
        devices = self._devices
        mqtt_topics = self._mqtt_topics
        gateway_header = self._gateway_header
        id_prefix = self._message_id_prefix
        tenants_off = self._tenants is None
        records: list[KafkaRecord] = []
        append = records.append
        for row_id, device_id, class_name, mqtt_topic, qos, payload, ingest_ms in rows:
            route = routes.get(class_name) or self._route(class_name)
            topic, class_header, type_header, reason_header = route
            key, device_header = devices.get(device_id) or self._device_parts(device_id)
            message_id = ("tg-message-id", id_prefix + b"%d" % row_id)
            ingest = ("tg-ingest-ts", b"%d" % ingest_ms)
            if mqtt_topic:
                headers = [
                    message_id,
                    device_header,
                    gateway_header,
                    mqtt_topics.get(mqtt_topic) or self._mqtt_topic(mqtt_topic),
                    class_header,
                    type_header,
                    ingest,
                    _QOS_HEADERS.get(qos) or ("tg-qos", b"%d" % qos),
                ]
            else:
                # Written by the gateway itself (lifecycle events, heartbeats): no MQTT publish.
                headers = [
                    message_id,
                    device_header,
                    gateway_header,
                    class_header,
                    type_header,
                    ingest,
                ]
            if reason_header is not None:
                headers.append(reason_header)
            if not tenants_off and class_name != HEARTBEAT_CLASS:  # heartbeats: no tenant
                topic = self._tenant_topic(device_id, topic, reason_header, headers)
            append(KafkaRecord(topic, key, payload, headers))
        return records

    def _tenant_topic(
        self,
        device_id: str,
        topic: str,
        reason_header: _Header | None,
        headers: list[tuple[str, bytes]],
    ) -> str:
        """The tenant's topic for a device's record (adds the tenant header; a device of no
        tenant is dead-lettered unless it already is)."""
        _, tenant = self._tenant(device_id, headers)
        if tenant is None and reason_header is None:
            headers.append(("tg-dead-letter-reason", b"device belongs to no tenant"))
            topic = self._dead_letter_topic
        return render(topic, tenant)

    # A backlog drain builds tens of thousands of records a second: the parts that repeat
    # per device and per MQTT topic are encoded once and shared (fewer objects to allocate
    # and free per record). Bounded: cleared when a fleet's worth of entries is reached.

    def _device_parts(self, device_id: str) -> tuple[bytes, _Header]:
        if len(self._devices) >= _CACHE_LIMIT:
            self._devices.clear()
        key = device_id.encode()
        parts = self._devices[device_id] = (key, ("tg-device-id", key))
        return parts

    def _mqtt_topic(self, mqtt_topic: str) -> _Header:
        if len(self._mqtt_topics) >= _CACHE_LIMIT:
            self._mqtt_topics.clear()
        header = self._mqtt_topics[mqtt_topic] = ("tg-mqtt-topic", mqtt_topic.encode())
        return header

    def _route(self, class_name: str) -> _ClassRoute:
        route = self._routes[class_name] = self._route_for(class_name)
        return route

    def _route_for(self, class_name: str) -> _ClassRoute:
        """Topic and the per-class headers, computed once per class (not per record)."""
        topic = self._class_topics.get(class_name)
        content_type = self._content_types.get(class_name, "application/octet-stream")
        reason_header = None
        if topic is None:
            reason = (
                "topic matched no configured class"
                if class_name == UNROUTED_CLASS
                else f"class {class_name!r} is not configured"
            )
            reason_header = ("tg-dead-letter-reason", reason.encode())
            topic = self._dead_letter_topic
        return (
            topic,
            ("tg-class", class_name.encode()),
            ("tg-content-type", content_type.encode()),
            reason_header,
        )

    def build_dead_letter(self, dead: DeadLetterLike, max_record_bytes: int) -> KafkaRecord:
        """The dead-letter topic's record for a dead-letter row.

        Same key and headers as the record the message would have had, plus
        ``tg-dead-letter-reason`` and ``tg-dead-letter-ts``. A payload too large for Kafka is
        truncated to fit and ``tg-dead-letter-truncated`` carries its original length (the
        full payload stays in the buffer only with ``buffer.keep_forwarded_dead_letters``).
        """
        headers = [
            ("tg-message-id", message_id(self._gateway_id, dead.row_id).encode()),
            ("tg-device-id", dead.device_id.encode()),
            self._gateway_header,
            ("tg-mqtt-topic", dead.topic.encode()),
            ("tg-class", dead.class_name.encode()),
            (
                "tg-content-type",
                self._content_types.get(dead.class_name, "application/octet-stream").encode(),
            ),
            ("tg-ingest-ts", str(dead.ingest_ms).encode()),
            ("tg-qos", str(dead.qos).encode()),
            ("tg-dead-letter-reason", dead.reason.encode()),
            ("tg-dead-letter-ts", str(dead.dead_ms).encode()),
        ]
        tenants_on, tenant = self._tenant(dead.device_id, headers)
        topic = render(self._dead_letter_topic, tenant) if tenants_on else self._dead_letter_topic
        key = dead.device_id.encode()
        value = dead.payload
        record = KafkaRecord(topic, key, value, headers)
        if record_size(record) > max_record_bytes:
            headers.append(("tg-dead-letter-truncated", str(len(value)).encode()))
            overhead = record_size(KafkaRecord(topic, key, b"", headers))
            value = value[: max(0, max_record_bytes - overhead - _SIZE_MARGIN)]
            record = KafkaRecord(topic, key, value, headers)
        return record


def record_size(record: KafkaRecord) -> int:
    """Bytes the record takes in a produce request, as aiokafka estimates it before sending
    (it refuses records above ``max_request_size``)."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        record.key, record.value, record.headers
    )
    return size
