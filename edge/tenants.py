"""Tenants: which tenant a device belongs to, and where its data goes. Pure code, no I/O.

A device's tenant is decided by its id alone (the authenticated identity: the client id,
equal to the certificate CN or the password-file user name), matched against the
configured glob patterns of each tenant (``[tenants.devices]``). Deciding from the id keeps
every part consistent without plumbing: the CONNECT check, the ACL's ``{tenant}``
placeholder, the forwarder's topic choice, the command check and the per-tenant buffer
share all call :meth:`TenantMap.tenant_of`.

A device that matches no tenant's patterns (and no ``default_tenant`` is set), or matches the
patterns of two tenants, has no tenant: it is refused at CONNECT, so its data never lands in
any tenant's topics.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from edge.commands_model import Command, Rejection

__all__ = [
    "PLACEHOLDER",
    "TENANT_HEADER",
    "UNASSIGNED",
    "TenantMap",
    "check_command_tenant",
    "claimed_tenant_mismatch",
    "render",
    "render_all",
]

PLACEHOLDER: Final = "{tenant}"
TENANT_HEADER: Final = "tg-tenant"
UNASSIGNED: Final = "_unassigned"
"""Stands for the tenant in a topic template when a buffered row's device belongs to no
tenant any more (the config changed while its backlog waited). Configured tenant names
start with a letter or digit, so it never names a real tenant."""

_CACHE_LIMIT: Final = 65_536


def render(template: str, tenant: str | None) -> str:
    """``template`` with ``{tenant}`` replaced (``_unassigned`` for None)."""
    return template.replace(PLACEHOLDER, UNASSIGNED if tenant is None else tenant)


def render_all(template: str, tenants: Iterable[str]) -> dict[str, str]:
    """Tenant -> its topic, for every tenant (one entry when the template has no placeholder)."""
    return {tenant: render(template, tenant) for tenant in tenants}


@dataclass(frozen=True)
class TenantMap:
    """Device id -> tenant, by glob patterns (``fnmatch``, case-sensitive)."""

    patterns: Mapping[str, Sequence[str]]
    """Tenant -> device-id glob patterns."""
    default_tenant: str | None = None
    """Tenant of a device that matches no pattern; None: such a device has no tenant."""
    mode: Literal["topic", "header"] = "topic"
    """``topic``: each tenant's data goes to its own topics (``{tenant}`` in the templates);
    ``header``: shared topics, every record carries a ``tg-tenant`` header."""
    _cache: dict[str, tuple[str | None, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def names(self) -> list[str]:
        """Every configured tenant (the default one included)."""
        names = list(self.patterns)
        if self.default_tenant is not None and self.default_tenant not in names:
            names.append(self.default_tenant)
        return names

    def resolve(self, device_id: str) -> tuple[str | None, str]:
        """``(tenant, why)``; tenant None when the device has none (``why`` says why)."""
        found = self._cache.get(device_id)
        if found is not None:
            return found
        matched = [
            tenant
            for tenant, globs in self.patterns.items()
            if any(fnmatch.fnmatchcase(device_id, glob) for glob in globs)
        ]
        result: tuple[str | None, str]
        if len(matched) == 1:
            result = (matched[0], "pattern")
        elif len(matched) > 1:
            result = (None, f"device id matches the patterns of tenants {', '.join(matched)}")
        elif self.default_tenant is not None:
            result = (self.default_tenant, "default_tenant")
        else:
            result = (None, "device id matches no tenant's patterns")
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[device_id] = result
        return result

    def tenant_of(self, device_id: str) -> str | None:
        """The device's tenant, or None."""
        return self.resolve(device_id)[0]


@functools.cache
def _mismatch_reason(claimed: str, actual: str | None) -> str:
    if actual is None:
        return f"device belongs to no tenant (command came for tenant {claimed})"
    return f"device belongs to another tenant (command came for tenant {claimed})"


def claimed_tenant_mismatch(tenants: TenantMap, claimed: str | None, device_id: str) -> str | None:
    """Why a command claimed for tenant ``claimed`` may not reach ``device_id`` (None: ok).

    ``claimed`` is the tenant of the command topic (topic mode) or the record's ``tg-tenant``
    header (header mode); None when the record did not say.
    """
    if claimed is None:
        return "no tenant: the command record carries no tg-tenant header"
    actual = tenants.tenant_of(device_id)
    if actual != claimed:
        return _mismatch_reason(claimed, actual)
    return None


def check_command_tenant(
    tenants: TenantMap, claimed: str | None, item: Command | Rejection
) -> Command | Rejection:
    """A command that may reach its device, or a rejection reported to ``claimed``."""
    if isinstance(item, Rejection):
        return dataclasses.replace(item, tenant=claimed)
    reason = claimed_tenant_mismatch(tenants, claimed, item.device_id)
    if reason is None:
        return item
    return Rejection(reason, item.command_id, item.device_id, tenant=claimed, remember=False)
