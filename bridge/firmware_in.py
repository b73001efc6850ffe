"""Firmware from Kafka: releases (fleet-wide topic) and campaign operations (this gateway's
control topic), one consumer, one group per gateway.

A release is a manifest record followed by its chunk records (same key, same partition, in
order). The manifest's signature is verified when it arrives (a release not signed by a
trusted key is refused before a byte of it is written); chunks are written into a staging
file; when the last one is in, size and SHA-256 are checked and the image moves into the
cache (:meth:`edge.firmware_store.FirmwareStore.add_release`). A refused release is
reported on the status topic and logged, and its remaining chunks are skipped.

Offsets: a partition's offset is committed only up to the manifest of a release still being
assembled, so a crash re-reads that release from its manifest, never from the middle.
A cached release is recognised and its chunks skipped: each release is fetched once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError as AioKafkaError
from aiokafka.structs import OffsetAndMetadata
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bridge.kafka_security import client_security
from edge.firmware_model import (
    HEADER_INDEX,
    HEADER_KIND,
    HEADER_RELEASE,
    FirmwareFormatError,
    Manifest,
    parse_manifest_record,
    verify_manifest,
)
from edge.firmware_store import FirmwareStore
from edge.firmware_wire import ControlOp, parse_control
from gateway.config import FirmwareConfig, KafkaConfig
from gateway.errors import KafkaError

__all__ = ["FirmwareConsumer"]

log = logging.getLogger(__name__)


@dataclass
class _Staging:
    manifest: Manifest
    path: Path
    partition: TopicPartition
    manifest_offset: int
    received: set[int] = field(default_factory=set)


class FirmwareConsumer:
    """``run()`` until cancelled."""

    def __init__(
        self,
        kafka: KafkaConfig,
        config: FirmwareConfig,
        *,
        gateway_id: str,
        store: FirmwareStore,
        trusted: Sequence[Ed25519PublicKey],
        on_control: Callable[[ControlOp], Awaitable[str | None]],
        on_rejected: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self._kafka = kafka
        self._config = config
        self._releases_topic = config.releases_topic
        self._control_topic = config.control_topic.replace("{gateway_id}", gateway_id)
        self._group = config.group_id.replace("{gateway_id}", gateway_id)
        self._store = store
        self._trusted = list(trusted)
        self._on_control = on_control
        self._on_rejected = on_rejected
        self._staging: dict[str, _Staging] = {}
        self._skip: set[str] = set()
        """Releases whose chunks are ignored (cached already, or refused)."""
        self.releases_cached = 0
        self.releases_refused = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        failures = 0
        while True:
            consumer = self._build()
            try:
                await self._consume(consumer)
            except Exception as exc:
                failures += 1
                self.last_error = repr(exc)
                if not isinstance(exc, AioKafkaError | OSError | TimeoutError | KafkaError):
                    log.exception("firmware intake failed")
                delay = min(self._kafka.retry_backoff_max_s, 0.2 * 2**failures)
                log.warning("firmware consumer failed (%r); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            finally:
                self._drop_staging()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await consumer.stop()

    def _build(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            self._releases_topic,
            self._control_topic,
            bootstrap_servers=self._kafka.bootstrap_servers,
            client_id=f"{self._kafka.client_id}-firmware",
            group_id=self._group,
            **client_security(self._kafka).kwargs(),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max(1 << 20, self._kafka.max_request_bytes),
            request_timeout_ms=int(self._kafka.request_timeout_s * 1000) + 30_000,
        )

    def _drop_staging(self) -> None:
        for staging in self._staging.values():
            staging.path.unlink(missing_ok=True)
        self._staging.clear()
        self._skip.clear()

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        async with asyncio.timeout(self._kafka.request_timeout_s + 5):
            await consumer.start()
        log.info("consuming firmware from %s and %s", self._releases_topic, self._control_topic)
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=64)
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp, records in batch.items():
                for record in records:
                    if tp.topic == self._control_topic:
                        await self._control(record)
                    else:
                        await self._release_record(record)
                # Never past the manifest of a release still being assembled here.
                hold = [s.manifest_offset for s in self._staging.values() if s.partition == tp]
                offsets[tp] = OffsetAndMetadata(min([records[-1].offset + 1, *hold]), "")
            if offsets:
                async with asyncio.timeout(self._kafka.request_timeout_s + 5):
                    await consumer.commit(offsets)
                self.last_error = None

    async def _control(self, record: ConsumerRecord[bytes, bytes]) -> None:
        op = parse_control(record.value)
        if isinstance(op, str):
            log.warning("firmware control record at offset %d rejected: %s", record.offset, op)
            await self._on_rejected("", op)
            return
        reason = await self._on_control(op)
        if reason is not None:
            log.warning("campaign %s: %s rejected: %s", op.campaign_id, op.op, reason)
            await self._on_rejected(op.campaign_id, f"{op.op}: {reason}")

    async def _release_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        headers = {k: v for k, v in record.headers}
        kind = headers.get(HEADER_KIND, b"").decode(errors="replace")
        release_id = headers.get(HEADER_RELEASE, b"").decode(errors="replace")
        if kind == "manifest":
            await self._manifest(record, release_id)
        elif kind == "chunk":
            await self._chunk(record, release_id, headers.get(HEADER_INDEX, b""))
        else:
            log.warning(
                "record at offset %d on %s is not firmware; skipped",
                record.offset,
                self._releases_topic,
            )

    async def _manifest(self, record: ConsumerRecord[bytes, bytes], release_id: str) -> None:
        old = self._staging.pop(release_id, None)
        if old is not None:  # published again before the first copy completed
            old.path.unlink(missing_ok=True)
        self._skip.discard(release_id)
        try:
            manifest = self._checked_manifest(record.value, release_id)
        except FirmwareFormatError as exc:
            await self._refuse(None, release_id or "?", exc.reason)
            if release_id:
                self._skip.add(release_id)
            return
        if await self._store.release(release_id) is not None:
            log.info("firmware %s already cached; its chunks are skipped", release_id)
            self._skip.add(release_id)
            return
        path = self._store.staging_path(release_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.truncate(manifest.size)
        self._staging[release_id] = _Staging(
            manifest, path, TopicPartition(record.topic, record.partition), record.offset
        )

    def _checked_manifest(self, value: bytes | None, release_id: str) -> Manifest:
        manifest = parse_manifest_record(value)
        if manifest.release_id != release_id:
            raise FirmwareFormatError("manifest release_id differs from its header")
        verify_manifest(manifest, self._trusted)
        if manifest.size > self._config.max_image_bytes:
            raise FirmwareFormatError(
                f"image of {manifest.size} bytes exceeds firmware.max_image_bytes"
            )
        return manifest

    async def _chunk(
        self, record: ConsumerRecord[bytes, bytes], release_id: str, index_header: bytes
    ) -> None:
        if release_id in self._skip:
            return
        staging = self._staging.get(release_id)
        if staging is None:
            log.warning("chunk of %s without its manifest; skipped", release_id)
            return
        manifest = staging.manifest
        try:
            index = int(index_header)
        except ValueError:
            index = -1
        data = record.value or b""
        expected = min(manifest.chunk_bytes, manifest.size - index * manifest.chunk_bytes)
        if not 0 <= index < manifest.chunk_count or len(data) != expected:
            await self._fail(staging, f"chunk {index_header!r} out of range or wrong length")
            return
        await asyncio.to_thread(_pwrite, staging.path, index * manifest.chunk_bytes, data)
        staging.received.add(index)
        if len(staging.received) < manifest.chunk_count:
            return
        del self._staging[release_id]
        self._skip.add(release_id)
        digest = await asyncio.to_thread(_sha256_fsync, staging.path)
        if digest != manifest.sha256:
            staging.path.unlink(missing_ok=True)
            await self._refuse(manifest, release_id, "sha256 mismatch: image tampered or corrupt")
            return
        reason = await self._store.add_release(manifest, staging.path)
        if reason is not None:
            await self._refuse(manifest, release_id, reason)
            return
        self.releases_cached += 1

    async def _fail(self, staging: _Staging, reason: str) -> None:
        self._staging.pop(staging.manifest.release_id, None)
        self._skip.add(staging.manifest.release_id)
        staging.path.unlink(missing_ok=True)
        await self._refuse(staging.manifest, staging.manifest.release_id, reason)

    async def _refuse(self, manifest: Manifest | None, release_id: str, reason: str) -> None:
        self.releases_refused += 1
        await self._store.refused(manifest, release_id, reason)


def _pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _sha256_fsync(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
