"""The local Kafka's SASL_SSL listener: settings, SCRAM bootstrap arguments, dev credentials.

Managed Kafka services (Confluent Cloud, MSK, Event Hubs) authenticate clients with SASL over
TLS rather than client certificates; this listener lets the gateway's SASL path be tested
against the real broker. It runs beside the mutual-TLS listener, on its own port:

- server TLS only (``listener.name.sasl.ssl.client.auth=none``): the client authenticates
  with a user name and password, not with a certificate;
- mechanisms SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN, one dev user for all three;
- SCRAM credentials live in the KRaft metadata log, so they are written when the storage is
  formatted (``StorageTool format --add-scram``, KIP-900); PLAIN users are listed in the
  listener's JAAS config (``user_<name>="<password>"``), inside the 0600 server.properties.

Pure functions except :func:`write_password_file`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.dev.kafka_state import write_private_text

__all__ = [
    "SASL_LISTENER",
    "SASL_MECHANISMS",
    "SASL_USERNAME",
    "SaslUser",
    "new_sasl_user",
    "sasl_bootstrap_string",
    "sasl_listener_settings",
    "scram_format_args",
    "write_password_file",
]

SASL_LISTENER = "SASL"
"""Listener name (mapped to the SASL_SSL protocol); its prefixed configs use it lowercased."""
SASL_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
"""Mechanisms the listener enables, the dev user has credentials for each."""
SASL_USERNAME = "tidegate"
"""The dev user; its password is random per cluster start."""

_SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
_PLAIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"
_PASSWORD_FILE = "sasl-password"


@dataclass(frozen=True)
class SaslUser:
    """A SASL user name and password (the password is kept out of ``repr``)."""

    username: str
    password: str = field(repr=False)


def new_sasl_user(username: str = SASL_USERNAME) -> SaslUser:
    """The dev user with a fresh random password.

    URL-safe base64 only (letters, digits, ``-``, ``_``): nothing that would need quoting in
    JAAS, in ``--add-scram``'s ``[name=...,password=...]`` or in a properties file.
    """
    return SaslUser(username=username, password=secrets.token_urlsafe(24))


def sasl_bootstrap_string(ports: Sequence[int | None]) -> str | None:
    """``127.0.0.1:PORT,...`` over the SASL_SSL listeners, or None unless every node has one."""
    if not ports or any(port is None for port in ports):
        return None
    return ",".join(f"127.0.0.1:{port}" for port in ports)


def sasl_listener_settings(users: Sequence[SaslUser]) -> dict[str, str]:
    """Listener-prefixed broker settings for the SASL_SSL listener (not the listener itself).

    TLS key material falls back to the top-level ``ssl.*`` settings (the broker certificate);
    only client authentication differs. Kafka applies ``ssl.client.auth`` to a SASL_SSL
    listener only when it carries the listener prefix (KIP-684), so ``none`` is set there
    explicitly rather than relying on that rule.
    """
    for user in users:
        _check_plain_token(user.username, "user name")
        _check_plain_token(user.password, "password")
    prefix = f"listener.name.{SASL_LISTENER.lower()}"
    plain_users = " ".join(f'user_{u.username}="{u.password}"' for u in users)
    return {
        f"{prefix}.ssl.client.auth": "none",
        f"{prefix}.sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
        # The broker side of SCRAM needs the login module but no credentials of its own:
        # users come from the metadata log (format --add-scram).
        f"{prefix}.scram-sha-512.sasl.jaas.config": f"{_SCRAM_MODULE} required;",
        f"{prefix}.scram-sha-256.sasl.jaas.config": f"{_SCRAM_MODULE} required;",
        f"{prefix}.plain.sasl.jaas.config": f"{_PLAIN_MODULE} required {plain_users};",
    }


def scram_format_args(users: Sequence[SaslUser]) -> list[str]:
    """``StorageTool format`` arguments creating each user's SCRAM credentials (KIP-900)."""
    args: list[str] = []
    for user in users:
        _check_plain_token(user.username, "user name")
        _check_plain_token(user.password, "password")
        for mechanism in SASL_MECHANISMS:
            if mechanism.startswith("SCRAM-"):
                args += [
                    "--add-scram",
                    f"{mechanism}=[name={user.username},password={user.password}]",
                ]
    return args


def write_password_file(data_dir: Path, user: SaslUser) -> Path:
    """Write the dev password to ``<data_dir>/sasl-password`` (mode 0600, no newline).

    A gateway config can point ``kafka.sasl.password_file`` straight at it.
    """
    path = data_dir / _PASSWORD_FILE
    write_private_text(path, user.password)
    return path


def _check_plain_token(value: str, what: str) -> None:
    # JAAS and --add-scram have their own quoting rules; dev credentials never need them.
    if not value or not all(c.isalnum() or c in "-_" for c in value) or not value.isascii():
        raise ValueError(f"SASL {what} must be ASCII letters, digits, '-' or '_'")
