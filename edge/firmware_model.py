"""Firmware formats and signatures (docs/firmware.md). Pure: no I/O beyond key parsing.

A release is described by a *manifest*: a canonical JSON object (sorted keys, no spaces)
naming the release, its target device type, version, size, SHA-256 and how it is chunked on
Kafka. The Ed25519 signature covers the manifest's exact bytes, so it covers the image hash;
a gateway and a device both verify the signature over those bytes and then the image against
the hash. The manifest travels as a string and is never re-serialised before verification.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "HEADER_INDEX",
    "HEADER_KIND",
    "HEADER_RELEASE",
    "Chunk",
    "FirmwareFormatError",
    "Manifest",
    "chunk_payload",
    "key_id",
    "load_private_key",
    "load_public_key",
    "make_manifest",
    "parse_chunk_payload",
    "parse_manifest_record",
    "release_records",
    "verify_manifest",
]

HEADER_KIND: Final = "tg-fw-kind"
HEADER_RELEASE: Final = "tg-fw-release"
HEADER_INDEX: Final = "tg-fw-index"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class FirmwareFormatError(ValueError):
    """A manifest, chunk or signature is malformed or does not verify (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed manifest plus its signed form."""

    release_id: str
    device_type: str
    version: str
    size: int
    sha256: str
    chunk_bytes: int
    """Chunk size of the release's Kafka records."""
    chunk_count: int
    key_id: str
    signed: str
    """The exact signed JSON text."""
    signature: str
    """Base64 Ed25519 signature over ``signed`` (UTF-8)."""

    def record(self) -> dict[str, str]:
        """What devices and Kafka carry: the signed text and its signature."""
        return {"manifest": self.signed, "signature": self.signature}


def key_id(public: Ed25519PublicKey) -> str:
    """A short stable name of a public key: hex of the first 8 bytes of its SHA-256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise FirmwareFormatError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise FirmwareFormatError("not an Ed25519 public key")
    return key


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise FirmwareFormatError(f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise FirmwareFormatError("not an Ed25519 private key")
    return key


def make_manifest(
    image: bytes,
    *,
    version: str,
    device_type: str,
    chunk_bytes: int,
    key: Ed25519PrivateKey,
    created_ms: int,
) -> Manifest:
    """Describe and sign ``image``."""
    for name, value in (("version", version), ("device type", device_type)):
        if not _NAME.match(value):
            raise FirmwareFormatError(f"{name} {value!r}: 1-64 of A-Z a-z 0-9 . _ + -")
    if not image:
        raise FirmwareFormatError("empty image")
    fields = {
        "release_id": f"{device_type}@{version}",
        "device_type": device_type,
        "version": version,
        "size": len(image),
        "sha256": hashlib.sha256(image).hexdigest(),
        "chunk_bytes": chunk_bytes,
        "chunk_count": -(-len(image) // chunk_bytes),
        "key_id": key_id(key.public_key()),
        "created_ms": created_ms,
    }
    signed = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    signature = base64.b64encode(key.sign(signed.encode())).decode()
    return _parse_signed(signed, signature)


def release_records(
    manifest: Manifest, image: bytes
) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    """The Kafka records of a release, in order: the manifest, then every chunk."""
    rid = manifest.release_id.encode()
    records = [
        (
            json.dumps(manifest.record()).encode(),
            [(HEADER_KIND, b"manifest"), (HEADER_RELEASE, rid)],
        )
    ]
    for index in range(manifest.chunk_count):
        start = index * manifest.chunk_bytes
        records.append(
            (
                image[start : start + manifest.chunk_bytes],
                [
                    (HEADER_KIND, b"chunk"),
                    (HEADER_RELEASE, rid),
                    (HEADER_INDEX, str(index).encode()),
                ],
            )
        )
    return records


def parse_manifest_record(value: bytes | None) -> Manifest:
    """A manifest record (JSON with ``manifest`` and ``signature``), not yet verified."""
    try:
        data = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise FirmwareFormatError("malformed: manifest record is not JSON") from exc
    if not isinstance(data, dict):
        raise FirmwareFormatError("malformed: manifest record is not an object")
    signed, signature = data.get("manifest"), data.get("signature")
    if not isinstance(signed, str) or not isinstance(signature, str):
        raise FirmwareFormatError("malformed: manifest and signature must be strings")
    return _parse_signed(signed, signature)


def _parse_signed(signed: str, signature: str) -> Manifest:
    try:
        fields = json.loads(signed)
    except ValueError as exc:
        raise FirmwareFormatError("malformed: manifest is not JSON") from exc
    if not isinstance(fields, dict):
        raise FirmwareFormatError("malformed: manifest is not an object")
    try:
        manifest = Manifest(
            release_id=_str(fields, "release_id"),
            device_type=_str(fields, "device_type"),
            version=_str(fields, "version"),
            size=_int(fields, "size"),
            sha256=_str(fields, "sha256"),
            chunk_bytes=_int(fields, "chunk_bytes"),
            chunk_count=_int(fields, "chunk_count"),
            key_id=_str(fields, "key_id"),
            signed=signed,
            signature=signature,
        )
    except KeyError as exc:
        raise FirmwareFormatError(
            f"malformed: manifest field {exc.args[0]} missing or bad"
        ) from exc
    if not (_NAME.match(manifest.device_type) and _NAME.match(manifest.version)):
        raise FirmwareFormatError("malformed: bad device type or version")
    if manifest.release_id != f"{manifest.device_type}@{manifest.version}":
        raise FirmwareFormatError("malformed: release_id must be <device_type>@<version>")
    if not _HEX64.match(manifest.sha256):
        raise FirmwareFormatError("malformed: sha256 must be 64 lowercase hex digits")
    if manifest.size < 1 or manifest.chunk_bytes < 1:
        raise FirmwareFormatError("malformed: size and chunk_bytes must be positive")
    if manifest.chunk_count != -(-manifest.size // manifest.chunk_bytes):
        raise FirmwareFormatError("malformed: chunk_count does not match size / chunk_bytes")
    return manifest


def _str(fields: Mapping[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value:
        raise KeyError(name)
    return value


def _int(fields: Mapping[str, Any], name: str) -> int:
    value = fields.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise KeyError(name)
    return value


def verify_manifest(manifest: Manifest, trusted: Iterable[Ed25519PublicKey]) -> None:
    """Raise :class:`FirmwareFormatError` unless a trusted key signed the manifest."""
    keys = {key_id(k): k for k in trusted}
    key = keys.get(manifest.key_id)
    if key is None:
        raise FirmwareFormatError(f"untrusted signing key {manifest.key_id}")
    try:
        signature = base64.b64decode(manifest.signature, validate=True)
        key.verify(signature, manifest.signed.encode())
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise FirmwareFormatError("bad signature") from exc


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk sent to a device."""

    release_id: str
    index: int
    data: bytes


def chunk_payload(release_id: str, index: int, data: bytes) -> bytes:
    """The MQTT payload of a chunk response: CBOR ``{"r": release, "i": index, "d": bytes}``."""
    return cbor2.dumps({"r": release_id, "i": index, "d": data})


def parse_chunk_payload(payload: bytes) -> Chunk | None:
    try:
        data = cbor2.loads(payload)
    except Exception:  # cbor2 raises several types on arbitrary bytes
        return None
    if not isinstance(data, dict):
        return None
    release, index, body = data.get("r"), data.get("i"), data.get("d")
    if not isinstance(release, str) or not isinstance(index, int) or not isinstance(body, bytes):
        return None
    return Chunk(release, index, body)
