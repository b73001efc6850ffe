"""Device authentication at CONNECT, decided before amqtt touches any session.

Order of checks (first that applies decides):

1. TLS listener: the handshake already required a client certificate from the listener's CA
   (:func:`server_tls_context`, ``CERT_REQUIRED``). The identity is the certificate's subject
   CN, which must equal the MQTT client id, else CONNACK 5 (not authorized).
2. A user name was sent: it must equal the client id and the password must match the
   device's salted scrypt hash in the password file, else CONNACK 4 (bad user name or
   password), or 5 when no password file is configured and anonymous access is off.
   With anonymous access on and no password file, a user name is ignored (old behaviour).
3. No credentials: accepted only with ``allow_anonymous``, else CONNACK 5.

Whatever the method, a device on the revocation list (:mod:`edge.revocation`: its id, its
certificate's fingerprint or serial) is refused with CONNACK 5. An accepted CONNECT carries
the device's :class:`~edge.revocation.PeerIdentity`, so a reload can re-check live
connections. :meth:`DeviceAuthenticator.update` swaps the settings (SIGHUP reload).

Why here and not in an amqtt auth plugin: amqtt deletes the previous clean session of the
client id (its subscriptions included) and takes over a persistent one *before* it asks the
plugins, so an unauthenticated client could still knock a real device's session over.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edge.auth_cache import VerificationCache
from edge.passwords import PasswordFile, hash_password, verify_password
from edge.revocation import PeerIdentity, Revocation, certificate_identity

__all__ = [
    "BAD_USERNAME_PASSWORD",
    "NOT_AUTHORIZED",
    "AuthDecision",
    "DeviceAuthenticator",
    "peer_certificate_cn",
    "server_tls_context",
]

BAD_USERNAME_PASSWORD: Final = 4
NOT_AUTHORIZED: Final = 5

_SCRYPT_WORKERS: Final = 2
"""Password checks running at once. Each needs 16 MiB, which glibc keeps in the worker
thread's arena afterwards: a few dedicated threads bound that memory (asyncio's default pool
has up to 32) and keep a reconnect storm from taking every core."""


def server_tls_context(
    cafile: Path, certfile: Path, keyfile: Path, crlfile: Path | None = None
) -> ssl.SSLContext:
    """A server context that *requires* a client certificate signed by ``cafile`` (and not
    revoked by the PEM CRLs in ``crlfile``, when given).

    amqtt 0.12.1 builds its own with ``CERT_OPTIONAL`` (a client without a certificate gets
    in); this one is handed to the listener instead. With a CRL, OpenSSL refuses a device
    certificate whose issuer has no CRL in the file, or whose CRL has expired.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(cafile))
    context.load_cert_chain(str(certfile), str(keyfile))
    if crlfile is not None:
        context.load_verify_locations(cafile=str(crlfile))  # OpenSSL reads CRLs from PEM
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def peer_certificate_cn(ssl_object: Any) -> str | None:
    """The subject CN of a verified peer certificate, or None (no TLS, no certificate)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


@dataclass(frozen=True, slots=True)
class AuthDecision:
    """The outcome of one CONNECT."""

    accepted: bool
    method: str
    """``certificate``, ``password`` or ``anonymous``."""
    return_code: int = 0
    reason: str = ""
    identity: PeerIdentity | None = None
    """Who connected (accepted CONNECTs)."""

    @property
    def anonymous(self) -> bool:
        return self.method == "anonymous"


@functools.cache
def _scrypt_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_SCRYPT_WORKERS, thread_name_prefix="scrypt")


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def _verify(password: str, encoded: str | None) -> bool:
    # In the worker thread: the first dummy hash costs a scrypt run too.
    return verify_password(password, encoded if encoded is not None else _dummy_hash())


class DeviceAuthenticator:
    """Checks a CONNECT against the certificate, the password file and ``allow_anonymous``."""

    def __init__(self, *, allow_anonymous: bool, password_file: Path | None) -> None:
        self.allow_anonymous = allow_anonymous
        self.passwords = PasswordFile(password_file) if password_file is not None else None
        if self.passwords is not None:
            self.passwords.load()
        self.cache = VerificationCache()
        """Successful checks, so a reconnect does not pay scrypt again (:mod:`edge.auth_cache`)."""
        self.revocation = Revocation()

    def update(
        self, *, allow_anonymous: bool, passwords: PasswordFile | None, revocation: Revocation
    ) -> None:
        """Swap in reloaded settings (``passwords`` already loaded). Cached verifications
        stay valid only for devices whose hash in the new file is unchanged."""
        self.allow_anonymous = allow_anonymous
        self.passwords = passwords
        self.revocation = revocation

    async def check(
        self,
        *,
        client_id: str,
        username: str | None,
        password: str | None,
        certificate_cn: str | None,
        tls: bool,
        certificate_der: bytes | None = None,
    ) -> AuthDecision:
        """Decide a CONNECT (module docstring); revoked devices are refused whatever else."""
        if client_id in self.revocation.device_ids:  # before any scrypt work
            method = "certificate" if tls else "password" if username is not None else "anonymous"
            return AuthDecision(False, method, NOT_AUTHORIZED, "device id revoked (deny list)")
        decision = await self._check(
            client_id=client_id,
            username=username,
            password=password,
            certificate_cn=certificate_cn,
            tls=tls,
            certificate_der=certificate_der,
        )
        if decision.accepted and decision.identity is not None:
            revoked = self.revocation.reason(decision.identity)
            if revoked is not None:
                return AuthDecision(False, decision.method, NOT_AUTHORIZED, revoked)
        return decision

    async def _check(
        self,
        *,
        client_id: str,
        username: str | None,
        password: str | None,
        certificate_cn: str | None,
        tls: bool,
        certificate_der: bytes | None,
    ) -> AuthDecision:
        if tls:
            if certificate_cn is None:  # cannot happen with CERT_REQUIRED; refuse anyway
                return AuthDecision(False, "certificate", NOT_AUTHORIZED, "no client certificate")
            if certificate_cn != client_id:
                return AuthDecision(
                    False,
                    "certificate",
                    NOT_AUTHORIZED,
                    f"certificate CN {certificate_cn!r} differs from client id",
                )
            try:
                identity = certificate_identity(client_id, certificate_der)
            except ValueError:  # OpenSSL verified it; cryptography should parse it too
                identity = PeerIdentity(client_id, "certificate")
            return AuthDecision(True, "certificate", identity=identity)
        if username is not None and (self.passwords is not None or not self.allow_anonymous):
            return await self._check_password(client_id, username, password)
        if self.allow_anonymous:
            return AuthDecision(True, "anonymous", identity=PeerIdentity(client_id, "anonymous"))
        return AuthDecision(False, "anonymous", NOT_AUTHORIZED, "anonymous access is disabled")

    async def _check_password(
        self, client_id: str, username: str, password: str | None
    ) -> AuthDecision:
        if self.passwords is None:
            return AuthDecision(False, "password", NOT_AUTHORIZED, "no password file configured")
        if username != client_id:
            return AuthDecision(
                False, "password", NOT_AUTHORIZED, "user name differs from client id"
            )
        encoded = self.passwords.lookup(username)
        if password is None:
            return AuthDecision(False, "password", BAD_USERNAME_PASSWORD, "no password")
        identity = PeerIdentity(client_id, "password", credential=encoded)
        if encoded is not None and self.cache.verified(username, password, encoded):
            return AuthDecision(True, "password", identity=identity)
        # scrypt costs tens of milliseconds of CPU: keep it off the event loop. An unknown
        # device is checked against a dummy hash so the answer takes as long as for a known
        # one (no device-id enumeration by timing).
        loop = asyncio.get_running_loop()
        matched = await loop.run_in_executor(_scrypt_pool(), _verify, password, encoded)
        if encoded is None:
            return AuthDecision(False, "password", BAD_USERNAME_PASSWORD, "unknown device")
        if not matched:
            return AuthDecision(False, "password", BAD_USERNAME_PASSWORD, "wrong password")
        if self.passwords is None or self.passwords.lookup(username) != encoded:
            # A reload or `tidegate devices` changed the entry while scrypt ran.
            return AuthDecision(False, "password", BAD_USERNAME_PASSWORD, "password changed")
        self.cache.remember(username, password, encoded)
        return AuthDecision(True, "password", identity=identity)
