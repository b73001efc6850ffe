"""The shape of the suite's ``results.json`` and a checker for it (used by the tests).

Top level (schema ``tidegate-bench/1``)::

    schema, profile, command, started_utc, elapsed_s, machine, code, params, notes
    systems:  {mosquitto|amqtt|naive-bridge|tidegate: {
                 phases: {thirdparty|fixed|saturate|latency: {median: {...}, runs: [...]}},
                 rss: {median: {...}, runs: [...]}, errors: [...]}}
    tidegate: {outage: {...}, drain: {...}, scale_10k: {...}}
    ratios:   {metric: {"tidegate/<peer>": number | null}}
    targets:  {key: {title, figure, unit, op, threshold, met, reason, conditions}}

Every key of ``TARGETS`` is present in ``targets``. ``figure`` is a number, or null with a
``reason`` saying why it was not measured; ``met`` is true/false, or null when ``figure`` is.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PHASES", "SCHEMA", "SYSTEMS", "TARGETS", "validate"]

SCHEMA = "tidegate-bench/1"
SYSTEMS = ("mosquitto", "amqtt", "naive-bridge", "tidegate")
PHASES = ("thirdparty", "fixed", "saturate", "latency")
KAFKA_SYSTEMS = ("naive-bridge", "tidegate")

TARGETS: dict[str, tuple[str, str, str, float]] = {
    # key: (title, unit, op, threshold)
    "ingest_cpu_ratio_vs_amqtt": (
        "Durable QoS1 ingest CPU per message / amqtt alone, same fixed rate (mosquitto_pub)",
        "ratio",
        "<=",
        0.2,
    ),
    "ingest_cpu_us_per_msg": (
        "Durable QoS1 ingest CPU per message at the fixed rate (mosquitto_pub)",
        "µs/msg",
        "<=",
        60.0,
    ),
    "e2e_rate_ratio_vs_naive": (
        "Sustained end-to-end rate into Kafka (mTLS) / naive bridge's, same run",
        "ratio",
        ">=",
        5.0,
    ),
    "e2e_kafka_latency_p99_ms": (
        "publish → Kafka-ack latency p99 at half the maximum end-to-end rate",
        "ms",
        "<",
        250.0,
    ),
    "puback_p99_ms_at_1000": (
        "PUBACK latency p99 at 1,000 msg/s (once all devices connected), synchronous=FULL",
        "ms",
        "<",
        5.0,
    ),
    "drain_msgs_per_s": (
        "Backlog drain into Kafka with live traffic",
        "msg/s",
        ">=",
        100_000.0,
    ),
    "rss_mb_10k_devices": ("Gateway RSS with 10,000 connected devices", "MB", "<", 250.0),
    "outage_rss_growth_mb": (
        f"RSS growth during a Kafka outage (after its first fifth; flat = <= {10} MB)",
        "MB",
        "<=",
        10.0,
    ),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate(results: dict[str, Any]) -> list[str]:
    """Problems with ``results`` (empty when it matches the schema)."""
    problems: list[str] = []
    if results.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {results.get('schema')!r}")
    systems = results.get("systems", {})
    for name in SYSTEMS:
        system = systems.get(name)
        if not isinstance(system, dict):
            problems.append(f"systems.{name}: missing")
            continue
        phases = system.get("phases", {})
        wanted = PHASES if name in KAFKA_SYSTEMS else PHASES[:3]
        for phase in wanted:
            median = phases.get(phase, {}).get("median")
            if not isinstance(median, dict) or not _is_number(median.get("cpu_us_per_msg")):
                problems.append(f"systems.{name}.phases.{phase}.median.cpu_us_per_msg: no number")
        if not _is_number(system.get("rss", {}).get("median", {}).get("rss_mb")):
            problems.append(f"systems.{name}.rss.median.rss_mb: no number")
    targets = results.get("targets", {})
    for key in TARGETS:
        target = targets.get(key)
        if not isinstance(target, dict):
            problems.append(f"targets.{key}: missing")
            continue
        figure, met = target.get("figure"), target.get("met")
        if figure is None:
            if not target.get("reason"):
                problems.append(f"targets.{key}: figure is null without a reason")
            if met is not None:
                problems.append(f"targets.{key}: met must be null when figure is null")
        elif not _is_number(figure):
            problems.append(f"targets.{key}.figure: not a number: {figure!r}")
        elif not isinstance(met, bool):
            problems.append(f"targets.{key}.met: not a boolean: {met!r}")
    if not isinstance(results.get("ratios"), dict) or not results["ratios"]:
        problems.append("ratios: missing")
    return problems
