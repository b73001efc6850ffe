"""The CBOR envelope simulated devices send (docs/device-contract.md, "Payloads").

A map ``{"msg_id": str, "seq": int, "ts": int, "body": bytes[, "ttl_s": int]}``. The verifier
decodes every Kafka record value with :func:`try_decode_envelope`: bytes that are not an
envelope are counted as undecodable, never allowed to crash a verification run.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, TypeGuard

import cbor2

from gateway.errors import TidegateError

__all__ = [
    "Envelope",
    "EnvelopeError",
    "decode_envelope",
    "encode_envelope",
    "make_msg_id",
    "new_run_id",
    "parse_msg_id",
    "try_decode_envelope",
]


class EnvelopeError(TidegateError, ValueError):
    """Bytes are not a valid device envelope; the message says which rule they broke."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded device message."""

    msg_id: str
    seq: int
    ts: int
    body: bytes
    ttl_s: int | None = None


def new_run_id() -> str:
    """A random run id: it makes msg ids unique across simulator runs with the same devices."""
    return secrets.token_hex(4)


def make_msg_id(device_id: str, run_id: str, class_name: str, seq: int) -> str:
    """The simulator's msg id: ``{device_id}:{run_id}:{class}:{seq}``."""
    return f"{device_id}:{run_id}:{class_name}:{seq}"


def parse_msg_id(msg_id: str) -> tuple[str, str, str, int] | None:
    """``(device_id, run_id, class, seq)`` of a simulator msg id, or None for any other shape.

    Split from the right: device ids may contain ``:``, run ids and class names do not.
    """
    parts = msg_id.rsplit(":", 3)
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    return parts[0], parts[1], parts[2], int(parts[3])


def encode_envelope(
    *, msg_id: str, seq: int, ts: int, body: bytes, ttl_s: int | None = None
) -> bytes:
    """CBOR bytes for one message."""
    item: dict[str, Any] = {"msg_id": msg_id, "seq": seq, "ts": ts, "body": body}
    if ttl_s is not None:
        item["ttl_s"] = ttl_s
    return cbor2.dumps(item)


def decode_envelope(data: bytes) -> Envelope:
    """Decode and check an envelope; raise :class:`EnvelopeError` saying what is wrong."""
    try:
        item = cbor2.loads(data)
    except Exception as exc:
        # Arbitrary bytes from a topic other producers share can make a CBOR decoder raise
        # almost anything (decode errors, recursion, unsupported tags); all mean "not ours".
        raise EnvelopeError(f"not CBOR: {exc}") from exc
    if not isinstance(item, dict):
        raise EnvelopeError(f"not a CBOR map but {type(item).__name__}")
    msg_id, seq, ts, body = item.get("msg_id"), item.get("seq"), item.get("ts"), item.get("body")
    if not isinstance(msg_id, str) or not msg_id:
        raise EnvelopeError("msg_id: missing or not a non-empty text string")
    if not _uint(seq):
        raise EnvelopeError("seq: missing or not an unsigned integer")
    if not _uint(ts):
        raise EnvelopeError("ts: missing or not an unsigned integer")
    if not isinstance(body, bytes):
        raise EnvelopeError("body: missing or not a byte string")
    ttl_s = item.get("ttl_s")
    if ttl_s is not None and not _uint(ttl_s):
        raise EnvelopeError("ttl_s: not an unsigned integer")
    return Envelope(msg_id=msg_id, seq=seq, ts=ts, body=body, ttl_s=ttl_s)


def try_decode_envelope(data: bytes | None) -> Envelope | None:
    """The envelope in ``data``, or None when it is not one (a foreign or damaged record)."""
    if data is None:
        return None
    try:
        return decode_envelope(data)
    except EnvelopeError:
        return None


def _uint(value: object) -> TypeGuard[int]:
    # bool is an int subclass; a CBOR true is not a sequence number.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
