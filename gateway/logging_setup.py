"""Logging of a running gateway: text or JSON lines, repeated records rate-limited.

``[logging]`` in the config chooses the level and the format; ``tidegate run --log-level``
overrides the level; SIGHUP re-reads it (:func:`set_level`).

JSON lines carry ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``message``
and every structured extra a call site passes (``log.warning(..., extra={"device_id": d,
"msg_id": m, "correlation_id": c})``), plus ``exc`` for a traceback.

Repeated records (same logger, level and message template, as a message flood from one bad
device or a Kafka outage produces them) pass ``burst`` times per ``interval_s``; the rest
are counted, and the first record of the key after the interval says how many were
suppressed (``suppressed`` in JSON, ``(N similar suppressed)`` in text). A flood therefore
costs a bounded number of lines, and no information about its size is lost.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from gateway.config import LoggingConfig

__all__ = ["JsonFormatter", "RateLimitFilter", "configure_logging", "set_level"]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
"""Attributes every LogRecord has: anything else on a record is a structured extra."""
_HANDLER_NAME = "tidegate"
_MAX_KEYS = 4096
"""Bound on the keys the rate limiter remembers (message templates are finite; this guards
against call sites that format into the template)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                plain = value is None or isinstance(value, str | int | float | bool)
                entry[key] = value if plain else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """The classic line, with the suppressed count and extras appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {
            k: v
            for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_") and k != "suppressed"
        }
        if extras:
            line += " [" + " ".join(f"{k}={v}" for k, v in extras.items()) + "]"
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            line += f" ({suppressed} similar suppressed)"
        return line


class RateLimitFilter(logging.Filter):
    """Lets the first ``burst`` records of a key through per ``interval_s`` (module doc).

    Records below WARNING are never limited: DEBUG floods are asked for.
    """

    def __init__(
        self, burst: int, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()  # aiosqlite and to_thread workers log too
        self._windows: dict[tuple[str, int, str], list[float | int]] = {}
        """key → [window start, records passed, records suppressed]."""
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.burst <= 0 or record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.interval_s:
                suppressed = 0 if window is None else int(window[2])
                if window is None and len(self._windows) >= _MAX_KEYS:
                    self._forget(now)
                self._windows[key] = [now, 1, 0]
                if suppressed:
                    record.suppressed = suppressed
                return True
            if window[1] < self.burst:
                window[1] += 1
                return True
            window[2] += 1
            self.suppressed_total += 1
            return False

    def _forget(self, now: float) -> None:
        """Drop expired windows (their suppressed counts are lost with them: rare)."""
        for key in [k for k, w in self._windows.items() if now - w[0] >= self.interval_s]:
            del self._windows[key]
        while len(self._windows) >= _MAX_KEYS:
            self._windows.pop(next(iter(self._windows)))


def configure_logging(
    config: LoggingConfig, level_override: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Install the gateway's handler on the root logger (replacing an earlier one)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        JsonFormatter() if config.format == "json" else _TextFormatter(_TEXT_FORMAT)
    )
    handler.addFilter(RateLimitFilter(config.rate_limit_burst, config.rate_limit_interval_s))
    root.addHandler(handler)
    root.setLevel(level_override or config.level)
    return handler


def set_level(level: str) -> str | None:
    """Change the root level (SIGHUP); the previous level's name if it changed."""
    root = logging.getLogger()
    before = logging.getLevelName(root.level)
    if before == level:
        return None
    root.setLevel(level)
    return str(before)
