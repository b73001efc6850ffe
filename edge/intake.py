"""The gateway's :class:`~edge.ingest.IngestSink`: route each publish, then buffer it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Mapping

import cbor2

from edge.buffer import Buffer
from edge.ingest import InboundPublish
from edge.routing import UNROUTED_CLASS, TopicRouter
from gateway.config import ClassConfig

__all__ = ["Intake"]

log = logging.getLogger(__name__)

Envelope = tuple[str, int | None, int | None]
"""``(msg_id, ttl_ms, seq)`` of a tidegate CBOR envelope."""

_META_SUFFIX = "/meta"
_MAX_TTL_S = 100 * 365 * 86_400.0
"""Longest envelope ``ttl_s`` honoured (longer ones are capped: effectively no expiry)."""


class Intake:
    """Routes publishes to classes and hands them to the buffer, in arrival order.

    A publish on ``d/{device_id}/meta`` (the uplink prefix plus ``{device_id}/meta``) carries
    what the device says about itself (``type``, ``firmware_version``; a CBOR or JSON map).
    It updates the device registry and is acknowledged once that is committed. One that
    cannot be parsed goes to the dead-letter class, so nothing acknowledged vanishes unseen.
    """

    def __init__(
        self, buffer: Buffer, router: TopicRouter, classes: Mapping[str, ClassConfig]
    ) -> None:
        self._buffer = buffer
        self._router = router
        self._priority = {name: c.priority for name, c in classes.items()}
        self._lossy = {name for name, c in classes.items() if c.lossy}
        self._ttl_ms = {
            name: int(c.ttl_s * 1000) for name, c in classes.items() if c.ttl_s is not None
        }
        self._meta_prefix = router.device_topic_prefix()
        self._result_topic: str | None = None
        self._results: Callable[[str, bytes], asyncio.Future[None]] | None = None
        self._firmware_topic: str | None = None
        self._firmware: Callable[[str, str, bytes], asyncio.Future[None]] | None = None
        self.unrouted = 0

    def route_command_results(
        self, topic_pattern: str, handler: Callable[[str, bytes], asyncio.Future[None]]
    ) -> None:
        """Publishes on ``topic_pattern`` (``{device_id}`` is the publisher's id) go to
        ``handler(device_id, payload)`` (the command store) instead of the uplink; the
        PUBACK waits for its future like for any other publish."""
        self._result_topic, self._results = topic_pattern, handler

    def route_firmware(
        self, topic_pattern: str, handler: Callable[[str, str, bytes], asyncio.Future[None]]
    ) -> None:
        """Publishes under ``topic_pattern + "/"`` go to ``handler(device_id, topic,
        payload)`` (firmware requests and status, docs/firmware.md) instead of the uplink."""
        self._firmware_topic, self._firmware = topic_pattern + "/", handler

    def submit(self, publish: InboundPublish) -> asyncio.Future[None]:
        """Route and enqueue; see :class:`edge.ingest.IngestSink`."""
        ingest_ms = int(publish.received_at * 1000)
        if (
            self._firmware is not None
            and self._firmware_topic is not None
            and publish.topic.startswith(
                self._firmware_topic.replace("{device_id}", publish.device_id)
            )
        ):
            return self._firmware(publish.device_id, publish.topic, publish.payload)
        if (
            self._results is not None
            and self._result_topic is not None
            and publish.topic == self._result_topic.replace("{device_id}", publish.device_id)
        ):
            return self._results(publish.device_id, publish.payload)
        if publish.topic == f"{self._meta_prefix}{publish.device_id}{_META_SUFFIX}":
            info = _parse_device_info(publish.payload)
            if info is not None:
                self._buffer.device_info(
                    publish.device_id, device_type=info[0], firmware_version=info[1]
                )
                return self._buffer.enqueue_marker()
        route = self._router.route(publish.device_id, publish.topic)
        if route.class_name == UNROUTED_CLASS:
            self.unrouted += 1
            log.warning(
                "unrouted publish from %s on %r kept for the dead-letter topic: %s",
                publish.device_id,
                publish.topic,
                route.reason,
                extra={"device_id": publish.device_id},
            )
        envelope = _envelope_fields(publish.payload)
        msg_id = envelope[0] if envelope else None
        expires_ms = None
        if route.class_name in self._lossy:
            ttl_ms = self._ttl_ms.get(route.class_name)
            if envelope is not None and envelope[1] is not None:
                ttl_ms = envelope[1]
            expires_ms = None if ttl_ms is None else ingest_ms + ttl_ms
        keys = self._dedup_keys(publish, route.class_name, envelope)
        return self._buffer.enqueue(
            device_id=publish.device_id,
            class_name=route.class_name,
            topic=publish.topic,
            qos=publish.qos,
            payload=publish.payload,
            ingest_ms=ingest_ms,
            priority=self._priority.get(route.class_name, 0),
            expires_ms=expires_ms,
            msg_id=msg_id,
            dedup_keys=keys,
            # A DUP may repeat a message stored before a crash; an envelope msg_id is
            # checked always (a device may resend on a new session without DUP).
            check_dedup=publish.dup or msg_id is not None,
        )

    @staticmethod
    def _dedup_keys(
        publish: InboundPublish, class_name: str, envelope: Envelope | None
    ) -> tuple[tuple[str, str], ...]:
        """The ``(slot, fingerprint)`` pairs the buffer remembers for this publish
        (docs/buffer.md, "Retransmissions").

        An envelope with a ``seq`` gets one key, its ``seq`` modulo 64 → ``msg_id``: it
        catches a DUP resend as surely as the packet id would (both rings hold the last 64),
        and a resend on a new session too. Each remembered key is a random page of the
        dedup table rewritten in the commit; dropping the second one took ~30 % off the
        commit's work per message (docs/benchmarks.md, session 11). Opaque
        payloads keep the packet-id key; an envelope without ``seq`` keeps both, because its
        hashed slot collides between messages in flight.
        """
        if envelope is not None and envelope[2] is not None:
            return ((f"m{class_name}:{envelope[2] % 64}", envelope[0]),)
        keys: list[tuple[str, str]] = []
        if envelope is not None:
            slot = f"h{zlib.crc32(envelope[0].encode()) % 32}"
            keys.append((f"m{class_name}:{slot}", envelope[0]))
        if publish.qos > 0 and publish.packet_id is not None:
            digest = hashlib.blake2b(
                publish.topic.encode() + b"\0" + publish.payload, digest_size=8
            ).hexdigest()
            keys.append((f"p{publish.packet_id % 64}", f"{publish.packet_id}:{digest}"))
        return tuple(keys)


def _envelope_fields(payload: bytes) -> Envelope | None:
    """``(msg_id, ttl_ms, seq)`` of a tidegate CBOR envelope, or None for other payloads."""
    if not payload or not 0xA0 <= payload[0] <= 0xBF:  # a CBOR map, cheap pre-check
        return None
    try:
        data = cbor2.loads(payload)
    except Exception:  # cbor2 raises several types on arbitrary bytes
        return None
    if not isinstance(data, dict):
        return None
    msg_id = data.get("msg_id")
    if not isinstance(msg_id, str) or not msg_id or len(msg_id) > 256:
        return None
    ttl = data.get("ttl_s")
    ttl_ms = None
    # Any number a device sends must give a storable expiry: +inf or 1e300 raised
    # OverflowError and a huge int overflowed SQLite's INTEGER, so the publish could never
    # be stored or acknowledged and the device resent it forever (found by tests/test_fuzz.py).
    if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
        ttl_ms = max(1, int(min(ttl, _MAX_TTL_S) * 1000))
    seq = data.get("seq")
    return msg_id, ttl_ms, seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _parse_device_info(payload: bytes) -> tuple[str | None, str | None] | None:
    data: object
    try:
        data = cbor2.loads(payload)
    except Exception:  # cbor2 raises several types on arbitrary bytes; try JSON next
        try:
            data = json.loads(payload)
        except ValueError:
            return None
    if not isinstance(data, dict):
        return None
    device_type = data.get("type")
    firmware = data.get("firmware_version")
    if not isinstance(device_type, str | None) or not isinstance(firmware, str | None):
        return None
    if device_type is None and firmware is None:
        return None
    return device_type, firmware
