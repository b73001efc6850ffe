"""The development PKI: files, modes, extensions, idempotence, device ids, and the CLI."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from gateway.dev.cli import certs_app
from gateway.errors import PkiError, TidegateError
from gateway.pki import PkiPaths, init_pki, issue_device_cert, validate_device_id


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_init_creates_every_file_with_private_keys_0600(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    for cert in (paths.ca_cert, paths.broker_cert, paths.gateway_cert):
        assert cert.is_file()
    for key in (paths.ca_key, paths.broker_key, paths.gateway_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert paths.devices_dir.is_dir()
    assert paths == PkiPaths.under(tmp_path / "pki")


def test_broker_cert_has_loopback_sans_and_both_usages(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    broker, ca = _cert(paths.broker_cert), _cert(paths.ca_cert)
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert _eku(broker) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    broker.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_gateway_cert_is_a_client_cert(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    gateway = _cert(paths.gateway_cert)
    assert _cn(gateway) == "tidegate-gateway"
    assert _eku(gateway) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    gateway.verify_directly_issued_by(_cert(paths.ca_cert))


def test_init_is_idempotent_and_force_replaces_the_ca(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    ca_before = paths.ca_cert.read_bytes()
    gateway_before = paths.gateway_cert.read_bytes()
    init_pki(tmp_path)
    assert paths.ca_cert.read_bytes() == ca_before
    assert paths.gateway_cert.read_bytes() == gateway_before

    paths.broker_cert.unlink()  # a missing leaf is reissued under the kept CA
    init_pki(tmp_path)
    assert paths.ca_cert.read_bytes() == ca_before
    _cert(paths.broker_cert).verify_directly_issued_by(_cert(paths.ca_cert))

    init_pki(tmp_path, force=True)
    assert paths.ca_cert.read_bytes() != ca_before
    _cert(paths.gateway_cert).verify_directly_issued_by(_cert(paths.ca_cert))


def test_incomplete_ca_is_reported(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    paths.ca_key.unlink()
    with pytest.raises(PkiError, match=r"ca-key\.pem: missing"):
        init_pki(tmp_path)


def test_device_cert_has_the_device_id_as_cn(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    cert_path, key_path = issue_device_cert(tmp_path, "pump-0042")
    assert cert_path == tmp_path / "devices" / "pump-0042.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = _cert(cert_path)
    assert _cn(cert) == "pump-0042"
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(_cert(paths.ca_cert))


@pytest.mark.parametrize(
    ("device_id", "reason"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("a+b", r"'\+'"),
        ("a#", "'#'"),
        ("a b", "whitespace"),
        ("tab\there", "whitespace"),
        ("x" * 129, "at most 128"),
        ("..", "not allowed"),
    ],
)
def test_bad_device_ids_are_refused(tmp_path: Path, device_id: str, reason: str) -> None:
    init_pki(tmp_path)
    with pytest.raises(PkiError, match=reason):
        issue_device_cert(tmp_path, device_id)
    assert list((tmp_path / "devices").iterdir()) == []


def test_longest_allowed_device_id() -> None:
    assert validate_device_id("x" * 128) == "x" * 128


def test_device_cert_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(TidegateError, match="certs init"):
        issue_device_cert(tmp_path / "nothing-here", "dev-1")


def test_certs_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(certs_app, ["init", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ca.pem").is_file()

    result = runner.invoke(certs_app, ["device", "dev-7", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert _cn(_cert(tmp_path / "devices" / "dev-7.pem")) == "dev-7"

    result = runner.invoke(certs_app, ["device", "bad/id", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "must not contain '/'" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
