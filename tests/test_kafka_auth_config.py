"""Kafka client security from config: mutual TLS vs SASL_SSL, validated by field path.

Pure: config models and the kwargs every aiokafka client gets; no sockets. The real
broker is exercised in tests/test_kafka_sasl.py.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from bridge.kafka_security import ClientSecurity, SaslLogin, client_security, sasl_login
from gateway.config import parse_config
from gateway.errors import ConfigError, KafkaAuthError
from gateway.pki import PkiPaths, init_pki


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    """Real PEM files (client_security builds an SSL context from them)."""
    return init_pki(tmp_path / "pki")


@pytest.fixture
def pem(pki: PkiPaths) -> Path:
    return pki.ca_cert


def _config(kafka: dict[str, Any]) -> dict[str, Any]:
    return {"kafka": {"bootstrap_servers": ["127.0.0.1:9093"], **kafka}}


def _errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, check_files=False)
    return info.value.errors


def _sasl(pem: Path, **sasl: Any) -> dict[str, Any]:
    return _config({"security_protocol": "SASL_SSL", "tls": {"cafile": str(pem)}, "sasl": sasl})


def test_mutual_tls_stays_the_default(pem: Path) -> None:
    cfg = parse_config(
        _config({"tls": {"cafile": str(pem), "certfile": str(pem), "keyfile": str(pem)}}),
        check_files=False,
    )
    assert cfg.kafka.security_protocol == "SSL"
    assert cfg.kafka.sasl is None
    assert sasl_login(cfg.kafka) is None


@pytest.mark.parametrize(
    ("kafka", "path", "message"),
    [
        ({"tls": {"cafile": "ca.pem"}}, "kafka.tls", "certfile and keyfile are required"),
        ({}, "kafka.tls", "certfile and keyfile are required"),
        (
            {
                "tls": {"cafile": "c", "certfile": "c", "keyfile": "k"},
                "sasl": {"username": "u", "password": "p"},
            },
            "kafka.sasl",
            'only used with security_protocol = "SASL_SSL"',
        ),
        (
            {"security_protocol": "SASL_SSL"},
            "kafka.sasl",
            "a [kafka.sasl] section is required",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl": {"username": "u"}},
            "kafka.sasl",
            "password is required",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl": {"username": "u", "password": ""}},
            "kafka.sasl",
            "password is empty",
        ),
        (
            {
                "security_protocol": "SASL_SSL",
                "sasl": {"username": "u", "password": "p", "password_file": "f"},
            },
            "kafka.sasl",
            "not both",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl": {"username": "", "password": "p"}},
            "kafka.sasl.username",
            "at least 1 character",
        ),
        (
            {
                "security_protocol": "SASL_SSL",
                "sasl": {"username": "u", "password": "p", "mechanism": "GSSAPI"},
            },
            "kafka.sasl.mechanism",
            "SCRAM-SHA-512",
        ),
        ({"security_protocol": "SASL_PLAINTEXT"}, "kafka.security_protocol", "SASL_SSL"),
        (
            {"security_protocol": "SASL_SSL", "tls": {"certfile": "c"}, "sasl": {"username": "u"}},
            "kafka.tls",
            "certfile and keyfile go together",
        ),
    ],
)
def test_bad_security_settings_name_the_field(
    kafka: dict[str, Any], path: str, message: str
) -> None:
    errors = _errors(_config(kafka))
    assert any(p == path and message in m for p, m in errors), errors


def test_missing_password_file_is_named_at_load(tmp_path: Path, pem: Path) -> None:
    data = _sasl(pem, username="u", password_file=str(tmp_path / "nope"))
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.errors == [
        ("kafka.sasl.password_file", f"file not found: {tmp_path / 'nope'}")
    ]


def test_password_from_environment_is_secret(pem: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_TEST_KAFKA_PW", "s3cret-from-env")
    cfg = parse_config(_sasl(pem, username="alice", password="${TG_TEST_KAFKA_PW}"))
    assert "s3cret-from-env" not in repr(cfg)
    assert "s3cret-from-env" not in str(cfg.kafka)
    assert "s3cret-from-env" not in cfg.model_dump_json()
    security = client_security(cfg.kafka)
    assert "s3cret-from-env" not in repr(security)
    kwargs = security.kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"  # the default mechanism
    assert kwargs["sasl_plain_username"] == "alice"
    assert kwargs["sasl_plain_password"] == "s3cret-from-env"
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED


def test_unset_password_variable_is_a_config_error(
    pem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TG_TEST_UNSET_PW", raising=False)
    errors = _errors(_sasl(pem, username="u", password="${TG_TEST_UNSET_PW}"))
    assert errors == [("kafka.sasl.password", "environment variable TG_TEST_UNSET_PW is not set")]


def test_password_file_is_read_when_the_client_is_built(tmp_path: Path, pem: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("first\n")
    cfg = parse_config(_sasl(pem, username="u", password_file=str(secret), mechanism="PLAIN"))
    assert sasl_login(cfg.kafka) == SaslLogin("PLAIN", "u", "first")
    secret.write_text("rotated\r\n")  # picked up by the next client, no reload needed
    login = sasl_login(cfg.kafka)
    assert login is not None
    assert login.password == "rotated"
    secret.write_text("\n")
    with pytest.raises(KafkaAuthError, match=r"kafka\.sasl\.password_file: .* is empty"):
        sasl_login(cfg.kafka)
    secret.unlink()
    with pytest.raises(KafkaAuthError, match=r"kafka\.sasl\.password_file: file not found"):
        client_security(cfg.kafka)


def test_mutual_tls_kwargs_carry_no_sasl(pki: PkiPaths) -> None:
    cfg = parse_config(
        _config(
            {
                "tls": {
                    "cafile": str(pki.ca_cert),
                    "certfile": str(pki.gateway_cert),
                    "keyfile": str(pki.gateway_key),
                }
            }
        )
    )
    kwargs = client_security(cfg.kafka).kwargs()
    assert kwargs["security_protocol"] == "SSL"
    assert not any(key.startswith("sasl") for key in kwargs)


def test_sasl_without_tls_is_refused() -> None:
    with pytest.raises(ValueError, match="SASL needs TLS"):
        ClientSecurity(ssl_context=None, sasl=SaslLogin("PLAIN", "u", "p"))
    assert ClientSecurity(ssl_context=None).protocol == "PLAINTEXT"
