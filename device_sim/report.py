"""Human output for the simulator and the verifier (rich tables, progress lines)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from device_sim.fleet import FleetResult
from device_sim.stats import FleetCounters
from device_sim.verify import StreamStats, VerifyReport

__all__ = ["ProgressPrinter", "print_fleet_result", "print_verify_report"]

_COLUMNS = (
    "acknowledged",
    "found",
    "missing",
    "dropped",
    "duplicates",
    "out_of_order",
    "not_in_ledger",
)


class ProgressPrinter:
    """One line per second while a fleet runs: connected, sent, acked, current rate, errors."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._last_acked = 0
        self._last_sent = 0

    def __call__(self, counters: FleetCounters) -> None:
        done = counters.acked or counters.sent
        last = self._last_acked or self._last_sent
        rate = max(0, done - last)
        self._last_acked, self._last_sent = counters.acked, counters.sent
        self._console.print(
            f"connected={counters.connected}/{counters.devices} sent={counters.sent} "
            f"acked={counters.acked} rate={rate}/s errors="
            f"{counters.connect_failures + counters.disconnects + counters.errors}",
            highlight=False,
        )


def print_fleet_result(console: Console, result: FleetResult, qos: int) -> None:
    """The end-of-run summary."""
    c = result.counters
    lat = result.latency.summary_ms()
    table = Table(title=f"simulator run {result.run_id}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("devices", f"{c.devices} in {result.processes} process(es)"),
        ("connected (ever)", str(c.ever_connected)),
        ("gave up connecting", str(c.gave_up)),
        ("connect time (last first CONNACK)", f"{c.connect_time_s:.2f} s"),
        ("sent", str(c.sent)),
        ("acknowledged" if qos else "written (QoS0, no acks)", str(c.acked if qos else c.sent)),
        ("un-acked at end", str(c.unacked_at_end)),
        ("failed connects", str(c.connect_failures)),
        ("unexpected disconnects", str(c.disconnects)),
        ("other errors", str(c.errors)),
        ("throughput", f"{result.msgs_per_s:,.0f} msgs/s over {c.send_window_s:.2f} s"),
        ("elapsed", f"{result.elapsed_s:.2f} s"),
        ("peak RSS", f"{result.peak_rss_mb:.0f} MB (all processes {result.total_rss_mb:.0f} MB)"),
    ]
    if qos:
        rows.append(
            (
                "PUBACK latency",
                "  ".join(f"{k} {lat[k]} ms" for k in ("p50", "p90", "p99", "max")),
            )
        )
        steady = result.steady_latency.summary_ms()
        rows.append(
            (
                "  once all connected",
                "  ".join(f"{k} {steady[k]} ms" for k in ("p50", "p90", "p99", "max")),
            )
        )
    if c.commands_executed or c.commands_failed or c.commands_repeated:
        rows.append(
            (
                "commands",
                f"{c.commands_executed} executed, {c.commands_failed} failed,"
                f" {c.commands_repeated} repeats not applied",
            )
        )
    if result.ledger is not None:
        rows.append(("ack ledger", str(result.ledger)))
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")


_HEADERS = {
    "acknowledged": "acked",
    "found": "in kafka",
    "missing": "missing",
    "dropped": "dropped",
    "duplicates": "dups",
    "out_of_order": "out of order",
    "not_in_ledger": "not in ledger",
}
"""Short headers so the table fits 80 columns; docs/simulator.md maps them to the fields."""


def _table(title: str, first: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column(first, no_wrap=True)
    for column in _COLUMNS:
        table.add_column(_HEADERS[column], justify="right", overflow="fold")
    return table


def _row(name: str, stats: StreamStats) -> list[str]:
    return [name, *(str(getattr(stats, column)) for column in _COLUMNS)]


def print_verify_report(
    console: Console, report: VerifyReport, *, show: int = 20, strict: bool = False
) -> None:
    """Per-class totals, worst devices, offenders by name, the total line and the verdict."""
    table = _table("per class", "class")
    for name, stats in report.by_class().items():
        table.add_row(*_row(name, stats))
    table.add_row(*_row("total", report.total), style="bold")
    console.print(table)
    worst = report.worst_devices(show)
    if worst:
        bad = _table(f"worst streams (first {len(worst)})", "device / class")
        for (device, class_name), stats in worst:
            bad.add_row(*_row(f"{device} / {class_name}", stats))
        console.print(bad)
    for kind in ("missing", "duplicates", "out_of_order", "dropped", "undecodable", "key_mismatch"):
        items = report.samples.get(kind, [])
        if items:
            console.print(f"[bold]{kind}[/] (first {min(show, len(items))}):", highlight=False)
            for item in items[:show]:
                console.print(f"  {item}", highlight=False, markup=False, soft_wrap=True)
    extras = {
        "unmatched_drops": report.unmatched_drops,
        "dropped_but_found": report.dropped_but_found,
        "key_mismatch": report.key_mismatch,
        "ledger_duplicates": report.ledger_duplicates,
    }
    odd = " ".join(f"{k}={v}" for k, v in extras.items() if v)
    if odd:
        console.print(f"[yellow]also:[/] {odd}", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    # Never wrapped: scripts and people grep for this line.
    console.print(report.total_line(), highlight=False, markup=False, soft_wrap=True)
    verdict = "OK" if report.ok(strict=strict) else "FAIL"
    style = "green" if verdict == "OK" else "red"
    console.print(f"[{style}]{verdict}[/]" + (" (strict)" if strict else ""))
