"""Turns the ``[broker]`` security settings into what :class:`edge.broker.EdgeBroker` takes:
server TLS contexts per listener, the password file, the ACL/deny/audit settings and the
revocation list. Used at start and by every reload (:mod:`gateway.reload`)."""

from __future__ import annotations

import ssl
from pathlib import Path

from edge.acl import AclPolicy
from edge.audit import AuditLog
from edge.broker import EdgeBrokerError
from edge.broker_state import Security
from edge.device_auth import server_tls_context
from edge.quotas import Quotas
from edge.revocation import Revocation, read_crl, read_deny_file
from edge.tenant_share import TenantShares
from edge.tenants import TenantMap
from gateway.config import GatewayConfig

__all__ = [
    "broker_security",
    "listener_tls_contexts",
    "revocation",
    "tenant_map",
    "tenant_shares",
]


def tenant_map(config: GatewayConfig) -> TenantMap | None:
    """The device -> tenant map of ``[tenants]``, or None without tenants."""
    tenants = config.tenants
    if tenants is None:
        return None
    return TenantMap(
        patterns={name: tuple(globs) for name, globs in tenants.devices.items()},
        default_tenant=tenants.default_tenant,
        mode=tenants.mode,
    )


def tenant_shares(config: GatewayConfig, tenants: TenantMap | None) -> TenantShares | None:
    """The per-tenant buffer caps of ``tenants.max_buffer_share``, or None."""
    share = None if config.tenants is None else config.tenants.max_buffer_share
    if tenants is None or share is None:
        return None
    return TenantShares(
        tenants.tenant_of,
        max_rows=max(1, int(config.buffer.max_rows * share)),
        max_bytes=max(1, int(config.buffer.max_bytes * share)),
    )


def listener_tls_contexts(config: GatewayConfig) -> dict[str, ssl.SSLContext]:
    """Listener name -> TLS context requiring a client certificate (TLS listeners only)."""
    contexts: dict[str, ssl.SSLContext] = {}
    crl = config.broker.revocation.crl_file
    for listener in config.broker.listeners:
        if not listener.tls:
            continue
        files = (listener.cafile, listener.certfile, listener.keyfile)
        if any(path is None for path in files):  # the config model already refuses this
            raise EdgeBrokerError(f"listener {listener.name}: tls needs cafile/certfile/keyfile")
        cafile, certfile, keyfile = (Path(str(path)) for path in files)
        try:
            contexts[listener.name] = server_tls_context(cafile, certfile, keyfile, crl)
        except (ssl.SSLError, OSError) as exc:
            raise EdgeBrokerError(f"listener {listener.name}: TLS files unusable: {exc}") from exc
    return contexts


def broker_security(config: GatewayConfig, tenants: TenantMap | None = None) -> Security:
    """ACL (when enabled), deny policy, quotas, the audit log under ``gateway.data_dir``, and the
    tenant check at CONNECT (with ``[tenants]``; built from ``config`` when not given, so a
    caller that rebuilds the security settings, e.g. on reload, keeps the tenant checks)."""
    if tenants is None:
        tenants = tenant_map(config)
    broker = config.broker
    acl = (
        AclPolicy.with_extra(
            publish=broker.acl.publish,
            subscribe=broker.acl.subscribe,
            tenant_of=None if tenants is None else tenants.tenant_of,
        )
        if broker.acl.enabled
        else None
    )
    audit = AuditLog(config.audit_path, max_bytes=broker.audit.max_bytes, keep=broker.audit.keep)
    settings = config.quotas.settings()
    quotas = None if settings is None else Quotas(settings, audit)
    return Security(
        acl=acl,
        on_deny=broker.on_deny,
        audit=audit,
        tenant_of=None if tenants is None else tenants.resolve,
        quotas=quotas,
    )


def revocation(config: GatewayConfig) -> Revocation:
    """The deny list and CRL serials; raises :class:`edge.revocation.RevocationError`."""
    settings = config.broker.revocation
    devices: frozenset[str] = frozenset()
    fingerprints: frozenset[str] = frozenset()
    if settings.deny_file is not None:
        devices, fingerprints = read_deny_file(settings.deny_file)
    crl = frozenset() if settings.crl_file is None else read_crl(settings.crl_file)
    return Revocation(device_ids=devices, fingerprints=fingerprints, crl_serials=crl)
