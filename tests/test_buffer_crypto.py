"""At-rest encryption of buffered payloads: real SQLite files read back byte by byte, the
keyring across rotations, refusals that delete nothing, and a real gateway process whose
buffered messages reach real Kafka byte-identical after a key rotation."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge.buffer import Buffer
from edge.buffer_crypto import OVERHEAD, BufferKeyError, Keyring, key_id_of, load_keyring
from gateway.config import BufferConfig, BufferEncryptionConfig, ClassConfig
from gateway.dev.kafka import KafkaState
from tests.harness import kafka_tls as _tls
from tests.harness import (
    publish_qos1,
    read_topics,
    running_gateway,
    write_gateway_config,
)

CLASSES = {"event": ClassConfig(kafka_topic="e", priority=8)}
SECRET = b"PLAINTEXT-CANARY-7f3a"


def _key(directory: Path, key_id: str, byte: int) -> dict[str, Any]:
    path = directory / f"{key_id}.key"
    path.write_text(bytes([byte]).hex() * 32)
    return {"key_id": key_id, "key_file": str(path)}


def _buffer(
    path: Path, current: dict[str, Any] | None, *old: dict[str, Any], **more: Any
) -> Buffer:
    encryption = None
    if current is not None:
        encryption = BufferEncryptionConfig(**current, old_keys=list(old), **more)
    return Buffer(path, BufferConfig(encryption=encryption), CLASSES)


async def _fill(buffer: Buffer, device: str, n: int, tag: bytes = b"") -> None:
    futures = [
        buffer.enqueue(
            device_id=device,
            class_name="event",
            topic=f"d/{device}/up/event",
            qos=1,
            payload=SECRET + tag + str(i).encode(),
            ingest_ms=1_000 + i,
            priority=8,
        )
        for i in range(n)
    ]
    await asyncio.wait_for(asyncio.gather(*futures), 10)


def _file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def _stored_key_ids(path: Path) -> set[str | None]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT payload FROM uplink UNION ALL SELECT payload FROM dead_letters")
        return {key_id_of(bytes(r[0])) for r in rows}


async def test_no_plaintext_in_the_file_and_rows_read_back(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    async with _buffer(path, _key(tmp_path, "k1", 1)) as buffer:
        await _fill(buffer, "dev-a", 50)
        # The committed rows are in the WAL (and maybe the main file) right now.
        assert Path(f"{path}-wal").exists()
        assert SECRET not in _file_bytes(path)
        leased = await buffer.lease(100)
        assert [m.payload for m in leased] == [SECRET + str(i).encode() for i in range(50)]
        assert buffer.stats.payload_bytes == sum(len(m.payload) for m in leased)
        await buffer.dead_letter(leased[:5], "test")
        letters = await buffer.lease_dead_letters(10)
        assert [d.payload for d in letters] == [m.payload for m in leased[:5]]
    assert SECRET not in _file_bytes(path)
    assert _stored_key_ids(path) == {"k1"}


async def test_policy_drops_of_encrypted_rows_keep_their_seq(tmp_path: Path) -> None:
    lossy = {"lossy": ClassConfig(kafka_topic="l", lossy=True, on_full="drop_oldest")}
    encryption = BufferEncryptionConfig(**_key(tmp_path, "k1", 1))
    config = BufferConfig(max_rows=100, encryption=encryption)
    async with Buffer(tmp_path / "b.sqlite3", config, lossy) as buffer:
        for seq in range(110):  # one at a time: each commit sees the buffer as it is
            payload = cbor2.dumps({"msg_id": f"m{seq}", "seq": seq, "body": SECRET})
            await buffer.enqueue(
                device_id="dev-a",
                class_name="lossy",
                topic="d/dev-a/up/lossy",
                qos=1,
                payload=payload,
                ingest_ms=1_000 + seq,
                priority=1,
            )
        drops = await buffer.list_drops()
        assert [d.seq for d in drops] == list(range(10))
        kept = await buffer.lease(200)
        assert buffer.stats.payload_bytes == sum(len(m.payload) for m in kept)


async def test_a_payload_moved_to_another_row_does_not_decrypt(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    key = _key(tmp_path, "k1", 1)
    async with _buffer(path, key) as buffer:
        await _fill(buffer, "dev-a", 1)
        await _fill(buffer, "dev-b", 1)
    with sqlite3.connect(path) as db:  # swap the two ciphertexts
        (a_id, a), (b_id, b) = db.execute("SELECT id, payload FROM uplink ORDER BY id")
        db.execute("UPDATE uplink SET payload = ? WHERE id = ?", (b, a_id))
        db.execute("UPDATE uplink SET payload = ? WHERE id = ?", (a, b_id))
    async with _buffer(path, key) as buffer:
        with pytest.raises(BufferKeyError, match="tampered"):
            await buffer.lease(10)


async def test_rotation_keeps_old_rows_readable_and_reencrypts(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    k1, k2 = _key(tmp_path, "k1", 1), _key(tmp_path, "k2", 2)
    async with _buffer(path, k1) as buffer:
        await _fill(buffer, "dev-a", 20, b"-old-")
    # Rotate: k2 current, k1 kept as an old key. Old rows still read; new ones use k2.
    async with _buffer(path, k2, k1) as buffer:
        await _fill(buffer, "dev-a", 10, b"-new-")
        payloads = [m.payload for m in await buffer.lease(100)]
    assert len(payloads) == 30
    assert payloads[0] == SECRET + b"-old-0"
    assert _stored_key_ids(path) == {"k1", "k2"}
    # A missing key: a clear refusal naming it, and nothing deleted.
    with pytest.raises(BufferKeyError, match=r"key id\(s\) k1,"):
        await _buffer(path, k2).open()
    assert _stored_key_ids(path) == {"k1", "k2"}
    # The re-encrypt pass: afterwards k1 is no longer needed.
    async with _buffer(path, k2, k1, reencrypt_on_start=True) as buffer:
        pass
    assert _stored_key_ids(path) == {"k2"}
    async with _buffer(path, k2) as buffer:
        again = [m.payload for m in await buffer.lease(100)]
    assert again == payloads
    assert SECRET not in _file_bytes(path)


async def test_turning_encryption_on_and_off(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    key = _key(tmp_path, "k1", 1)
    async with _buffer(path, None) as buffer:
        await _fill(buffer, "dev-a", 5)
    assert SECRET in _file_bytes(path)
    async with _buffer(path, key) as buffer:  # the plaintext rows are encrypted at open
        assert len(await buffer.lease(10)) == 5
        assert SECRET not in _file_bytes(path)  # not even in freed space (secure_delete)
    assert _stored_key_ids(path) == {"k1"}
    with pytest.raises(BufferKeyError, match=r"buffer\.encryption is not configured"):
        await _buffer(path, None).open()
    async with _buffer(path, key) as buffer:
        await buffer.release(await buffer.lease(10))
    async with _buffer(path, None) as buffer:  # drained: plaintext again from here on
        await _fill(buffer, "dev-a", 1)
        assert (await buffer.lease(10))[0].payload == SECRET + b"0"


def test_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = bytes(range(32))
    (tmp_path / "raw.key").write_bytes(raw)
    (tmp_path / "b64.key").write_text(base64.b64encode(raw).decode() + "\n")
    monkeypatch.setenv("TG_TEST_KEY", raw.hex())
    rings = [
        load_keyring(BufferEncryptionConfig(key_id="r", key_file=tmp_path / "raw.key")),
        load_keyring(BufferEncryptionConfig(key_id="r", key_file=tmp_path / "b64.key")),
        load_keyring(BufferEncryptionConfig(key_id="r", key_env="TG_TEST_KEY")),
    ]
    sealed = rings[0].seal(b"x", b"aad")
    assert len(sealed) == 1 + OVERHEAD
    assert all(ring.open(sealed, b"aad") == b"x" for ring in rings)
    (tmp_path / "short.key").write_text("abcd")
    with pytest.raises(BufferKeyError, match=r"'s'.*not a 256-bit key"):
        load_keyring(BufferEncryptionConfig(key_id="s", key_file=tmp_path / "short.key"))
    with pytest.raises(BufferKeyError, match="TG_UNSET_KEY is not set"):
        load_keyring(BufferEncryptionConfig(key_id="e", key_env="TG_UNSET_KEY"))


def test_seal_cost_per_message() -> None:
    """Records the cost of the commit-path hook (docs/security.md quotes it)."""
    ring = Keyring("k", {"k": AESGCM(bytes(32))})
    rows = [
        ("dev-1", "event", "d/dev-1/up/event", 1, b"x" * 200, 1_000 + i, 8, None, None)
        for i in range(2000)
    ]
    started = time.perf_counter()
    sealed = ring.seal_inserts(rows)
    per_message_us = (time.perf_counter() - started) / len(rows) * 1e6
    assert len(sealed) == len(rows)
    assert per_message_us < 100, per_message_us  # generous: a loaded CI machine


# --------------------------------------------------------------- gateway + Kafka


@pytest.mark.kafka
async def test_encrypted_backlog_reaches_kafka_intact_after_rotation(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    events = kafka_topic_factory("events")
    k1, k2 = _key(tmp_path, "k1", 1), _key(tmp_path, "k2", 2)

    def config(bootstrap: str, encryption: str) -> Path:
        return write_gateway_config(
            tmp_path,
            bootstrap=bootstrap,
            tls=_tls(kafka),
            topics={"event": events},
            extra=f"\n[buffer.encryption]\n{encryption}",
        )

    payloads = [SECRET + bytes([i % 256]) * (i % 40) + str(i).encode() for i in range(60)]
    # 1. Kafka unreachable (nothing listens on port 1): everything stays in the buffer.
    first = config("127.0.0.1:1", f'key_id = "k1"\nkey_file = "{k1["key_file"]}"')
    with running_gateway(first) as gateway:
        publish_qos1(gateway.mqtt_port, "dev-a", [("d/dev-a/up/event", p) for p in payloads[:30]])
        status = gateway.status()
        assert status["buffer"]["rows"] == 30
        buffer_file = Path(status["buffer"]["path"])
        assert SECRET not in _file_bytes(buffer_file)
        gateway.terminate(timeout=30)
    assert SECRET not in _file_bytes(buffer_file)
    # 2. Rotated to k2 (k1 kept as old), still no Kafka: new rows under k2.
    rotated = (
        f'key_id = "k2"\nkey_file = "{k2["key_file"]}"\n'
        f'old_keys = [{{ key_id = "k1", key_file = "{k1["key_file"]}" }}]'
    )
    second = config("127.0.0.1:1", rotated)
    with running_gateway(second) as gateway:
        publish_qos1(gateway.mqtt_port, "dev-a", [("d/dev-a/up/event", p) for p in payloads[30:]])
        gateway.terminate(timeout=30)
    assert _stored_key_ids(buffer_file) == {"k1", "k2"}
    assert SECRET not in _file_bytes(buffer_file)
    # 3. Kafka back, same keyring: the whole backlog is delivered byte-identical.
    third = config(kafka.bootstrap, rotated)
    with running_gateway(third) as gateway:
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "drain")
    records = await read_topics(kafka.bootstrap, _tls(kafka), [events])
    assert sorted(r.value for r in records) == sorted(payloads)
