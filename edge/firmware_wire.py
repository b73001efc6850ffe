"""Firmware messages on MQTT and the campaign operations from Kafka: build and parse, pure.

Device topics (``firmware.device_topic`` = ``d/{device_id}/fw`` by default):
``/offer`` (gateway → device, QoS 1, JSON), ``/req`` (device → gateway, JSON
``{"release_id", "index"}``), ``/chunk`` (gateway → device, QoS 0, CBOR, see
:func:`edge.firmware_model.chunk_payload`), ``/status`` (device → gateway, QoS 1, JSON).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from edge.firmware_store import Release

__all__ = [
    "DEVICE_STATES",
    "ControlOp",
    "cancel_payload",
    "offer_payload",
    "parse_control",
    "parse_request",
    "parse_status",
]

DEVICE_STATES: Final = frozenset({"downloading", "installed", "failed"})
_OPS: Final = frozenset({"start", "pause", "resume", "abort", "rollback"})
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")


def offer_payload(campaign_id: str, release: Release, chunk_bytes: int) -> bytes:
    """What a device is offered: the signed manifest and how to pull the image."""
    return json.dumps(
        {
            "campaign_id": campaign_id,
            "release_id": release.release_id,
            "version": release.version,
            "size": release.size,
            "sha256": release.sha256,
            "chunk_bytes": chunk_bytes,
            "chunk_count": -(-release.size // chunk_bytes),
            "manifest": release.manifest,
            "signature": release.signature,
        }
    ).encode()


def cancel_payload(release_id: str) -> bytes:
    """Tells a device to stop pulling a release (campaign aborted or rolled back)."""
    return json.dumps({"cancel": True, "release_id": release_id}).encode()


def _object(payload: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def parse_request(payload: bytes) -> tuple[str, int] | None:
    """``(release_id, chunk index)`` of a chunk request, or None if malformed."""
    data = _object(payload)
    if data is None:
        return None
    release, index = data.get("release_id"), data.get("index")
    if not isinstance(release, str) or not isinstance(index, int) or isinstance(index, bool):
        return None
    return (release, index) if index >= 0 else None


def parse_status(payload: bytes) -> dict[str, Any] | None:
    """A device's status report, normalised, or None if malformed."""
    data = _object(payload)
    if data is None:
        return None
    release, state = data.get("release_id"), data.get("state")
    if not isinstance(release, str) or state not in DEVICE_STATES:
        return None
    nbytes = data.get("bytes", 0)
    version = data.get("version")
    reason = data.get("reason")
    return {
        "release_id": release,
        "state": state,
        "bytes": nbytes if isinstance(nbytes, int) and not isinstance(nbytes, bool) else 0,
        "version": version if isinstance(version, str) else None,
        "reason": str(reason)[:200] if reason is not None else None,
    }


@dataclass(frozen=True, slots=True)
class ControlOp:
    """A campaign operation from the control topic."""

    op: str
    campaign_id: str
    release_id: str | None = None
    devices: tuple[str, ...] | None = None
    rings: tuple[float, ...] | None = None
    failure_threshold: float | None = None


def parse_control(value: bytes | None) -> ControlOp | str:
    """A :class:`ControlOp`, or the reason the record is rejected."""
    data = _object(value or b"")
    if data is None:
        return "malformed: not a JSON object"
    op, campaign = data.get("op"), data.get("campaign_id")
    if op not in _OPS:
        return f"malformed: op must be one of {sorted(_OPS)}"
    if not isinstance(campaign, str) or not _ID.match(campaign):
        return "malformed: campaign_id"
    if op != "start":
        return ControlOp(op, campaign)
    release = data.get("release_id")
    if not isinstance(release, str) or not release:
        return "malformed: release_id"
    devices = data.get("devices")
    if devices is not None and (
        not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices)
    ):
        return "malformed: devices must be a list of device ids"
    rings = data.get("rings")
    if rings is not None and (
        not isinstance(rings, list)
        or not rings
        or not all(isinstance(p, int | float) and 0 < p <= 100 for p in rings)
        or rings != sorted(rings)
        or rings[-1] != 100
    ):
        return "malformed: rings must be ascending percents, the last one 100"
    threshold = data.get("failure_threshold")
    if threshold is not None and (
        not isinstance(threshold, int | float) or not 0 <= threshold <= 1
    ):
        return "malformed: failure_threshold must be in [0, 1]"
    return ControlOp(
        op,
        campaign,
        release,
        None if devices is None else tuple(devices),
        None if rings is None else tuple(float(p) for p in rings),
        None if threshold is None else float(threshold),
    )
