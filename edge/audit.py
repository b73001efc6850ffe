"""Append-only security audit log: one JSON object per line, rotated by size.

Each record has ``ts`` (UTC, ISO 8601), ``event`` and the fields an operator needs
(``device``, ``peer``, ``topic``, ``reason`` ...). When the file would grow past
``max_bytes`` it is renamed to ``<name>.1`` (older ones shift to ``.2`` ... up to ``keep``;
the oldest is deleted), so disk use is bounded by ``(keep + 1) x max_bytes``.

Writes are small, unbuffered appends from the event loop (no fsync: the log is evidence, not a
durability promise). A write that fails (disk full) is counted and logged, never raised: an
audit problem must not take a device connection or the broker down.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["AuditLog"]

log = logging.getLogger(__name__)


class AuditLog:
    """JSON-lines audit log at ``path`` (module docstring)."""

    def __init__(self, path: Path, *, max_bytes: int = 10 << 20, keep: int = 5) -> None:
        if max_bytes < 1024 or keep < 1:
            raise ValueError("audit log: max_bytes >= 1024 and keep >= 1 required")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.records_written = 0
        self.write_failures = 0

    def record(self, event: str, **fields: Any) -> None:
        """Append one record; never raises."""
        entry = {"ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "event": event}
        entry.update(fields)
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rotate_if_needed(len(line))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            self.write_failures += 1
            log.error("audit log %s: write failed (%s): %s", self.path, exc, line.decode().strip())
            return
        self.records_written += 1

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.max_bytes:
            return
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def read(self) -> list[dict[str, Any]]:
        """Records of the current file (tests and ``tidegate`` tooling)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]
