"""Terminal rendering of the admin API's ``/status`` document."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["drain_estimate", "fmt_bytes", "health_summary", "render_status"]


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def drain_estimate(before: dict[str, Any], after: dict[str, Any], seconds: float) -> str:
    """How long until the buffer is empty, from two ``/status`` samples ``seconds`` apart
    (net of what arrives meanwhile). Pure."""
    rows = int(after["buffer"]["rows"])
    if rows == 0:
        return "empty"
    if seconds <= 0:
        return "-"
    forwarded = after["kafka"]["forwarded"] - before["kafka"]["forwarded"]
    net = (before["buffer"]["rows"] - rows) / seconds
    rate = f"forwarding {forwarded / seconds:.0f} msg/s"
    if forwarded <= 0:
        return "not draining (nothing forwarded)"
    if net <= 0:
        return f"not draining ({rate}, ingest keeps up or exceeds it)"
    eta = rows / net
    text = (
        f"{eta:.0f} s"
        if eta < 120
        else f"{eta / 60:.1f} min"
        if eta < 7200
        else f"{eta / 3600:.1f} h"
    )
    return f"~{text} ({rate}, net -{net:.0f} rows/s)"


def health_summary(data: dict[str, Any]) -> tuple[str, list[str]]:
    """``OK`` / ``DEGRADED`` and why, from a status document. Pure."""
    buffer, kafka = data["buffer"], data["kafka"]
    problems = []
    if not kafka["connected"]:
        problems.append("Kafka not connected")
    breaker = kafka.get("breaker") or {}
    if breaker.get("state", "closed") != "closed":
        problems.append(f"circuit breaker {breaker['state']}")
    if buffer.get("full"):
        problems.append("buffer full")
    if buffer.get("disk_full"):
        problems.append("disk full")
    elif buffer.get("low_disk"):
        problems.append("disk low")
    if buffer.get("commit_failures"):
        problems.append(f"{buffer['commit_failures']} buffer commit failures")
    return ("DEGRADED" if problems else "OK"), problems


def _limits(buffer: dict[str, Any], limits: dict[str, int] | None) -> str:
    if not limits:
        return ""
    rows = 100 * buffer["rows"] / max(1, limits["max_rows"])
    size = 100 * buffer.get("used_bytes", 0) / max(1, limits["max_bytes"])
    return f" ({rows:.0f}% of {limits['max_rows']} rows, file {size:.0f}% of " + (
        f"{fmt_bytes(limits['max_bytes'])})"
    )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"


def render_status(
    data: dict[str, Any],
    console: Console | None = None,
    *,
    drain: str | None = None,
    limits: dict[str, int] | None = None,
    devices: tuple[int, int] | None = None,
) -> None:
    """Print a gateway status document as a compact table (``drain``: a
    :func:`drain_estimate`; ``limits``: the buffer's max_rows and max_bytes; ``devices``:
    connected and known devices, from ``/devices``)."""
    console = console or Console()
    buffer, kafka = data["buffer"], data["kafka"]
    table = Table(title=f"tidegate {data['gateway_id']}", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    verdict, problems = health_summary(data)
    table.add_row(
        "health",
        "[green]OK[/green]" if verdict == "OK" else f"[red]DEGRADED[/red]: {'; '.join(problems)}",
    )
    table.add_row("uptime", f"{data['uptime_s']} s")
    if devices is not None:
        table.add_row("devices", f"{devices[0]} connected, {devices[1]} known")
    table.add_row("listeners", ", ".join(f"{k} {v}" for k, v in data["listeners"].items()))
    security = data.get("security")
    if security is not None:
        table.add_row(
            "security",
            f"anonymous {'allowed' if security['allow_anonymous'] else 'refused'}, "
            f"ACL {'on' if security['acl'] else 'off'}; refused: "
            f"{security['auth_failures']} auth, {security['tls_handshake_failures']} TLS, "
            f"denied: {security['publishes_denied']} publishes, "
            f"{security['subscriptions_denied']} subscriptions",
        )
        last = (security.get("reload") or {}).get("last")
        if last is not None:
            outcome = (
                f"ok, changed: {', '.join(last['changed']) or 'nothing'}, "
                f"{len(last['disconnected'])} devices disconnected"
                if last["ok"]
                else f"[red]FAILED, previous configuration kept: {last['error']}[/red]"
            )
            table.add_row("last reload", f"{last['age_s']} s ago ({last['trigger']}): {outcome}")
    quotas = data.get("quotas")
    if quotas and quotas.get("enabled"):
        table.add_row(
            "quotas",
            f"{quotas['policy']}: {quotas['throttled']} throttled ({quotas['throttled_s']} s), "
            f"{quotas['rate_disconnects']} disconnected, oversize "
            f"{quotas['oversize_discarded'] + quotas['oversize_disconnects']}, refused "
            f"{quotas['subscriptions_refused']} subscriptions, "
            f"{quotas['connections_refused']} connections",
        )
    table.add_row(
        "buffer",
        f"{buffer['rows']} rows, {fmt_bytes(buffer['payload_bytes'])}"
        + _limits(buffer, limits)
        + (" [red]FULL: acknowledgements withheld[/red]" if buffer["full"] else ""),
    )
    age = buffer["oldest_age_s"]
    table.add_row("oldest row", "-" if age is None else f"{age} s old")
    if drain is not None:
        table.add_row("drain", drain)
    table.add_row("drops", _counts(buffer.get("dropped", {})))
    table.add_row(
        "durability",
        f"journal {buffer['journal_mode']}, synchronous {buffer['synchronous']}, "
        f"{buffer['commits']} commits / {buffer['rows_committed']} rows",
    )
    state = "[green]connected[/green]" if kafka["connected"] else "[red]not connected[/red]"
    table.add_row("kafka", f"{state} {','.join(kafka['bootstrap'])}")
    table.add_row("forwarded", f"{kafka['forwarded']} ({kafka['producer_rebuilds']} rebuilds)")
    breaker = kafka.get("breaker")
    if breaker:
        colour = {"closed": "green", "half_open": "yellow"}.get(breaker["state"], "red")
        probe = breaker.get("next_probe_in_s")
        table.add_row(
            "breaker",
            f"[{colour}]{breaker['state']}[/{colour}], "
            f"{breaker['consecutive_failures']} consecutive failures"
            + ("" if probe is None else f", next probe in {probe} s"),
        )
    if "delivery" in kafka:
        table.add_row(
            "delivery",
            f"{kafka['delivery']}, {kafka.get('dead_lettered', 0)} dead-lettered, "
            f"{buffer.get('dead_letters', 0)} dead letters held",
        )
    lifecycle = data.get("lifecycle")
    if lifecycle:
        dropped = lifecycle["dropped"]
        table.add_row(
            "lifecycle",
            f"{lifecycle['connected_devices']} devices connected, "
            f"{lifecycle['events']['connected']} connects / "
            f"{lifecycle['events']['disconnected']} disconnects, "
            f"{lifecycle['heartbeats']} heartbeats every {lifecycle['heartbeat_period_s']} s "
            f"to {lifecycle['topic']}; dropped: {dropped['events']} events, "
            f"{dropped['heartbeats']} heartbeats",
        )
    for section in ("commands", "firmware"):
        facts = data.get(section)
        if facts:
            table.add_row(
                section,
                ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in facts.items() if v is not None),
            )
    if kafka["last_error"]:
        table.add_row("last error", f"{kafka['last_error']} ({kafka['last_error_age_s']} s ago)")
    console.print(table)
