"""At-rest encryption of buffered payloads: AES-256-GCM, a keyring, no schema change.

Stored form of a payload (uplink rows and dead letters)::

    0xE1 | key id (8 bytes, ASCII, NUL-padded) | nonce (12 random bytes) | ciphertext | tag (16)

37 bytes per row. The version byte leaves room for another format; the key id lets rows
encrypted with an older key decrypt after a rotation (the keyring holds the current key and
the old ones). The associated data binds each ciphertext to its row's device, class and
MQTT topic, so a payload copied onto another row (another device, class or topic) fails to
decrypt instead of being forwarded under the wrong name. Rows of one device, class and topic
could still be swapped with each other undetected (the row id is assigned by SQLite after
the encryption, and the ingest time is left out so rows dropped by policy, which do not
carry it, can be decrypted for the drop ledger).

Which file holds what is recorded in the ``meta`` table (``payload_encryption``): either
every row of the file is in this form, or none is. Turning encryption on for a file with
plaintext rows encrypts them all in one transaction at open (an interrupted start leaves the
plaintext file as it was); turning it off while encrypted rows remain is refused.

Nonces are random (96 bits): keep one key under about 2^32 rows (NIST SP 800-38D), i.e.
rotate it at least every couple of weeks at a sustained 3,000 msg/s.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiosqlite
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge.buffer_types import DeadLetter, Evicted, StoredMessage
from gateway.config import BufferEncryptionConfig, EncryptionKeyConfig
from gateway.errors import BufferStoreError

__all__ = [
    "FORMAT_V1",
    "OVERHEAD",
    "BufferKeyError",
    "Keyring",
    "load_keyring",
    "prepare_file",
    "reencrypt",
]

log = logging.getLogger("edge.buffer")

FORMAT_V1: Final = 0xE1
_KEY_ID_LEN: Final = 8
_NONCE_LEN: Final = 12
_HEAD: Final = 1 + _KEY_ID_LEN
OVERHEAD: Final = _HEAD + _NONCE_LEN + 16
"""Bytes an encrypted payload takes beyond the plaintext."""
_META_KEY: Final = "payload_encryption"
_META_VALUE: Final = "aes-256-gcm-v1"
_CHUNK: Final = 500

_Row = TypeVar("_Row", StoredMessage, DeadLetter, Evicted)


class BufferKeyError(BufferStoreError):
    """A key is missing, malformed or does not decrypt a row; the gateway refuses to start
    (nothing is deleted)."""


def _aad(device_id: str, class_name: str, topic: str) -> bytes:
    return f"tidegate-row-v1\0{device_id}\0{class_name}\0{topic}".encode()


def _read_key(key: EncryptionKeyConfig) -> bytes:
    where = f"key {key.key_id!r}"
    if key.key_file is not None:
        try:
            raw = key.key_file.read_bytes()
        except OSError as exc:
            raise BufferKeyError(f"{where}: cannot read {key.key_file}: {exc}") from exc
        if len(raw) == 32:
            return raw
        text = raw.decode("ascii", "replace").strip()
        where += f" ({key.key_file})"
    else:
        assert key.key_env is not None
        found = os.environ.get(key.key_env)
        if not found:
            raise BufferKeyError(f"{where}: environment variable {key.key_env} is not set")
        text = found.strip()
        where += f" (${key.key_env})"
    decoded: bytes | None = None
    try:
        decoded = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        decoded = None
    if decoded is None or len(decoded) != 32:
        raise BufferKeyError(f"{where}: not a 256-bit key (32 raw bytes, 64 hex or base64)")
    return decoded


@dataclass(frozen=True)
class Keyring:
    """The current key (new rows) and the old ones (rows encrypted before a rotation)."""

    current_id: str
    keys: dict[str, AESGCM]

    @property
    def _current_tag(self) -> bytes:
        return bytes([FORMAT_V1]) + self.current_id.encode().ljust(_KEY_ID_LEN, b"\0")

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        sealed: bytes = self.keys[self.current_id].encrypt(nonce, plaintext, aad)
        return self._current_tag + nonce + sealed

    def open(self, blob: bytes, aad: bytes) -> bytes:
        key_id = key_id_of(blob)
        key = self.keys.get(key_id or "")
        if key is None:
            raise BufferKeyError(
                f"a buffered row is encrypted with key id {key_id!r}, which is not configured"
            )
        nonce = blob[_HEAD : _HEAD + _NONCE_LEN]
        try:
            plain: bytes = key.decrypt(nonce, blob[_HEAD + _NONCE_LEN :], aad)
        except InvalidTag as exc:
            raise BufferKeyError(
                f"a buffered row does not decrypt with key id {key_id!r} (wrong key or a"
                " tampered row)"
            ) from exc
        return plain

    # The buffer's hooks: one call per batch -----------------------------------------

    def seal_inserts(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """``INSERT_UPLINK`` parameter rows with their payloads (index 4) encrypted."""
        return [(*r[:4], self.seal(r[4], _aad(r[0], r[1], r[2])), *r[5:]) for r in rows]

    def open_evicted(self, rows: Sequence[Evicted]) -> list[Evicted]:
        """Rows dropped by policy, decrypted for the drop ledger's ``seq`` (best effort: a
        row that does not decrypt keeps its stored bytes; it is being dropped anyway). Sizes
        become plaintext sizes, as the buffer's counters count them."""
        try:
            opened = self.open_rows(rows)
        except BufferKeyError:
            return list(rows)
        return [dataclasses.replace(row, size=len(row.payload)) for row in opened]

    def open_rows(self, rows: Sequence[_Row]) -> list[_Row]:
        """Stored messages, dead letters or evicted rows with their payloads decrypted."""
        return [
            dataclasses.replace(
                row,
                payload=self.open(row.payload, _aad(row.device_id, row.class_name, row.topic)),
            )
            for row in rows
        ]


