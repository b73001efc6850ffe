"""Per-tenant share of the buffer: one tenant's backlog cannot take the whole disk.

The buffer counts each tenant's buffered rows and payload bytes next to its per-class
counters (same call sites: commit, release, eviction, expiry, dead letters, replay). The
group committer asks :meth:`TenantShares.admit` before it gives a publish room; a tenant at
its cap is treated as if the buffer were full for it alone: its ``block`` classes wait (the
PUBACK is withheld, then the device is disconnected after ``buffer.block_timeout_s``), its
lossy classes and QoS 0 drop the new message (reason ``tenant buffer share full``; never
another tenant's oldest row), while other tenants go on.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["TENANT_SHARE_DROP", "TenantShares"]

TENANT_SHARE_DROP = "tenant buffer share full"
"""Drop-ledger reason of a message dropped because its tenant is at its buffer share."""


class TenantShares:
    """Rows and payload bytes per tenant, and the cap on each."""

    def __init__(
        self, tenant_of: Callable[[str], str | None], *, max_rows: int, max_bytes: int
    ) -> None:
        self._tenant_of = tenant_of
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.rows: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def count(self, device_id: str, delta: int, nbytes: int) -> None:
        """``delta`` rows of ``nbytes`` payload bytes each were added (or removed, < 0)."""
        tenant = self._tenant_of(device_id) or ""
        rows = max(0, self.rows.get(tenant, 0) + delta)
        size = max(0, self.bytes.get(tenant, 0) + delta * nbytes)
        if rows:
            self.rows[tenant], self.bytes[tenant] = rows, size
        else:
            self.rows.pop(tenant, None)
            self.bytes.pop(tenant, None)

    def reset(self) -> None:
        self.rows.clear()
        self.bytes.clear()

    def admit(self, device_id: str, size: int, taken: dict[str, list[int]]) -> bool:
        """Whether a row of ``size`` bytes fits the device's tenant's share, counting the
        rows already ``taken`` into the batch being built (updated when it fits)."""
        tenant = self._tenant_of(device_id) or ""
        pending = taken.setdefault(tenant, [0, 0])
        rows = self.rows.get(tenant, 0) + pending[0] + 1
        nbytes = self.bytes.get(tenant, 0) + pending[1] + size
        if rows > self.max_rows or nbytes > self.max_bytes:
            return False
        pending[0] += 1
        pending[1] += size
        return True

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Tenant -> rows, payload bytes and the caps (status)."""
        return {
            tenant or "(none)": {
                "rows": rows,
                "payload_bytes": self.bytes.get(tenant, 0),
                "max_rows": self.max_rows,
                "max_bytes": self.max_bytes,
            }
            for tenant, rows in sorted(self.rows.items())
        }
