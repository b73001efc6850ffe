"""From the suite's raw runs to figures: medians, ratios to the peers, targets met or not,
a Markdown table and a PNG chart. Pure functions except ``write_chart``."""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.suite_schema import PHASES, SYSTEMS, TARGETS

__all__ = ["evaluate_targets", "markdown", "median_of", "ratios", "write_chart"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise median of numbers over runs (nested dicts too); other values are left out."""
    out: dict[str, Any] = {}
    keys = dict.fromkeys(k for run in runs for k in run)
    for key in keys:
        values = [run[key] for run in runs if key in run]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        dicts = [v for v in values if isinstance(v, dict)]
        if numbers:
            out[key] = round(statistics.median(numbers), 2)
        elif dicts:
            out[key] = median_of(dicts)
    return out


def _get(systems: dict[str, Any], system: str, phase: str, key: str) -> float | None:
    if phase == "rss":
        value = systems.get(system, {}).get("rss", {}).get("median", {}).get(key)
    else:
        value = systems.get(system, {}).get("phases", {}).get(phase, {}).get("median", {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


_RATIO_METRICS = (
    ("cpu_us_per_msg_fixed_rate_mosquitto_pub", "thirdparty", "cpu_us_per_msg"),
    ("cpu_us_per_msg_fixed_rate_sim", "fixed", "cpu_us_per_msg"),
    ("cpu_us_per_msg_saturated", "saturate", "cpu_us_per_msg"),
    ("max_puback_msgs_per_s", "saturate", "msgs_per_s"),
    ("e2e_msgs_per_s", "saturate", "e2e_msgs_per_s"),
    ("puback_p99_ms_fixed_rate", "fixed", "puback_p99_ms"),
    ("puback_steady_p99_ms_fixed_rate", "fixed", "puback_steady_p99_ms"),
    ("rss_mb", "rss", "rss_mb"),
)


def ratios(systems: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """tidegate's median divided by each peer's, per metric (null where a side has none)."""
    out: dict[str, dict[str, float | None]] = {}
    for label, phase, key in _RATIO_METRICS:
        mine = _get(systems, "tidegate", phase, key)
        out[label] = {
            f"tidegate/{peer}": _div(mine, _get(systems, peer, phase, key))
            for peer in SYSTEMS
            if peer != "tidegate"
        }
    return out


def _target(
    key: str, figure: float | None, reason: str | None, conditions: dict[str, Any]
) -> dict[str, Any]:
    title, unit, op, threshold = TARGETS[key]
    if figure is not None:
        figure = round(figure, 3)
    met = None if figure is None else _OPS[op](figure, threshold)
    if figure is None and not reason:
        reason = "not measured in this run"
    return {
        "title": title,
        "figure": figure,
        "unit": unit,
        "op": op,
        "threshold": threshold,
        "met": met,
        "reason": None if figure is not None else reason,
        "conditions": conditions,
    }


def evaluate_targets(
    systems: dict[str, Any], tidegate: dict[str, Any], params: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Every target of issue 6 with its figure from this run and whether it is met."""
    tg_cpu = _get(systems, "tidegate", "thirdparty", "cpu_us_per_msg")
    amqtt_cpu = _get(systems, "amqtt", "thirdparty", "cpu_us_per_msg")
    fixed = {
        "generator": "mosquitto_pub",
        "devices": params["devices"],
        "offered_rate": params["offered_rate"],
    }
    tg_e2e = _get(systems, "tidegate", "saturate", "e2e_msgs_per_s")
    naive_e2e = _get(systems, "naive-bridge", "saturate", "e2e_msgs_per_s")
    outage, drain, scale = tidegate.get("outage"), tidegate.get("drain"), tidegate.get("scale_10k")
    return {
        "ingest_cpu_ratio_vs_amqtt": _target(
            "ingest_cpu_ratio_vs_amqtt",
            _div(tg_cpu, amqtt_cpu),
            "tidegate or amqtt has no fixed-rate CPU figure",
            fixed | {"tidegate_cpu_us_per_msg": tg_cpu, "amqtt_cpu_us_per_msg": amqtt_cpu},
        ),
        "ingest_cpu_us_per_msg": _target(
            "ingest_cpu_us_per_msg", tg_cpu, "tidegate has no fixed-rate CPU figure", fixed
        ),
        "e2e_rate_ratio_vs_naive": _target(
            "e2e_rate_ratio_vs_naive",
            _div(tg_e2e, naive_e2e),
            "tidegate or the naive bridge has no end-to-end rate",
            {
                "devices": params["devices"],
                "window_s": params["saturate_s"],
                "tidegate_e2e_msgs_per_s": tg_e2e,
                "naive_bridge_e2e_msgs_per_s": naive_e2e,
                "naive_bridge_loss_pct": _get(systems, "naive-bridge", "saturate", "loss_pct"),
            },
        ),
        "e2e_kafka_latency_p99_ms": _target(
            "e2e_kafka_latency_p99_ms",
            _get(systems, "tidegate", "latency", "kafka_p99_ms"),
            "no latency phase for tidegate",
            {
                "offered_rate": _get(systems, "tidegate", "latency", "offered_rate"),
                "p50_ms": _get(systems, "tidegate", "latency", "kafka_p50_ms"),
                # The same latency split where the gateway read each PUBLISH (tg-ingest-ts).
                **{
                    f"{part}_{q}_ms": _get(systems, "tidegate", "latency", f"{part}_{q}_ms")
                    for part in ("publish_to_ingest", "ingest_to_kafka")
                    for q in ("p50", "p99")
                },
            },
        ),
        "puback_p99_ms_at_1000": _target(
            "puback_p99_ms_at_1000",
            _get(systems, "tidegate", "fixed", "puback_steady_p99_ms"),
            "no fixed-rate simulator phase for tidegate",
            {
                "offered_rate": params["offered_rate"],
                "p50_ms": _get(systems, "tidegate", "fixed", "puback_p50_ms"),
                # The figure counts messages sent once every device had connected; this one
                # includes the connect ramp (500 connects/s while the first devices publish).
                "p99_ms_with_connect_ramp": _get(systems, "tidegate", "fixed", "puback_p99_ms"),
            },
        ),
        "drain_msgs_per_s": _target(
            "drain_msgs_per_s",
            drain.get("drain_msgs_per_s") if drain else None,
            (drain or {}).get("error") or "drain phase skipped",
            {"rows": (drain or {}).get("rows"), "live_devices": params.get("drain_live_devices")},
        ),
        "rss_mb_10k_devices": _target(
            "rss_mb_10k_devices",
            None if (scale or {}).get("reason") else (scale or {}).get("rss_mb"),
            (scale or {}).get("reason") or "not measured in this run",
            {"connected": (scale or {}).get("connected"), "source": (scale or {}).get("source")},
        ),
        "outage_rss_growth_mb": _target(
            "outage_rss_growth_mb",
            outage.get("growth_after_first_fifth_mb") if outage else None,
            (outage or {}).get("error") or "outage phase skipped",
            {
                "outage_s": (outage or {}).get("outage_s"),
                "rss_at_start_mb": (outage or {}).get("rss_at_start_mb"),
                "rss_at_end_mb": (outage or {}).get("rss_at_end_mb"),
                "target_outage_s": 1800,
            },
        ),
    }


def _fmt(value: Any, digits: int = 0) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """The figures as Markdown: systems side by side, then the targets."""
    systems = results["systems"]
    p = results["params"]
    rows = [
        f"Profile `{results['profile']}`, {p['reps']} repetition(s), medians. Fixed rate: "
        f"{p['devices']} devices x {p['rate_per_device']:g} msg/s = {p['offered_rate']:,.0f} "
        f"msg/s QoS1; saturated: {p['devices']} devices, inflight {p['inflight']}, "
        f"{p['saturate_s']:g} s.",
        "",
        "| system | CPU µs/msg @fixed (mosquitto_pub) | CPU µs/msg @fixed (sim) "
        "| PUBACK p50 / p99 ms @fixed (p99 once connected) | max msg/s (PUBACK) "
        "| e2e msg/s into Kafka "
        "| loss % (saturated) | Kafka p50 / p99 ms @half max | RSS MB | other CPU % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in SYSTEMS:
        m = {
            ph: systems.get(name, {}).get("phases", {}).get(ph, {}).get("median", {})
            for ph in PHASES
        }
        rss = systems.get(name, {}).get("rss", {}).get("median", {})
        tp, fx, sat, lat = m["thirdparty"], m["fixed"], m["saturate"], m["latency"]
        rows.append(
            f"| {name} | {_fmt(tp.get('cpu_us_per_msg'))} | {_fmt(fx.get('cpu_us_per_msg'))} "
            f"| {_fmt(fx.get('puback_p50_ms'), 1)} / {_fmt(fx.get('puback_p99_ms'), 1)} "
            f"({_fmt(fx.get('puback_steady_p99_ms'), 1)}) "
            f"| {_fmt(sat.get('msgs_per_s'))} | {_fmt(sat.get('e2e_msgs_per_s'))} "
            f"| {_fmt(sat.get('loss_pct'), 1)} "
            f"| {_fmt(lat.get('kafka_p50_ms'))} / {_fmt(lat.get('kafka_p99_ms'))} "
            f"| {_fmt(rss.get('rss_mb'))} | {_fmt(tp.get('other_cpu_pct'))} |"
        )
    rows += ["", "| target | figure | goal | met |", "|---|--:|--:|---|"]
    for target in results["targets"].values():
        figure = target["figure"]
        shown = f"{_fmt(figure, 2)} {target['unit']}" if figure is not None else "-"
        met = {True: "yes", False: "**no**", None: f"n/a ({target['reason']})"}[target["met"]]
        rows.append(
            f"| {target['title']} | {shown} | {target['op']} {target['threshold']:g} | {met} |"
        )
    rows += [
        "",
        "Ratios tidegate / peer (medians):",
        "",
        "| metric | " + " | ".join(f"/{peer}" for peer in SYSTEMS if peer != "tidegate") + " |",
        "|---|--:|--:|--:|",
    ]
    for metric, values in results["ratios"].items():
        rows.append(f"| {metric} | " + " | ".join(_fmt(v, 2) for v in values.values()) + " |")
    return "\n".join(rows) + "\n"


def _short(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def write_chart(results: dict[str, Any], path: Path) -> None:
    """A 2x2 PNG: CPU per message, rates, PUBACK p99, RSS; one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    names = list(SYSTEMS)
    colors = ["#4c72b0", "#dd8452", "#c44e52", "#55a868"]

    def series(phase: str, key: str) -> list[float]:
        return [_get(systems, n, phase, key) or 0.0 for n in names]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        (
            axes[0][0],
            series("thirdparty", "cpu_us_per_msg"),
            "CPU µs per message @ fixed rate\n(mosquitto_pub load; lower is better)",
        ),
        (
            axes[0][1],
            series("saturate", "msgs_per_s"),
            "max msg/s: PUBACKs (colour), into Kafka (black)\n(simulator, saturating)",
        ),
        (axes[1][0], series("fixed", "puback_p99_ms"), "PUBACK p99 ms @ fixed rate (simulator)"),
        (axes[1][1], series("rss", "rss_mb"), "RSS MB after the load"),
    ]
    for ax, values, title in panels:
        bars = ax.bar(names, values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    # Next to the PUBACK rate: what actually reached Kafka (the two Kafka systems).
    rate_ax = axes[0][1]
    e2e = series("saturate", "e2e_msgs_per_s")
    xs = [i for i, n in enumerate(names) if n in ("naive-bridge", "tidegate")]
    bars = rate_ax.bar([x + 0.3 for x in xs], [e2e[x] for x in xs], width=0.3, color="black")
    rate_ax.bar_label(bars, labels=[f"e2e {_short(e2e[x])}" for x in xs], fontsize=7)
    fig.suptitle(
        f"tidegate bench --{results['profile']} ({results['started_utc']}, medians of "
        f"{results['params']['reps']})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
