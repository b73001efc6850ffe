"""Commands: the pure parts (parsing, validation, payloads, CLI argument building)."""

from __future__ import annotations

import json

import pytest

from edge.commands_model import Command, Rejection, parse_command, parse_device_result
from gateway.commands_cli import build_command, parse_at
from gateway.config import CommandsConfig

NOW = 1_800_000_000_000


def _parse(value: object, key: bytes | None = b"dev-1") -> Command | Rejection:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return parse_command(key, raw, timestamp_ms=NOW, max_params_bytes=100, max_ttl_s=3600)


def _valid(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "command_id": "c-1",
        "device_id": "dev-1",
        "name": "reboot",
        "params": {"delay": 1},
        "priority": 3,
        "ttl_s": 60,
    }
    base.update(changes)
    return base


def test_a_valid_command_parses_with_its_expiry() -> None:
    command = _parse(_valid())
    assert isinstance(command, Command)
    assert command.params_json == '{"delay":1}'
    assert command.expires_ms == NOW + 60_000
    scheduled = _parse(_valid(not_before=NOW + 5_000))
    assert isinstance(scheduled, Command)
    assert scheduled.expires_ms == NOW + 65_000  # TTL counts from not_before


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "malformed: not JSON"),
        ([1, 2], "malformed: not a JSON object"),
        (_valid(command_id=""), "malformed: command_id missing or invalid"),
        (_valid(device_id=None), "malformed: device_id missing or invalid"),
        (_valid(device_id="dev-2"), "malformed: record key is not the device_id"),
        (_valid(name=7), "malformed: name missing or invalid"),
        (_valid(params=[1]), "malformed: params is not an object"),
        (_valid(params={"x": "y" * 200}), "oversize: params larger than 100 bytes"),
        (_valid(priority=True), "malformed: priority must be an integer 0..9"),
        (_valid(ttl_s=0), "malformed: ttl_s must be a number in (0, 3600]"),
        (_valid(ttl_s=3601), "malformed: ttl_s must be a number in (0, 3600]"),
        (_valid(not_before="soon"), "malformed: not_before must be epoch milliseconds"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason(value: object, reason: str) -> None:
    result = _parse(value)
    assert isinstance(result, Rejection)
    assert result.reason == reason


def test_device_results() -> None:
    ok = parse_device_result(b'{"command_id": "c", "status": "executed", "output": {"a": 1}}')
    assert ok is not None
    assert (ok.status, ok.output_json) == ("executed", '{"a":1}')
    assert parse_device_result(b'{"command_id": "c", "status": "done"}') is None
    assert parse_device_result(b"\xff") is None


def test_per_gateway_topic_and_group() -> None:
    config = CommandsConfig()
    assert config.kafka_topic("gw-7") == "iot.commands.gw-7"
    assert config.kafka_group("gw-7") == "tidegate-gw-7"


def test_cli_command_building() -> None:
    command = build_command(
        "dev-1",
        "set",
        ["level=3", "mode=eco", 'tags=["a"]'],
        ttl_s=30,
        priority=5,
        at="2027-01-01T00:00:00Z",
        command_id="x",
    )
    assert command["params"] == {"level": 3, "mode": "eco", "tags": ["a"]}
    assert command["not_before"] == parse_at("1798761600000") == 1_798_761_600_000
    with pytest.raises(ValueError, match="key=value"):
        build_command("d", "n", ["novalue"], ttl_s=1, priority=0, at=None, command_id=None)
