"""Ack ledger (what the simulator got PUBACKs for) and drop ledger (what the gateway dropped).

Both are JSON lines, one object per line, documented in docs/simulator.md:

* ack ledger: a header line ``{"ledger": "tidegate-ack", "version": 1, "run_id": ...}``
  then one line per PUBACKed message:
  ``{"device_id", "class", "msg_id", "seq", "run_id", "acked_ms"}``. Several headers may
  appear (shards of a multi-process run are concatenated); readers skip them.
* drop ledger (written by the gateway): one line per message dropped by policy, with at least
  ``device_id``, ``class``, ``reason`` and ``msg_id`` (the envelope id) and/or
  ``gateway_message_id`` (the ``tg-message-id``); ``seq`` is used when present.

JSON lines because the file is written as acks arrive and must stay readable after the writer
was killed: every flushed line is complete, and readers ignore an unterminated last line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from gateway.errors import TidegateError

__all__ = [
    "ACK_LEDGER_KIND",
    "AckEntry",
    "AckLedgerWriter",
    "DropEntry",
    "LedgerError",
    "concat_ledgers",
    "read_ack_ledger",
    "read_drop_ledger",
]

ACK_LEDGER_KIND = "tidegate-ack"
_VERSION = 1


class LedgerError(TidegateError):
    """A ledger file cannot be read or written; the message names file and line."""


@dataclass(frozen=True, slots=True)
class AckEntry:
    """One message the simulator got a PUBACK for: the gateway promised to deliver it."""

    device_id: str
    class_name: str
    msg_id: str
    seq: int
    run_id: str
    acked_ms: int


@dataclass(frozen=True, slots=True)
class DropEntry:
    """One message the gateway dropped by a configured policy (lossy class), with the reason."""

    device_id: str
    class_name: str
    reason: str
    msg_id: str | None = None
    gateway_message_id: str | None = None
    seq: int | None = None


class AckLedgerWriter:
    """Buffered JSON-lines writer for the ack ledger.

    Appends go to memory; the buffer is written when it holds ``flush_lines`` lines, when
    ``flush_interval_s`` passed since the last write (checked on append and by
    :meth:`maybe_flush`, which the fleet calls every second), and on :meth:`close`. Writes
    are plain blocking writes of at most ``flush_lines`` lines: tens of kilobytes to the page
    cache, cheaper than a thread hop per flush.
    """

    def __init__(
        self,
        path: Path,
        *,
        run_id: str,
        flush_lines: int = 2000,
        flush_interval_s: float = 1.0,
        header: bool = True,
    ) -> None:
        self.path = path
        self._flush_lines = flush_lines
        self._flush_interval_s = flush_interval_s
        self._lines: list[str] = []
        self._last_flush = time.monotonic()
        self.count = 0
        try:
            self._file: IO[str] | None = path.open("w", encoding="utf-8")
        except OSError as exc:
            raise LedgerError(f"{path}: cannot create ledger: {exc.strerror}") from exc
        if header:
            head = {"ledger": ACK_LEDGER_KIND, "version": _VERSION, "run_id": run_id}
            head["created_ms"] = int(time.time() * 1000)
            self._lines.append(json.dumps(head))

    def append(self, entry: AckEntry) -> None:
        """Record one PUBACK."""
        self._lines.append(
            json.dumps(
                {
                    "device_id": entry.device_id,
                    "class": entry.class_name,
                    "msg_id": entry.msg_id,
                    "seq": entry.seq,
                    "run_id": entry.run_id,
                    "acked_ms": entry.acked_ms,
                },
                separators=(",", ":"),
            )
        )
        self.count += 1
        if len(self._lines) >= self._flush_lines:
            self.flush()

    def maybe_flush(self) -> None:
        """Write the buffer if the flush interval passed."""
        if self._lines and time.monotonic() - self._last_flush >= self._flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Write buffered lines and hand them to the OS."""
        self._last_flush = time.monotonic()
        if not self._lines or self._file is None:
            return
        data = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot write ledger: {exc.strerror}") from exc

    def close(self) -> None:
        """Flush and close; idempotent."""
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> AckLedgerWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise LedgerError(f"{path}: cannot open ledger: {exc.strerror}") from exc
    with handle:
        lineno = 0
        for raw in handle:
            lineno += 1
            if not raw.endswith("\n"):
                # The writer was killed mid-line: everything flushed before is complete.
                return
            line = raw.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LedgerError(f"{path}:{lineno}: not JSON: {exc.msg}") from exc
            if not isinstance(item, dict):
                raise LedgerError(f"{path}:{lineno}: not a JSON object")
            yield lineno, item


def _field(item: dict[str, Any], key: str, kind: type, where: str, *, required: bool) -> Any:
    value = item.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        need = "integer" if kind is int else "string"
        raise LedgerError(f"{where}: field {key!r} missing or not a {need}")
    return value


def read_ack_ledger(path: Path) -> Iterator[AckEntry]:
    """Entries of an ack ledger, in file order; header lines are skipped."""
    for lineno, item in _json_lines(path):
        if "ledger" in item:
            if item["ledger"] != ACK_LEDGER_KIND:
                raise LedgerError(f"{path}:{lineno}: not an ack ledger ({item['ledger']!r})")
            continue
        where = f"{path}:{lineno}"
        msg_id = _field(item, "msg_id", str, where, required=True)
        yield AckEntry(
            device_id=_field(item, "device_id", str, where, required=True),
            class_name=_field(item, "class", str, where, required=True),
            msg_id=msg_id,
            seq=_field(item, "seq", int, where, required=True),
            run_id=_field(item, "run_id", str, where, required=False) or "",
            acked_ms=_field(item, "acked_ms", int, where, required=False) or 0,
        )


def read_drop_ledger(path: Path) -> Iterator[DropEntry]:
    """Entries of a drop ledger, in file order."""
    for lineno, item in _json_lines(path):
        where = f"{path}:{lineno}"
        msg_id = _field(item, "msg_id", str, where, required=False)
        gateway_id = _field(item, "gateway_message_id", str, where, required=False)
        if msg_id is None and gateway_id is None:
            raise LedgerError(f"{where}: needs 'msg_id' or 'gateway_message_id'")
        yield DropEntry(
            device_id=_field(item, "device_id", str, where, required=True),
            class_name=_field(item, "class", str, where, required=True),
            reason=_field(item, "reason", str, where, required=True),
            msg_id=msg_id,
            gateway_message_id=gateway_id,
            seq=_field(item, "seq", int, where, required=False),
        )


def concat_ledgers(parts: Iterable[Path], target: Path) -> None:
    """Concatenate shard ledgers (multi-process runs) into ``target`` and delete the parts."""
    try:
        with target.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                part.unlink()
    except OSError as exc:
        raise LedgerError(f"{target}: cannot merge shard ledgers: {exc.strerror}") from exc
