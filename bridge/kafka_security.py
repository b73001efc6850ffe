"""How every Kafka client of the gateway connects and authenticates, decided in one place.

Two ways in, chosen by ``kafka.security_protocol``:

- ``SSL``: mutual TLS, the gateway presents its client certificate (``kafka.tls``);
- ``SASL_SSL``: TLS (server certificate only, unless a client certificate is configured too)
  plus a SASL login (``kafka.sasl``: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN), as managed
  services (Confluent Cloud, MSK, Event Hubs) use.

Every aiokafka client the gateway, its CLI and the verifier build takes its connection
settings from :func:`client_security` (``AIOKafkaProducer(..., **security.kwargs())``), so
a new client cannot forget the SASL settings. The password is held in a field kept out of
``repr`` and is never put in a log line or an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError as AioKafkaError
from aiokafka.errors import SaslAuthenticationFailed, UnsupportedSaslMechanismError

from bridge.tls import build_ssl_context
from gateway.config import KafkaConfig
from gateway.errors import KafkaAuthError

__all__ = [
    "ClientSecurity",
    "SaslLogin",
    "client_security",
    "diagnose_sasl",
    "explain_login_failure",
    "sasl_login",
]


@dataclass(frozen=True)
class SaslLogin:
    """A SASL mechanism, user name and password, ready for aiokafka."""

    mechanism: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class ClientSecurity:
    """TLS context and optional SASL login of one Kafka client.

    No TLS context means plaintext; that exists only for tests of the verifier against
    plaintext listeners. SASL without TLS is refused: the gateway never sends a password
    (PLAIN) or a SCRAM exchange over an unencrypted connection.
    """

    ssl_context: ssl.SSLContext | None
    sasl: SaslLogin | None = None

    def __post_init__(self) -> None:
        if self.sasl is not None and self.ssl_context is None:
            raise ValueError("SASL needs TLS: no SASL_PLAINTEXT")

    @property
    def protocol(self) -> str:
        """aiokafka's ``security_protocol``."""
        if self.sasl is not None:
            return "SASL_SSL"
        return "PLAINTEXT" if self.ssl_context is None else "SSL"

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin, connection)."""
        options: dict[str, Any] = {
            "security_protocol": self.protocol,
            "ssl_context": self.ssl_context,
        }
        if self.sasl is not None:
            options["sasl_mechanism"] = self.sasl.mechanism
            options["sasl_plain_username"] = self.sasl.username
            options["sasl_plain_password"] = self.sasl.password
        return options


def sasl_login(config: KafkaConfig) -> SaslLogin | None:
    """The configured SASL login, the password read now (a file is read on every call, so a
    rotated password is used by the next client built). None with mutual TLS.

    Raises :class:`KafkaAuthError` naming the field when the password file cannot be read or
    is empty.
    """
    sasl = config.sasl
    if config.security_protocol != "SASL_SSL" or sasl is None:
        return None
    if sasl.password is not None:
        password = sasl.password.get_secret_value()
    else:
        path = sasl.password_file
        assert path is not None  # the config model requires one of the two
        try:
            password = path.read_text(encoding="utf-8").rstrip("\r\n")
        except FileNotFoundError as exc:
            raise KafkaAuthError(f"kafka.sasl.password_file: file not found: {path}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise KafkaAuthError(f"kafka.sasl.password_file: cannot read {path}: {reason}") from exc
        if not password:
            raise KafkaAuthError(f"kafka.sasl.password_file: {path} is empty")
    return SaslLogin(mechanism=sasl.mechanism, username=sasl.username, password=password)


def client_security(config: KafkaConfig) -> ClientSecurity:
    """TLS context and SASL login for a client of the configured cluster.

    Raises :class:`gateway.errors.KafkaTlsError` or :class:`KafkaAuthError` naming the
    config field when the material cannot be loaded.
    """
    return ClientSecurity(ssl_context=build_ssl_context(config.tls), sasl=sasl_login(config))


async def diagnose_sasl(
    config: KafkaConfig, security: ClientSecurity, *, timeout_s: float = 10.0
) -> str | None:
    """Log in once on the first bootstrap server to say *why* SASL fails.

    aiokafka turns a refused login into "Unable to bootstrap"; an operator needs "the broker
    refused user X's credentials". Returns None when the login works or the problem is not
    SASL (TLS and reachability are diagnosed before this).
    """
    if security.sasl is None:
        return None
    host, _, port = config.bootstrap_servers[0].rpartition(":")
    where = f"{host}:{port}"
    login = security.sasl
    conn = None
    try:
        async with asyncio.timeout(timeout_s):
            conn = await create_conn(
                host.strip("[]"),
                int(port),
                client_id=config.client_id,
                request_timeout_ms=int(timeout_s * 1000),
                **security.kwargs(),
            )
    except SaslAuthenticationFailed as exc:
        return (
            f"Kafka at {where} refused the SASL login of user {login.username!r} "
            f"({login.mechanism}): {_broker_message(exc)}; check kafka.sasl.username and "
            "the password"
        )
    except UnsupportedSaslMechanismError as exc:
        return f"Kafka at {where} does not offer {login.mechanism}: {_broker_message(exc)}"
    except (AioKafkaError, OSError, TimeoutError):
        return None
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
    return None


async def explain_login_failure(
    config: KafkaConfig, security: ClientSecurity, exc: BaseException
) -> None:
    """Raise :class:`KafkaAuthError` (from ``exc``) when a refused SASL login is why a client
    could not start; return (the caller re-raises ``exc``) otherwise."""
    reason = await diagnose_sasl(config, security)
    if reason is not None:
        raise KafkaAuthError(reason) from exc


def _broker_message(exc: AioKafkaError) -> str:
    # aiokafka puts the broker's error message in args; the class docstring is the fallback.
    text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else ""
    return text or type(exc).__name__
