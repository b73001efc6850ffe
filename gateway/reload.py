"""Reload on SIGHUP: security settings change without a restart (docs/security.md).

What a reload re-reads, from the config file the gateway was started with:

* the password file (``broker.password_file``, and its path), ``allow_anonymous``;
* the revocation list (``broker.revocation``: deny file, CRL);
* the ACL rules and ``on_deny`` (``broker.acl``, ``broker.on_deny``);
* the CA bundle, server certificate and key of each TLS listener, and the CRL, into a new
  SSLContext used from the next handshake on (established connections keep theirs).

Everything is loaded and validated first (:func:`plan_reload`, pure apart from reading
files); any error keeps the whole old configuration, is logged and audited
(``security_reload_failed``) and shown in ``/status`` (``security.reload``). Only then is it
applied, and the live connections that are no longer valid are closed (revoked device id,
fingerprint or CRL serial, removed from the password file or password changed, anonymous
access turned off, certificate not issued by a CA of a changed CA bundle), each audited as
``device_disconnected``, and subscriptions the new ACL no longer allows are removed
(``subscription_revoked``). Connections that remain valid are not touched.

Other config changes (listeners' addresses, buffer, Kafka, classes ...) are not applied:
the reload says which fields need a restart. This module is where later reloadable settings
(routes, limits, log level) belong.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edge.broker import EdgeBroker
from edge.broker_state import Security
from edge.passwords import PasswordFile, PasswordFileError
from edge.revocation import (
    PeerIdentity,
    Revocation,
    RevocationError,
    read_ca_bundle,
    session_verdict,
)
from gateway.config import BrokerConfig, GatewayConfig, ListenerConfig, load_config
from gateway.errors import TidegateError
from gateway.security_setup import broker_security, listener_tls_contexts, revocation

__all__ = ["ReloadPlan", "ReloadResult", "SecurityReloader", "merge_config", "plan_reload"]

log = logging.getLogger(__name__)

_RELOADABLE_BROKER = frozenset({"allow_anonymous", "password_file", "on_deny", "acl", "revocation"})
_SETTLE_S = 0.5
"""Second pass over the live connections this long after the first: a CONNECT that was being
authenticated under the old settings while they were swapped becomes live only after its
session setup, too late for the first pass."""
_TLS_FILES = ("cafile", "certfile", "keyfile")


class ReloadTarget(Protocol):
    """What the reloader needs of the gateway."""

    config: GatewayConfig
    broker: EdgeBroker


@dataclass(frozen=True)
class ReloadResult:
    """One reload attempt, as ``/status`` shows it."""

    at: float
    ok: bool
    trigger: str
    error: str | None = None
    changed: list[str] = field(default_factory=list)
    """Security settings that differ from before (dotted config paths)."""
    restart_needed: list[str] = field(default_factory=list)
    """Changed settings a reload does not apply (kept as they were)."""
    disconnected: list[dict[str, str]] = field(default_factory=list)
    subscriptions_dropped: list[dict[str, str]] = field(default_factory=list)
    """Subscriptions the new ACL no longer allows (removed, also of stored sessions)."""
    revoked_entries: int = 0


def _listener_key(listener: ListenerConfig) -> tuple[str, str, int, bool]:
    return listener.name, listener.host, listener.port, listener.tls


def merge_config(old: GatewayConfig, new: GatewayConfig) -> tuple[GatewayConfig, list[str]]:
    """``old`` with the reloadable security settings of ``new``, and the dotted paths of
    other changes (which need a restart). Pure."""
    restart: list[str] = []
    old_dump, new_dump = old.model_dump(), new.model_dump()
    restart += [key for key in old_dump if key != "broker" and old_dump[key] != new_dump[key]]
    old_broker, new_broker = old_dump["broker"], new_dump["broker"]
    restart += [
        f"broker.{key}"
        for key in old_broker
        if key not in _RELOADABLE_BROKER | {"listeners"} and old_broker[key] != new_broker[key]
    ]
    # A listener keeps its address and kind; only the TLS files of a same listener reload.
    new_listeners = {x.name: x for x in new.broker.listeners}
    listeners = []
    for listener in old.broker.listeners:
        candidate = new_listeners.get(listener.name)
        if candidate is not None and _listener_key(candidate) == _listener_key(listener):
            listeners.append(candidate)
        else:
            listeners.append(listener)
    if [_listener_key(x) for x in old.broker.listeners] != [
        _listener_key(x) for x in new.broker.listeners
    ]:
        restart.append("broker.listeners")
    broker = old.broker.model_copy(
        update={
            **{key: getattr(new.broker, key) for key in _RELOADABLE_BROKER},
            "listeners": listeners,
        }
    )
    return old.model_copy(update={"broker": broker}), restart


def _changed(old: BrokerConfig, new: BrokerConfig) -> list[str]:
    changed = [
        f"broker.{key}"
        for key in sorted(_RELOADABLE_BROKER)
        if getattr(old, key) != getattr(new, key)
    ]
    for before, after in zip(old.listeners, new.listeners, strict=True):
        changed += [
            f"broker.listeners.{after.name}.{name}"
            for name in _TLS_FILES
            if getattr(before, name) != getattr(after, name)
        ]
    return changed


@dataclass(frozen=True)
class ReloadPlan:
    """Everything a reload applies, loaded and validated."""

    config: GatewayConfig
    restart_needed: list[str]
    passwords: PasswordFile | None
    revocation: Revocation
    tls: dict[str, ssl.SSLContext]
    security: Security
    cas: list[x509.Certificate]
    """The CA certificates of every TLS listener."""


def trusted_cas(config: GatewayConfig) -> list[x509.Certificate]:
    """The CA certificates of every TLS listener's ``cafile``."""
    cas: list[x509.Certificate] = []
    for listener in config.broker.listeners:
        if listener.tls and listener.cafile is not None:
            cas += read_ca_bundle(listener.cafile)
    return cas


