"""Live progress of a running fleet: a rich table with one row per worker process.

On a terminal the table redraws in place (connected, sent, acked, rate, errors, bad messages
per worker and in total); when stderr is not a terminal (CI, logs) the same facts are printed
as one plain line every ``line_every_s`` seconds, so logs stay greppable and short.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from device_sim.stats import FleetCounters

__all__ = ["LiveProgress"]


def _errors(c: FleetCounters) -> int:
    return c.connect_failures + c.disconnects + c.errors


def _bad(c: FleetCounters) -> int:
    return c.sent_garbage + c.sent_oversized + c.sent_wrong_topic


class LiveProgress:
    """Progress sink for :func:`device_sim.fleet.run_simulation`; use as a context manager.

    ``progress(total)`` gets the merged counters, ``workers(snapshots)`` each worker's.
    """

    def __init__(self, console: Console, *, line_every_s: float = 1.0) -> None:
        self._console = console
        self._line_every_s = line_every_s
        self._workers: dict[int, FleetCounters] = {}
        self._last: dict[int, tuple[float, int]] = {}
        self._rates: dict[int, float] = {}
        self._total = FleetCounters()
        self._last_line = 0.0
        self._live: Live | None = None
        self._sharded = False
        """True once worker snapshots arrive (multi-process run)."""

    def __enter__(self) -> LiveProgress:
        if self._console.is_terminal:
            self._live = Live(
                self._table(), console=self._console, refresh_per_second=2, transient=False
            )
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def workers(self, snapshots: dict[int, FleetCounters]) -> None:
        """Per-worker counters (called about once a second)."""
        self._sharded = True
        self._update(snapshots)

    def _update(self, snapshots: dict[int, FleetCounters]) -> None:
        now = time.monotonic()
        for index, snap in snapshots.items():
            done = snap.acked or snap.sent
            last_at, last_done = self._last.get(index, (now, done))
            if now > last_at:
                self._rates[index] = (done - last_done) / (now - last_at)
            self._last[index] = (now, done)
        self._workers = dict(snapshots)

    def __call__(self, total: FleetCounters) -> None:
        """Merged counters (called about once a second)."""
        self._total = total
        if not self._sharded:
            # A single-process run reports only the total: show it as worker 0.
            self._update({0: total})
        if self._live is not None:
            self._live.update(self._table())
            return
        now = time.monotonic()
        if now - self._last_line >= self._line_every_s:
            self._last_line = now
            c = total
            self._console.print(
                f"connected={c.connected}/{c.devices} sent={c.sent} acked={c.acked} "
                f"rate={sum(self._rates.values()):.0f}/s errors={_errors(c)} bad={_bad(c)} "
                f"workers={len(self._workers)}",
                highlight=False,
            )

    def _table(self) -> Table:
        table = Table(title="tidegate sim", title_justify="left")
        for name in ("worker", "connected", "sent", "acked", "rate/s", "errors", "bad msgs"):
            table.add_column(name, justify="right")
        for index in sorted(self._workers):
            c = self._workers[index]
            table.add_row(
                str(index),
                f"{c.connected}/{c.devices}",
                str(c.sent),
                str(c.acked),
                f"{self._rates.get(index, 0.0):,.0f}",
                str(_errors(c)),
                str(_bad(c)),
            )
        t = self._total
        table.add_row(
            "total",
            f"{t.connected}/{t.devices}",
            str(t.sent),
            str(t.acked),
            f"{sum(self._rates.values()):,.0f}",
            str(_errors(t)),
            str(_bad(t)),
            style="bold",
        )
        return table
