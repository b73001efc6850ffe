"""Turns the ``[broker]`` security settings into what :class:`edge.broker.EdgeBroker` takes:
server TLS contexts per listener, the password file, and the ACL/deny/audit settings."""

from __future__ import annotations

import ssl
from pathlib import Path

from edge.acl import AclPolicy
from edge.audit import AuditLog
from edge.broker import EdgeBrokerError
from edge.broker_state import Security
from edge.device_auth import server_tls_context
from edge.quotas import Quotas
from gateway.config import GatewayConfig

__all__ = ["broker_security", "listener_tls_contexts"]


def listener_tls_contexts(config: GatewayConfig) -> dict[str, ssl.SSLContext]:
    """Listener name -> TLS context requiring a client certificate (TLS listeners only)."""
    contexts: dict[str, ssl.SSLContext] = {}
    for listener in config.broker.listeners:
        if not listener.tls:
            continue
        files = (listener.cafile, listener.certfile, listener.keyfile)
        if any(path is None for path in files):  # the config model already refuses this
            raise EdgeBrokerError(f"listener {listener.name}: tls needs cafile/certfile/keyfile")
        cafile, certfile, keyfile = (Path(str(path)) for path in files)
        try:
            contexts[listener.name] = server_tls_context(cafile, certfile, keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise EdgeBrokerError(f"listener {listener.name}: TLS files unusable: {exc}") from exc
    return contexts


def broker_security(config: GatewayConfig) -> Security:
    """ACL (when enabled), deny policy, quotas and the audit log under ``gateway.data_dir``."""
    broker = config.broker
    acl = (
        AclPolicy.with_extra(publish=broker.acl.publish, subscribe=broker.acl.subscribe)
        if broker.acl.enabled
        else None
    )
    audit = AuditLog(config.audit_path, max_bytes=broker.audit.max_bytes, keep=broker.audit.keep)
    settings = config.quotas.settings()
    quotas = None if settings is None else Quotas(settings, audit)
    return Security(acl=acl, on_deny=broker.on_deny, audit=audit, quotas=quotas)