def _ca_set(cas: list[x509.Certificate]) -> frozenset[bytes]:
    return frozenset(ca.public_bytes(Encoding.DER) for ca in cas)


def plan_reload(current: GatewayConfig, config_path: Path | None, audit: Any) -> ReloadPlan:
    """Read the config file (or keep the current one) and every security file it names;
    raise :class:`TidegateError` (the reason) when anything is invalid. Blocking I/O."""
    new = current if config_path is None else load_config(config_path)
    merged, restart = merge_config(current, new)
    passwords = None
    if merged.broker.password_file is not None:
        passwords = PasswordFile(merged.broker.password_file)
        passwords.load()
    tls = listener_tls_contexts(merged)
    security = dataclasses.replace(broker_security(merged), audit=audit)
    cas = trusted_cas(merged)
    return ReloadPlan(merged, restart, passwords, revocation(merged), tls, security, cas)


class SecurityReloader:
    """Runs reloads one at a time for a gateway (module docstring)."""

    def __init__(self, target: ReloadTarget, config_path: Path | None) -> None:
        self._target = target
        self._config_path = config_path
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[ReloadResult]] = set()
        self.last: ReloadResult | None = None
        self.reloads = 0
        self.failures = 0
        # The CA bundles in force: when a reload changes them, connected TLS devices must
        # have been issued by one of the new CAs. Read once here (small files).
        self._cas = _ca_set(trusted_cas(target.config))

    def request(self, trigger: str = "SIGHUP") -> None:
        """Schedule a reload (signal handler); reloads run one after the other."""
        task = asyncio.get_running_loop().create_task(self.reload(trigger), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, trigger: str = "SIGHUP") -> ReloadResult:
        async with self._lock:
            result = await self._reload(trigger)
        self.last = result
        return result

    async def _reload(self, trigger: str) -> ReloadResult:
        target, broker = self._target, self._target.broker
        audit = broker.security.audit
        try:
            plan = await asyncio.to_thread(plan_reload, target.config, self._config_path, audit)
        except (TidegateError, PasswordFileError, RevocationError, OSError) as exc:
            return self._failed(trigger, str(exc), audit)
        old = target.config
        changed = _changed(old.broker, plan.config.broker)
        broker.authenticator.update(
            allow_anonymous=plan.config.broker.allow_anonymous,
            passwords=plan.passwords,
            revocation=plan.revocation,
        )
        broker.replace_tls_contexts(plan.tls)
        broker.replace_security(plan.security)
        target.config = plan.config
        entries: Mapping[str, str] | None = (
            None if plan.passwords is None else plan.passwords.entries()
        )
        allow_anonymous = plan.config.broker.allow_anonymous
        new_cas = _ca_set(plan.cas)
        cas = None if new_cas == self._cas else plan.cas
        self._cas = new_cas

        def verdict(identity: PeerIdentity) -> str | None:
            return session_verdict(
                identity,
                plan.revocation,
                passwords=entries,
                allow_anonymous=allow_anonymous,
                trusted_cas=cas,
            )

        closed = await broker.disconnect_invalid(verdict)
        await asyncio.sleep(_SETTLE_S)  # see _SETTLE_S
        closed += await broker.disconnect_invalid(verdict)
        acl = plan.security.acl
        dropped = broker.drop_subscriptions(
            lambda device_id, topic_filter: (
                acl is None or acl.may_subscribe(device_id, topic_filter)
            )
        )
        self.reloads += 1
        result = ReloadResult(
            at=time.time(),
            ok=True,
            trigger=trigger,
            changed=changed,
            restart_needed=plan.restart_needed,
            disconnected=[{"device": d, "reason": r} for d, r in closed],
            subscriptions_dropped=[{"device": d, "topic_filter": f} for d, f in dropped],
            revoked_entries=len(plan.revocation),
        )
        log.info(
            "reload (%s): changed %s; %d devices disconnected; revocation list %d entries",
            trigger,
            changed or "nothing",
            len(closed),
            len(plan.revocation),
        )
        if plan.restart_needed:
            log.warning(
                "reload: these changes need a restart and were not applied: %s",
                ", ".join(plan.restart_needed),
            )
        if audit is not None:
            audit.record(
                "security_reload",
                trigger=trigger,
                changed=changed,
                restart_needed=plan.restart_needed,
                disconnected=len(closed),
                subscriptions_dropped=len(dropped),
            )
        return result

    def _failed(self, trigger: str, reason: str, audit: Any) -> ReloadResult:
        self.failures += 1
        log.error("reload (%s) failed, keeping the previous configuration: %s", trigger, reason)
        if audit is not None:
            audit.record("security_reload_failed", trigger=trigger, reason=reason)
        return ReloadResult(at=time.time(), ok=False, trigger=trigger, error=reason)

    def status(self) -> dict[str, Any]:
        """``security.reload`` of ``/status``."""
        last = None if self.last is None else dataclasses.asdict(self.last)
        if last is not None:
            last["age_s"] = round(time.time() - last["at"], 1)
        return {"reloads": self.reloads, "failures": self.failures, "last": last}