def key_id_of(blob: bytes) -> str | None:
    """The key id of an encrypted payload, None if it is not in the encrypted format."""
    if len(blob) < OVERHEAD or blob[0] != FORMAT_V1:
        return None
    return blob[1:_HEAD].rstrip(b"\0").decode("ascii", "replace")


def load_keyring(config: BufferEncryptionConfig) -> Keyring:
    """Read every configured key; :class:`BufferKeyError` names the one that failed."""
    keys = {k.key_id: AESGCM(_read_key(k)) for k in (config, *config.old_keys)}
    return Keyring(current_id=config.key_id, keys=keys)


# ---------------------------------------------------------------- the file at open

_TABLES: Final = ("uplink", "dead_letters")
_SELECT = (
    "SELECT id, device_id, class, topic, payload FROM {table}"
    " WHERE id > ? {where} ORDER BY id LIMIT ?"
)


async def prepare_file(
    db: aiosqlite.Connection, keyring: Keyring | None, *, creating: bool
) -> None:
    """Bring the file's encryption state in line with the config, or refuse to start.

    Runs at open, before the committer. Never deletes a row.
    """
    cursor = await db.execute("SELECT value FROM meta WHERE key = ?", (_META_KEY,))
    row = await cursor.fetchone()
    encrypted = row is not None
    if keyring is None:
        if not encrypted:
            return
        ids = await _stored_key_ids(db)
        if ids:
            raise BufferKeyError(
                f"the buffer holds rows encrypted with key id(s) {', '.join(sorted(ids))} but"
                " buffer.encryption is not configured; configure those keys (and let the rows"
                " drain) before turning encryption off. Nothing was deleted."
            )
        await db.execute("DELETE FROM meta WHERE key = ?", (_META_KEY,))
        return
    if encrypted:
        missing = sorted((await _stored_key_ids(db)) - set(keyring.keys))
        if missing:
            raise BufferKeyError(
                f"buffered rows are encrypted with key id(s) {', '.join(missing)}, which"
                " buffer.encryption does not configure (add them to buffer.encryption.old_keys)."
                " Refusing to start; nothing was deleted."
            )
        return
    # Plaintext file, encryption now on: encrypt every row and record it, one transaction.
    # secure_delete zeroes the space the plaintext cells leave behind in their pages.
    await db.execute("PRAGMA secure_delete=ON")
    await db.execute("BEGIN IMMEDIATE")
    try:
        count = 0
        if not creating:
            for table in _TABLES:
                count += await _rewrite(db, table, keyring, decrypt=False)
        await db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_META_KEY, _META_VALUE))
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    finally:
        await db.execute("PRAGMA secure_delete=OFF")
    if count:
        # Rewrite the main file now, so the plaintext pages do not wait for a checkpoint.
        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.warning("buffer encryption turned on: encrypted %d buffered payloads", count)


async def reencrypt(db: aiosqlite.Connection, keyring: Keyring) -> int:
    """Re-encrypt every row not under the current key (chunked transactions: a row is
    readable by its key id at every moment, so an interrupted pass loses nothing)."""
    total = 0
    for table in _TABLES:
        while True:
            await db.execute("BEGIN IMMEDIATE")
            try:
                done = await _rewrite(db, table, keyring, decrypt=True, limit=_CHUNK)
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            total += done
            if done < _CHUNK:
                break
    if total:
        log.warning("re-encrypted %d buffered payloads with key %r", total, keyring.current_id)
    return total


async def _rewrite(
    db: aiosqlite.Connection,
    table: str,
    keyring: Keyring,
    *,
    decrypt: bool,
    limit: int | None = None,
) -> int:
    """Encrypt (plaintext rows) or re-encrypt (rows under another key) with the current key."""
    where = "AND substr(payload, 2, 8) != ?" if decrypt else ""
    current = keyring.current_id.encode().ljust(_KEY_ID_LEN, b"\0")
    after, done = 0, 0
    while limit is None or done < limit:
        chunk = _CHUNK if limit is None else min(_CHUNK, limit - done)
        params: tuple[Any, ...] = (after, current, chunk) if decrypt else (after, chunk)
        cursor = await db.execute(_SELECT.format(table=table, where=where), params)
        rows = list(await cursor.fetchall())
        if not rows:
            break
        updates = []
        for row_id, device_id, class_name, topic, payload in rows:
            aad = _aad(device_id, class_name, topic)
            plain = keyring.open(bytes(payload), aad) if decrypt else bytes(payload)
            updates.append((keyring.seal(plain, aad), row_id))
        await db.executemany(f"UPDATE {table} SET payload = ? WHERE id = ?", updates)
        after, done = rows[-1][0], done + len(rows)
    return done


async def _stored_key_ids(db: aiosqlite.Connection) -> set[str]:
    ids: set[str] = set()
    for table in _TABLES:
        cursor = await db.execute(f"SELECT DISTINCT substr(payload, 1, {_HEAD}) FROM {table}")
        for (head,) in await cursor.fetchall():
            blob = bytes(head)
            ids.add(
                blob[1:].rstrip(b"\0").decode("ascii", "replace")
                if blob[:1] == bytes([FORMAT_V1])
                else "(not encrypted)"
            )
    return ids
