"""Downlink commands: the wire formats and the pure decisions about them (no I/O).

Formats are documented in docs/commands.md; a cloud team reads that, not this file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeGuard

__all__ = [
    "TERMINAL_STATES",
    "Command",
    "DeviceResult",
    "Rejection",
    "device_payload",
    "parse_command",
    "parse_device_result",
    "result_value",
]

TERMINAL_STATES: Final = ("executed", "failed", "expired", "rejected")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Command:
    """A valid command as taken from Kafka."""

    command_id: str
    device_id: str
    name: str
    params_json: str
    priority: int
    ttl_s: float
    not_before_ms: int | None
    created_ms: int
    """``created_ms`` from the command, else the Kafka record's timestamp."""

    @property
    def expires_ms(self) -> int:
        """TTL counts from ``not_before`` when there is one, else from creation."""
        start = self.created_ms if self.not_before_ms is None else self.not_before_ms
        return start + int(self.ttl_s * 1000)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A Kafka record that is not an acceptable command, and why."""

    reason: str
    command_id: str | None
    device_id: str | None
    tenant: str | None = None
    """With tenants: the tenant the command came for (its topic or ``tg-tenant`` header);
    the rejection is reported to that tenant."""
    remember: bool = True
    """Keep the command id as ``rejected`` so a repeat is not reported twice. False for a
    command aimed at another tenant's device: that tenant may use the id itself."""


@dataclass(frozen=True, slots=True)
class DeviceResult:
    """A device's report on ``d/{device_id}/cmd/result``."""

    command_id: str
    status: Literal["executed", "failed"]
    output_json: str


def parse_command(
    key: bytes | None,
    value: bytes | None,
    *,
    timestamp_ms: int,
    max_params_bytes: int,
    max_ttl_s: float,
) -> Command | Rejection:
    """Validate one Kafka record; never raises."""
    try:
        data = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        return Rejection("malformed: not JSON", None, _key_device(key))
    if not isinstance(data, dict):
        return Rejection("malformed: not a JSON object", None, _key_device(key))
    command_id = data.get("command_id")
    device_id = data.get("device_id")
    cid = command_id if isinstance(command_id, str) and _ID.match(command_id) else None
    did = device_id if isinstance(device_id, str) and _ID.match(device_id) else None
    if cid is None:
        return Rejection("malformed: command_id missing or invalid", None, did)
    if did is None:
        return Rejection("malformed: device_id missing or invalid", cid, _key_device(key))
    if key is not None and key.decode("utf-8", "replace") != did:
        return Rejection("malformed: record key is not the device_id", cid, did)
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        return Rejection("malformed: name missing or invalid", cid, did)
    params = data.get("params", {})
    if not isinstance(params, dict):
        return Rejection("malformed: params is not an object", cid, did)
    params_json = json.dumps(params, separators=(",", ":"), sort_keys=True)
    if len(params_json.encode()) > max_params_bytes:
        return Rejection(f"oversize: params larger than {max_params_bytes} bytes", cid, did)
    priority = data.get("priority", 0)
    if not _is_int(priority) or not 0 <= priority <= 9:
        return Rejection("malformed: priority must be an integer 0..9", cid, did)
    ttl = data.get("ttl_s")
    if not _is_number(ttl) or not 0 < ttl <= max_ttl_s:
        return Rejection(f"malformed: ttl_s must be a number in (0, {max_ttl_s:g}]", cid, did)
    not_before = data.get("not_before")
    if not_before is not None and (not _is_int(not_before) or not_before < 0):
        return Rejection("malformed: not_before must be epoch milliseconds", cid, did)
    created = data.get("created_ms", timestamp_ms)
    if not _is_int(created) or created < 0:
        return Rejection("malformed: created_ms must be epoch milliseconds", cid, did)
    return Command(cid, did, name, params_json, int(priority), float(ttl), not_before, created)


def parse_device_result(payload: bytes) -> DeviceResult | None:
    """``{command_id, status, output}`` from a device, or None when unusable."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    command_id, status = data.get("command_id"), data.get("status")
    if not isinstance(command_id, str) or status not in ("executed", "failed"):
        return None
    try:
        output = json.dumps(data.get("output"), separators=(",", ":"))
    except (TypeError, ValueError):
        return None
    return DeviceResult(command_id, status, output)


def device_payload(
    command_id: str, name: str, params_json: str, expires_ms: int, attempt: int
) -> bytes:
    """What a device receives on its command topic."""
    return (
        f'{{"command_id":{json.dumps(command_id)},"name":{json.dumps(name)},'
        f'"params":{params_json},"expires_ms":{expires_ms},"attempt":{attempt}}}'
    ).encode()


def result_value(
    *,
    gateway_id: str,
    command_id: str,
    device_id: str,
    status: str,
    reason: str | None,
    output_json: str | None,
    at_ms: int,
    result_id: int,
) -> bytes:
    """The value of a record on the results topic."""
    record: dict[str, Any] = {
        "result_id": f"{gateway_id}:{result_id}",
        "gateway_id": gateway_id,
        "command_id": command_id,
        "device_id": device_id,
        "status": status,
        "at_ms": at_ms,
    }
    if reason is not None:
        record["reason"] = reason
    if output_json is not None:
        record["output"] = json.loads(output_json)
    return json.dumps(record, separators=(",", ":")).encode()


def _key_device(key: bytes | None) -> str | None:
    if key is None:
        return None
    text = key.decode("utf-8", "replace")
    return text if _ID.match(text) else None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
