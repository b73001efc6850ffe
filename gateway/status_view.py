"""Terminal rendering of the admin API's ``/status`` document."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["render_status"]


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render_status(data: dict[str, Any], console: Console | None = None) -> None:
    """Print a gateway status document as a compact table."""
    console = console or Console()
    buffer, kafka = data["buffer"], data["kafka"]
    table = Table(title=f"tidegate {data['gateway_id']}", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("uptime", f"{data['uptime_s']} s")
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
        f"{buffer['rows']} rows, {_fmt_bytes(buffer['payload_bytes'])}"
        + (" [red]FULL: acknowledgements withheld[/red]" if buffer["full"] else ""),
    )
    age = buffer["oldest_age_s"]
    table.add_row("oldest row", "-" if age is None else f"{age} s old")
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
    if kafka["last_error"]:
        table.add_row("last error", f"{kafka['last_error']} ({kafka['last_error_age_s']} s ago)")
    console.print(table)
