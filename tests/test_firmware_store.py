"""The firmware store on a real SQLite buffer: the cache counts toward the buffer's byte
bound, eviction by the stated rule, orphans cleaned at open, state kept across reopen."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.buffer import Buffer
from edge.firmware_model import Manifest, make_manifest
from edge.firmware_store import FirmwareStore
from gateway.config import BufferConfig

KEY = Ed25519PrivateKey.generate()
MB = 1 << 20


def _stage(store: FirmwareStore, version: str, size: int, dtype: str = "t") -> Manifest:
    image = os.urandom(size)
    manifest = make_manifest(
        image, version=version, device_type=dtype, chunk_bytes=65536, key=KEY, created_ms=1
    )
    store.staging_path(manifest.release_id).write_bytes(image)
    return manifest


async def test_cache_is_charged_to_the_buffer_and_evicted_by_rule(tmp_path: Path) -> None:
    cache = tmp_path / "fw"
    async with Buffer(tmp_path / "b.sqlite3", BufferConfig(max_bytes=64 * MB)) as buffer:
        store = FirmwareStore(buffer, cache, cache_max_bytes=3 * MB)
        await store.open()
        first = _stage(store, "1", MB)
        assert await store.add_release(first, store.staging_path(first.release_id)) is None
        assert buffer.reserved_bytes == MB
        assert store.image_path(first.sha256).stat().st_size == MB
        for version in ("2", "3"):
            m = _stage(store, version, MB)
            assert await store.add_release(m, store.staging_path(m.release_id)) is None
        assert buffer.reserved_bytes == 3 * MB
        # Full: t@1 is neither one of the two newest of its type nor in a campaign.
        fourth = _stage(store, "4", MB)
        assert await store.add_release(fourth, store.staging_path(fourth.release_id)) is None
        assert await store.release("t@1") is None
        assert not store.image_path(first.sha256).exists()
        assert buffer.reserved_bytes == 3 * MB
        # A campaign protects its release: with t@2 running, the two newest (t@3, t@4) and
        # t@2 are all protected and a fifth release does not fit.
        assert await store.start_campaign("c", "t@2", ["d1"], [100.0], 0.1) is None
        fifth = _stage(store, "5", MB)
        reason = await store.add_release(fifth, store.staging_path(fifth.release_id))
        assert reason is not None
        assert "cache full" in reason
        assert not store.staging_path(fifth.release_id).exists()
        too_big = _stage(store, "6", 4 * MB)
        reason = await store.add_release(too_big, store.staging_path(too_big.release_id))
        assert reason is not None
        assert "larger than the cache" in reason
        (cache / "orphan.img").write_bytes(b"x")
    async with Buffer(tmp_path / "b.sqlite3", BufferConfig(max_bytes=64 * MB)) as buffer:
        store = FirmwareStore(buffer, cache, cache_max_bytes=3 * MB)
        await store.open()
        assert buffer.reserved_bytes == 3 * MB  # charged again after a restart
        assert not (cache / "orphan.img").exists()
        assert [c.campaign_id for c in await store.campaigns()] == ["c"]
        assert await store.release("t@4") is not None


async def test_offered_devices_that_do_not_finish_time_out_as_failed(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite3", BufferConfig(max_bytes=64 * MB)) as buffer:
        store = FirmwareStore(buffer, tmp_path / "fw", cache_max_bytes=3 * MB)
        await store.open()
        manifest = _stage(store, "1", 1000)
        assert await store.add_release(manifest, store.staging_path(manifest.release_id)) is None
        assert await store.start_campaign("c", "t@1", ["d1", "d2"], [100.0], 0.1) is None
        await store.offered("c", "d1")
        assert await store.time_out(60_000) == 0
        assert await store.time_out(-1) == 1  # only the offered one; d2 was never offered
        counts = await store.ring_counts("c", 0)
        assert (counts.failed, counts.open) == (1, 1)
        await store.unoffered("c", "d2")  # no effect on a target that is not 'offered'
        assert (await store.summary("c") or {})["devices"] == {"failed": 1, "waiting": 1}
