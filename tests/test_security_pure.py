"""Pure pieces of device security: ACL decisions, password hashes, audit rotation, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge.acl import AclPolicy, filter_covers, topic_matches, validate_rule
from edge.audit import AuditLog
from edge.passwords import (
    PasswordFile,
    PasswordFileError,
    hash_password,
    read_entries,
    verify_password,
    write_entries,
)
from gateway.config import parse_config
from gateway.errors import ConfigError

KAFKA = {"bootstrap_servers": ["127.0.0.1:9093"]}


@pytest.mark.parametrize(
    ("rule", "requested", "covered"),
    [
        ("d/a/fw/#", "d/a/fw/+", True),
        ("d/a/fw/#", "d/a/fw/x/y", True),
        ("d/a/fw/#", "d/a/fw", True),  # '#' includes the parent level
        ("d/a/fw/#", "d/a/#", False),
        ("d/a/cmd", "d/a/cmd", True),
        ("d/a/cmd", "d/+/cmd", False),
        ("d/a/cmd", "d/a/cmd/#", False),
        ("d/a/cmd", "d/a/#", False),
        ("d/+/cmd", "d/a/cmd", True),
        ("d/+/cmd", "d/+/cmd", True),
        ("d/+/cmd", "d/#", False),
        ("#", "anything/#", True),
    ],
)
def test_filter_covers(rule: str, requested: str, covered: bool) -> None:
    assert filter_covers(rule, requested) is covered


@pytest.mark.parametrize(
    ("topic", "topic_filter", "match"),
    [
        ("d/a/up/event", "d/a/#", True),
        ("d/a", "d/a/#", True),
        ("d/ab/up", "d/a/#", False),
        ("d/a/up", "d/+/up", True),
        ("$SYS/x", "#", False),
        ("d/a/up/x", "d/+/up", False),
    ],
)
def test_topic_matches(topic: str, topic_filter: str, match: bool) -> None:
    assert topic_matches(topic, topic_filter) is match


def test_default_acl_and_hostile_identities() -> None:
    acl = AclPolicy()
    assert acl.may_publish("a", "d/a/up/event")
    assert acl.may_publish("a", "d/a/cmd/result")
    assert not acl.may_publish("a", "d/b/up/event")
    assert not acl.may_publish("a", "other/topic")
    assert acl.may_subscribe("a", "d/a/cmd")
    assert acl.may_subscribe("a", "d/a/fw/#")
    assert not acl.may_subscribe("a", "d/a/up/#")  # its own uplink is not for reading back
    assert not acl.may_subscribe("a", "d/b/cmd")
    # An id with a level separator or a wildcard would reach into others' topics: no rights.
    for hostile in ("a/b", "+", "#", ""):
        assert not acl.may_publish(hostile, f"d/{hostile}/up/event")
        assert not acl.may_subscribe(hostile, f"d/{hostile}/cmd")


@pytest.mark.parametrize("rule", ["", "d/#/x", "d/a+/x", "d/{tenants}/x", "d/{device_id"])
def test_invalid_rules(rule: str) -> None:
    with pytest.raises(ValueError, match=r"rule|placeholder|level"):
        validate_rule(rule)


def test_password_hash_is_salted_scrypt_and_verifies(tmp_path: Path) -> None:
    first, second = hash_password("s3cret-pass"), hash_password("s3cret-pass")
    assert first != second  # salted
    assert first.startswith("scrypt$16384$8$1$")
    assert "s3cret-pass" not in first
    assert verify_password("s3cret-pass", first)
    assert not verify_password("s3cret-pasS", first)
    assert not verify_password("s3cret-pass", "scrypt$garbage")

    path = tmp_path / "pw"
    write_entries(path, {"dev-1": first})
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_entries(path) == {"dev-1": first}
    path.write_text("dev-1:plaintext\n")
    with pytest.raises(PasswordFileError, match=r"pw:1"):
        read_entries(path)


def test_password_file_keeps_last_good_contents_on_a_broken_edit(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    encoded = hash_password("s3cret-pass")
    write_entries(path, {"dev-1": encoded})
    live = PasswordFile(path)
    live.load()
    path.write_text("this is not a password file at all\n")
    assert live.lookup("dev-1") == encoded


def test_audit_log_rotates_by_size_and_keeps_n_files(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=1024, keep=2)
    for index in range(100):
        audit.record("publish_denied", device="a", topic=f"d/b/up/{index}")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 1024
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert (last["event"], last["topic"]) == ("publish_denied", "d/b/up/99")
    assert audit.records_written == 100


def test_config_security_keys(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem", "passwords"):
        (tmp_path / name).write_text("x")
    config = parse_config(
        {
            "kafka": {
                **KAFKA,
                "tls": {"cafile": "ca.pem", "certfile": "cert.pem", "keyfile": "key.pem"},
            },
            "broker": {
                "listeners": [
                    {
                        "name": "tls",
                        "port": 8883,
                        "tls": True,
                        "cafile": "ca.pem",
                        "certfile": "cert.pem",
                        "keyfile": "key.pem",
                    },
                ],
                "allow_anonymous": False,
                "password_file": "passwords",
                "on_deny": "disconnect",
                "acl": {"enabled": True, "publish": ["site/{device_id}/#"]},
                "audit": {"max_bytes": 65536, "keep": 3},
            },
        },
        base_dir=tmp_path,
    )
    assert config.broker.listeners[0].cafile == tmp_path / "ca.pem"
    assert config.broker.password_file == tmp_path / "passwords"
    assert config.audit_path == config.gateway.data_dir / "audit.jsonl"


@pytest.mark.parametrize(
    ("broker", "field"),
    [
        ({"listeners": [{"tls": True}]}, "broker.listeners[0]"),
        ({"listeners": [{"certfile": "ca.pem"}]}, "broker.listeners[0]"),
        ({"password_file": "missing"}, "broker.password_file"),
        ({"on_deny": "ignore"}, "broker.on_deny"),
        ({"acl": {"subscribe": ["d/#/x"]}}, "broker.acl.subscribe"),
    ],
)
def test_config_security_errors_name_the_field(
    tmp_path: Path, broker: dict[str, object], field: str
) -> None:
    (tmp_path / "ca.pem").write_text("x")
    tls = {"cafile": "ca.pem", "certfile": "ca.pem", "keyfile": "ca.pem"}
    with pytest.raises(ConfigError) as caught:
        parse_config({"kafka": {**KAFKA, "tls": tls}, "broker": broker}, base_dir=tmp_path)
    assert field in str(caught.value)
