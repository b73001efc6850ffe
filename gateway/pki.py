"""Development PKI: one CA, the local Kafka broker, the gateway, and device certificates.

Everything here is for development, tests and the demo: keys are unencrypted PKCS#8 PEM
(the Kafka PEM keystore and Python's ``ssl`` both read them without a password), written
owner-only from the first byte. EC P-256 keys are used; Kafka's PEM store (``ssl.keystore.type
=PEM``) accepts them and they are fast to generate.

Layout of a PKI directory::

    ca.pem, ca-key.pem                        the CA (kept across runs unless ``force``)
    kafka-broker.pem, kafka-broker-key.pem    server+client auth, SAN IP:127.0.0.1, DNS:localhost
    gateway.pem, gateway-key.pem              client auth, CN=tidegate-gateway
    devices/<id>.pem, devices/<id>-key.pem    client auth, CN=<device id>
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import PkiError

__all__ = [
    "GATEWAY_CN",
    "MAX_DEVICE_ID_LENGTH",
    "PkiPaths",
    "init_pki",
    "issue_crl",
    "issue_device_cert",
    "validate_device_id",
]

GATEWAY_CN = "tidegate-gateway"
MAX_DEVICE_ID_LENGTH = 128

_CA_VALIDITY = dt.timedelta(days=3650)
_LEAF_VALIDITY = dt.timedelta(days=825)
# Certificates are back-dated a little so a peer whose clock is slightly behind accepts them.
_BACKDATE = dt.timedelta(minutes=5)
# A leaf that expires sooner than this is reissued by init_pki instead of kept.
_RENEW_BEFORE = dt.timedelta(days=30)

_IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class PkiPaths:
    """Where each file of a development PKI lives. Pure: building one touches no file."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    broker_cert: Path
    broker_key: Path
    gateway_cert: Path
    gateway_key: Path
    devices_dir: Path

    @classmethod
    def under(cls, directory: Path) -> PkiPaths:
        """The standard layout under ``directory``."""
        return cls(
            directory=directory,
            ca_cert=directory / "ca.pem",
            ca_key=directory / "ca-key.pem",
            broker_cert=directory / "kafka-broker.pem",
            broker_key=directory / "kafka-broker-key.pem",
            gateway_cert=directory / "gateway.pem",
            gateway_key=directory / "gateway-key.pem",
            devices_dir=directory / "devices",
        )

    def device_cert(self, device_id: str) -> Path:
        """Certificate path of one device (the id is validated)."""
        return self.devices_dir / f"{validate_device_id(device_id)}.pem"

    def device_key(self, device_id: str) -> Path:
        """Private key path of one device (the id is validated)."""
        return self.devices_dir / f"{validate_device_id(device_id)}-key.pem"


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it can be a certificate CN, an MQTT topic level and a file name.

    Raises :class:`PkiError` naming the rule that was broken.
    """
    if not device_id:
        raise PkiError("device id must not be empty")
    if len(device_id) > MAX_DEVICE_ID_LENGTH:
        raise PkiError(
            f"device id is {len(device_id)} characters, at most {MAX_DEVICE_ID_LENGTH} allowed"
        )
    for forbidden in ("/", "+", "#", "\\"):
        if forbidden in device_id:
            raise PkiError(f"device id {device_id!r} must not contain {forbidden!r}")
    if any(ch.isspace() or not ch.isprintable() for ch in device_id):
        raise PkiError(f"device id {device_id!r} must not contain whitespace or control characters")
    if device_id in (".", ".."):
        raise PkiError(f"device id {device_id!r} is not allowed")
    return device_id


def init_pki(directory: Path, *, force: bool = False) -> PkiPaths:
    """Create (or complete) the development PKI in ``directory`` and return its paths.

    Idempotent: an existing CA is kept unless ``force``; the broker and gateway certificates
    are kept if they were signed by that CA and are not about to expire, otherwise reissued.
    ``force`` makes a new CA, which invalidates every certificate issued before (device
    certificates under ``devices/`` are left in place but no longer verify).
    """
    paths = PkiPaths.under(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        paths.devices_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise PkiError(f"{directory}: cannot create PKI directory: {exc.strerror}") from exc

    have_ca = paths.ca_cert.exists() or paths.ca_key.exists()
    if force or not have_ca:
        ca_key, ca_cert = _new_ca()
        # Key first: a crash between the two leaves a key without a cert, which the next run
        # reports instead of silently pairing a cert with a key it does not belong to.
        _write_private(paths.ca_key, ca_key)
        _write_public(paths.ca_cert, ca_cert)
        renew_all = True
    else:
        ca_key, ca_cert = _load_ca(paths)
        renew_all = False

    if renew_all or not _leaf_is_current(paths.broker_cert, paths.broker_key, ca_cert):
        _issue_leaf(
            ca_key,
            ca_cert,
            paths.broker_cert,
            paths.broker_key,
            common_name="tidegate-kafka-broker",
            server=True,
            san=[
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                x509.DNSName("localhost"),
            ],
        )
    if renew_all or not _leaf_is_current(paths.gateway_cert, paths.gateway_key, ca_cert):
        _issue_leaf(
            ca_key,
            ca_cert,
            paths.gateway_cert,
            paths.gateway_key,
            common_name=GATEWAY_CN,
            server=False,
            san=[],
        )
    return paths


def issue_device_cert(directory: Path, device_id: str) -> tuple[Path, Path]:
    """Issue ``devices/<device_id>.pem`` and its key, signed by the CA in ``directory``.

    Returns ``(cert_path, key_path)``. An existing certificate for the id is replaced.
    """
    validate_device_id(device_id)
    paths = PkiPaths.under(directory)
    ca_key, ca_cert = _load_ca(paths)
    try:
        paths.devices_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise PkiError(f"{paths.devices_dir}: cannot create directory: {exc.strerror}") from exc
    cert_path, key_path = paths.device_cert(device_id), paths.device_key(device_id)
    _issue_leaf(ca_key, ca_cert, cert_path, key_path, common_name=device_id, server=False, san=[])
    return cert_path, key_path


def issue_crl(directory: Path, revoked: list[Path], out: Path, *, valid_days: int = 30) -> Path:
    """Write ``out``: a PEM CRL of the CA in ``directory`` revoking the certificate files
    ``revoked`` (``broker.revocation.crl_file``). OpenSSL refuses every handshake once it
    has expired, so reissue it before ``valid_days``."""
    ca_key, ca_cert = _load_ca(PkiPaths.under(directory))
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + dt.timedelta(days=valid_days))
    )
    for path in revoked:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise PkiError(f"{path}: not a PEM certificate: {exc}") from exc
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - _BACKDATE)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _atomic_write(out, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return out


def _new_ca() -> tuple[_IssuerKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix keeps two dev CAs distinguishable (tests build a second, foreign CA).
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tidegate dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"tidegate dev CA {secrets.token_hex(4)}"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _load_ca(paths: PkiPaths) -> tuple[_IssuerKey, x509.Certificate]:
    for required in (paths.ca_cert, paths.ca_key):
        if not required.is_file():
            raise PkiError(
                f"{required}: missing; run `tidegate certs init {paths.directory}` first "
                "(or with --force to replace an incomplete CA)"
            )
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"{paths.directory}: cannot read the CA: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{paths.ca_key}: unsupported key type {type(key).__name__}")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise PkiError(f"{paths.ca_key} does not belong to {paths.ca_cert}")
    return key, cert


def _leaf_is_current(cert_path: Path, key_path: Path, ca_cert: x509.Certificate) -> bool:
    """True if the leaf exists, pairs with its key, was signed by ``ca_cert`` and is fresh."""
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return False
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return False
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > _RENEW_BEFORE


def _issue_leaf(
    ca_key: _IssuerKey,
    ca_cert: x509.Certificate,
    cert_path: Path,
    key_path: Path,
    *,
    common_name: str,
    server: bool,
    san: list[x509.GeneralName],
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_private(key_path, key)
    _write_public(cert_path, cert)


def _spki(key: PublicKeyTypes) -> bytes:
    """DER SubjectPublicKeyInfo: a type-independent way to compare two public keys."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_private(path: Path, key: _IssuerKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(path, data, mode=0o600)


def _write_public(path: Path, cert: x509.Certificate) -> None:
    _atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    """Write via a fresh temp file created with ``mode`` and rename it into place.

    Creating the file with its final mode (instead of chmod afterwards) means a private key
    is never readable by others, not even for a moment; a fresh O_EXCL file is needed because
    ``os.open``'s mode is ignored when the file already exists. The rename makes the switch
    atomic, so a reader never sees half a key.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
    except OSError as exc:
        raise PkiError(f"{path}: cannot write: {exc.strerror or exc}") from exc
