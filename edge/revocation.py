"""Revoked devices: a deny list of device ids and certificate fingerprints, and CRLs.

Who a connected device is (:class:`PeerIdentity`) is recorded when its CONNECT is accepted,
so a reload can ask of every live connection "is it still allowed?" (:func:`session_verdict`)
and disconnect the ones that are not. Pure decisions and file parsing; no sockets.

Deny file (``broker.revocation.deny_file``), one entry per line, ``#`` comments::

    dev-0042                      # a device id: refused however it authenticates
    sha256:3f5a...c1              # a certificate's SHA-256 fingerprint (hex; ':' allowed)

CRL file (``broker.revocation.crl_file``): PEM, one or more CRLs, from the device CA(s).
New TLS handshakes check it in OpenSSL (``VERIFY_CRL_CHECK_LEAF``, see
:func:`edge.device_auth.server_tls_context`); connected devices are checked against the
revoked serial numbers of the CRL's issuer on reload.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from gateway.errors import TidegateError

__all__ = [
    "PeerIdentity",
    "Revocation",
    "RevocationError",
    "certificate_identity",
    "issued_by_any",
    "normalise_fingerprint",
    "read_ca_bundle",
    "read_crl",
    "read_deny_file",
    "session_verdict",
]

_FINGERPRINT_PREFIX: Final = "sha256:"
_PEM_CRL: Final = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


class RevocationError(TidegateError):
    """A deny list or CRL file is unreadable or invalid."""


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """How one connection authenticated (recorded at CONNECT)."""

    device_id: str
    method: str
    """``certificate``, ``password`` or ``anonymous``."""
    fingerprint: str | None = None
    """Certificate: SHA-256 of its DER, lowercase hex."""
    serial: int | None = None
    """Certificate: serial number."""
    issuer: bytes | None = None
    """Certificate: DER of the issuer name (CRL entries are per issuer)."""
    credential: str | None = None
    """Password: the encoded hash the password was verified against."""
    certificate: bytes | None = field(default=None, repr=False)
    """Certificate: its DER (re-checked when the CA bundle changes)."""


def certificate_identity(device_id: str, der: bytes | None) -> PeerIdentity:
    """The identity of a device that authenticated with the certificate ``der``."""
    if not der:
        return PeerIdentity(device_id, "certificate")
    cert = x509.load_der_x509_certificate(der)
    return PeerIdentity(
        device_id,
        "certificate",
        fingerprint=hashlib.sha256(der).hexdigest(),
        serial=cert.serial_number,
        issuer=cert.issuer.public_bytes(),
        certificate=der,
    )


def normalise_fingerprint(text: str) -> str:
    """``sha256:AB:CD...`` or plain hex -> 64 lowercase hex digits; ValueError otherwise."""
    value = text.strip().lower().removeprefix(_FINGERPRINT_PREFIX).replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"not a SHA-256 fingerprint: {text!r}")
    return value


@dataclass(frozen=True)
class Revocation:
    """What is revoked right now."""

    device_ids: frozenset[str] = frozenset()
    fingerprints: frozenset[str] = frozenset()
    crl_serials: frozenset[tuple[bytes, int]] = frozenset()
    """(issuer name DER, serial number) of every certificate the CRLs revoke."""

    def __len__(self) -> int:
        return len(self.device_ids) + len(self.fingerprints) + len(self.crl_serials)

    def reason(self, identity: PeerIdentity) -> str | None:
        """Why ``identity`` is revoked, or None."""
        if identity.device_id in self.device_ids:
            return "device id revoked (deny list)"
        if identity.fingerprint is not None and identity.fingerprint in self.fingerprints:
            return "certificate revoked (deny list fingerprint)"
        if (
            identity.issuer is not None
            and identity.serial is not None
            and (identity.issuer, identity.serial) in self.crl_serials
        ):
            return "certificate revoked (CRL)"
        return None


def read_deny_file(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(device ids, fingerprints) of a deny file; raises :class:`RevocationError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RevocationError(f"{path}: cannot read: {exc}") from exc
    devices: set[str] = set()
    fingerprints: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.lower().startswith(_FINGERPRINT_PREFIX):
            try:
                fingerprints.add(normalise_fingerprint(line))
            except ValueError as exc:
                raise RevocationError(f"{path}:{number}: {exc}") from exc
        elif any(c.isspace() for c in line):
            raise RevocationError(f"{path}:{number}: one device id or sha256:<hex> per line")
        else:
            devices.add(line)
    return frozenset(devices), frozenset(fingerprints)


def read_crl(path: Path) -> frozenset[tuple[bytes, int]]:
    """Revoked (issuer, serial) pairs of a PEM CRL file (one or more CRLs)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RevocationError(f"{path}: cannot read: {exc}") from exc
    pems = _PEM_CRL.findall(data)
    if not pems:
        raise RevocationError(f"{path}: no PEM CRL (-----BEGIN X509 CRL-----) in it")
    try:
        crls = [x509.load_pem_x509_crl(pem) for pem in pems]
    except ValueError as exc:
        raise RevocationError(f"{path}: invalid CRL: {exc}") from exc
    return frozenset(
        (crl.issuer.public_bytes(), entry.serial_number) for crl in crls for entry in crl
    )


def read_ca_bundle(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM CA bundle; raises :class:`RevocationError`."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RevocationError(f"{path}: not a PEM CA bundle: {exc}") from exc


def issued_by_any(der: bytes, cas: Sequence[x509.Certificate]) -> bool:
    """True if the certificate ``der`` was signed directly by one of ``cas``."""
    cert = x509.load_der_x509_certificate(der)
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def session_verdict(
    identity: PeerIdentity,
    revocation: Revocation,
    *,
    passwords: Mapping[str, str] | None,
    allow_anonymous: bool,
    trusted_cas: Sequence[x509.Certificate] | None = None,
) -> str | None:
    """Why a connected device must go after a reload, or None if it stays. ``trusted_cas``:
    the new CA bundle when it changed (certificates must be issued directly by one of them)."""
    revoked = revocation.reason(identity)
    if revoked is not None:
        return revoked
    if (
        identity.method == "certificate"
        and trusted_cas is not None
        and identity.certificate is not None
        and not issued_by_any(identity.certificate, trusted_cas)
    ):
        return "certificate no longer trusted (CA bundle changed)"
    if identity.method == "password":
        current = None if passwords is None else passwords.get(identity.device_id)
        if current is None:
            return "removed from the password file"
        if current != identity.credential:
            return "password changed"
    if identity.method == "anonymous" and not allow_anonymous:
        return "anonymous access turned off"
    return None
