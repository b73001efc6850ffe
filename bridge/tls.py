"""SSL contexts for Kafka clients, built from config, with errors that name the bad file."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from gateway.config import KafkaTlsConfig
from gateway.errors import KafkaTlsError

__all__ = ["build_ssl_context"]


def build_ssl_context(tls: KafkaTlsConfig) -> ssl.SSLContext:
    """A client context: verify the brokers against the system's trusted CAs plus ``cafile``,
    and present our certificate when one is configured (mutual TLS).

    Problems are reported with the config field and file that caused them, because
    "SSL: PEM lib" alone sends operators hunting.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = tls.check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cafile = tls.cafile
    if cafile is not None:
        _load(lambda: context.load_verify_locations(cafile=str(cafile)), "cafile", cafile)
    if tls.certfile is None or tls.keyfile is None:
        return context
    try:
        context.load_cert_chain(certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    except FileNotFoundError as exc:
        raise KafkaTlsError(f"kafka.tls: file not found: {exc.filename}") from exc
    except ssl.SSLError as exc:
        raise KafkaTlsError(
            f"kafka.tls.certfile/keyfile: cannot load the client certificate "
            f"{tls.certfile} with key {tls.keyfile}: {exc.reason or exc}"
            " (is the key the certificate's, unencrypted PEM?)"
        ) from exc
    except OSError as exc:
        raise KafkaTlsError(f"kafka.tls: cannot read {exc.filename}: {exc.strerror}") from exc
    return context


def _load(action: Callable[[], None], field: str, path: Path) -> None:
    try:
        action()
    except FileNotFoundError as exc:
        raise KafkaTlsError(f"kafka.tls.{field}: file not found: {path}") from exc
    except ssl.SSLError as exc:
        raise KafkaTlsError(
            f"kafka.tls.{field}: {path} holds no usable PEM certificate: {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        raise KafkaTlsError(f"kafka.tls.{field}: cannot read {path}: {exc.strerror}") from exc
