"""``tidegate sim`` and ``tidegate verify``: plain functions with typer annotations.

The main CLI registers them (``app.command("sim")(sim)``); ``python -m device_sim`` runs them
standalone. Bad arguments print one line and exit 2, never a traceback.

Exit codes — sim: 0 every device connected and every QoS1 message was acknowledged,
1 some device gave up or PUBACKs were still missing at the end, 2 usage error.
verify: 0 nothing acknowledged is missing (``--strict``: and no duplicates or reordering),
1 otherwise, 2 usage/config error or Kafka could not be read (no verdict).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from device_sim.fleet import FleetError, run_simulation
from device_sim.kafka_reader import KafkaSource, read_topics
from device_sim.ledger import AckEntry, DropEntry, LedgerError, read_ack_ledger, read_drop_ledger
from device_sim.live import LiveProgress
from device_sim.options import FleetOptions, SimOptionsError, parse_classes
from device_sim.profile import apply_profile, load_profile
from device_sim.report import print_fleet_result, print_verify_report
from device_sim.verify import Oracle, VerifyReport
from gateway.config import ClassConfig, GatewayConfig, KafkaTlsConfig, load_config
from gateway.errors import ConfigError, KafkaError

__all__ = ["run_verification", "sim", "verify"]

_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)


def _usage(message: str) -> NoReturn:
    _err.print(f"[red]error:[/] {message}", markup=True)
    raise typer.Exit(2)


def sim(
    ctx: typer.Context,
    *,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Fleet profile (TOML: device types, sensors, bursts, offline windows, "
            "storms, misbehaving devices); options given explicitly override it."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Broker address (loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Broker MQTT port.")] = 1883,
    devices: Annotated[int, typer.Option(help="Number of simulated devices.")] = 10,
    count: Annotated[
        int | None, typer.Option(help="Messages per device (default 10 unless --duration).")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Publish for this many seconds instead of --count.")
    ] = None,
    rate: Annotated[
        float, typer.Option(help="Messages/s per device; 0 = as fast as --inflight allows.")
    ] = 0.0,
    qos: Annotated[int, typer.Option(help="MQTT QoS, 0 or 1.")] = 1,
    classes: Annotated[
        str, typer.Option(help="Classes with optional weights: telemetry:8,event:1")
    ] = "telemetry",
    payload_size: Annotated[int, typer.Option(help="Filler bytes in the envelope body.")] = 64,
    ttl: Annotated[int | None, typer.Option(help="Put ttl_s into every envelope.")] = None,
    ledger: Annotated[Path | None, typer.Option(help="Write the ack ledger (JSON lines).")] = None,
    prefix: Annotated[str, typer.Option(help="Device id prefix: {prefix}{i:05d}.")] = "dev-",
    start_index: Annotated[int, typer.Option(help="Index of the first device.")] = 0,
    inflight: Annotated[int, typer.Option(help="Most un-acked publishes per device.")] = 20,
    processes: Annotated[
        int, typer.Option(help="Shard devices over this many processes (>2,000 devices).")
    ] = 1,
    spread_source_addresses: Annotated[
        bool, typer.Option(help="Bind each device to its own 127.x.y.z source address.")
    ] = False,
    connect_concurrency: Annotated[int, typer.Option(help="Connects in progress at once.")] = 64,
    connect_rate: Annotated[
        float, typer.Option(help="Ramp-up: connects started per second (0 = no ramp).")
    ] = 500.0,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds per connect attempt (TCP + CONNACK).")
    ] = 10.0,
    connect_attempts: Annotated[int, typer.Option(help="Attempts per device.")] = 8,
    max_time: Annotated[float, typer.Option(help="Hard cap on the publishing phase (s).")] = 3600,
    drain_timeout: Annotated[float, typer.Option(help="Seconds to wait for last PUBACKs.")] = 30,
    seed: Annotated[int | None, typer.Option(help="Seed for class choice and jitter.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the summary as JSON here.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
    commands: Annotated[
        bool, typer.Option(help="Receive commands on d/{id}/cmd, apply, report, then PUBACK.")
    ] = False,
    command_delay: Annotated[float, typer.Option(help="Seconds to apply a command.")] = 0.0,
    command_failure_rate: Annotated[
        float, typer.Option(help="Share of commands reported failed (0..1).")
    ] = 0.0,
    linger: Annotated[
        float, typer.Option(help="Stay connected this long after publishing (s).")
    ] = 0.0,
    password: Annotated[
        str | None,
        typer.Option(
            envvar="TIDEGATE_SIM_PASSWORD",
            help="Authenticate as user name = device id with this password.",
        ),
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="TLS: CA of the gateway's listener certificate.")
    ] = None,
    tls_cert_dir: Annotated[
        Path | None, typer.Option(help="TLS: directory with {id}.pem and {id}-key.pem.")
    ] = None,
) -> None:
    """Run a fleet of simulated MQTT devices against a gateway and record every PUBACK."""
    if count is not None and duration is not None:
        _usage("--count and --duration exclude each other")
    try:
        options = FleetOptions(
            host=host,
            port=port,
            devices=devices,
            count=count if count is not None or duration is not None else 10,
            duration_s=duration,
            rate=rate,
            qos=qos,
            classes=parse_classes(classes),
            payload_size=payload_size,
            ttl_s=ttl,
            ledger=ledger,
            prefix=prefix,
            start_index=start_index,
            inflight=inflight,
            processes=processes,
            spread_source_addresses=spread_source_addresses,
            connect_concurrency=connect_concurrency,
            connect_rate=connect_rate,
            connect_timeout_s=connect_timeout,
            connect_attempts=connect_attempts,
            max_time_s=max_time,
            drain_timeout_s=drain_timeout,
            seed=seed,
            commands=commands,
            command_delay_s=command_delay,
            command_failure_rate=command_failure_rate,
            linger_s=linger,
            password=password,
            tls_ca=tls_ca,
            tls_cert_dir=tls_cert_dir,
        ).validated()
        if profile is not None:
            if start_index:
                _usage("--start-index: not with --profile (ids follow the profile's types)")
            # typer vendors click, so compare the ParameterSource by name.
            explicit = {
                name
                for name in ctx.params
                if getattr(ctx.get_parameter_source(name), "name", "")
                in ("COMMANDLINE", "ENVIRONMENT")
            }
            options = apply_profile(options, load_profile(profile), explicit).validated()
    except SimOptionsError as exc:
        _usage(str(exc))
    if ledger is not None and not ledger.parent.is_dir():
        _usage(f"--ledger: directory {ledger.parent} does not exist")
    try:
        if quiet:
            result = run_simulation(options)
        else:
            with LiveProgress(_err) as live:
                result = run_simulation(options, live, live.workers)
    except (FleetError, LedgerError) as exc:
        _usage(str(exc))
    except KeyboardInterrupt:
        # The fleet's cleanup already ran (devices disconnected, ledger flushed and closed).
        _err.print("interrupted: the ledger holds every PUBACK received so far")
        raise typer.Exit(130) from None
    print_fleet_result(_out, result, qos)
    c = result.counters
    if json_out is not None:
        summary: dict[str, Any] = {
            "run_id": result.run_id,
            "counters": c.as_dict(),
            "send_window_s": c.send_window_s,
            "msgs_per_s": result.msgs_per_s,
            "elapsed_s": result.elapsed_s,
            "puback_latency_ms": result.latency.summary_ms(),
            "puback_latency_steady_ms": result.steady_latency.summary_ms(),
            "steady_acked": result.steady_latency.count,
            "peak_rss_mb": result.peak_rss_mb,
            "total_rss_mb": result.total_rss_mb,
            "processes": result.processes,
            "ledger": None if result.ledger is None else str(result.ledger),
            "notes": result.notes,
        }
        json_out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if c.gave_up or c.unacked_at_end or result.notes:
        raise typer.Exit(1)


def _default_classes() -> dict[str, ClassConfig]:
    # The gateway's own defaults, so the verifier without -c agrees with a default gateway.
    value = GatewayConfig.model_fields["classes"].get_default(call_default_factory=True)
    return dict(value)


def _kafka_source(
    *,
    config: Path | None,
    bootstrap: list[str],
    cafile: Path | None,
    certfile: Path | None,
    keyfile: Path | None,
    topics: list[str],
    ledger_classes: set[str],
    isolation: Literal["read_uncommitted", "read_committed"],
) -> tuple[KafkaSource, dict[str, str]]:
    """Kafka connection and topics from the gateway config plus overrides; exits 2 on errors."""
    from bridge.kafka_security import ClientSecurity, client_security
    from bridge.tls import build_ssl_context

    tls_override = [cafile, certfile, keyfile]
    if any(tls_override) and not all(tls_override):
        _usage("--cafile, --certfile and --keyfile go together")
    cfg: GatewayConfig | None = None
    if config is not None:
        try:
            # With TLS overrides the config's own TLS files need not exist here.
            cfg = load_config(config, check_files=not all(tls_override))
        except ConfigError as exc:
            _usage(str(exc))
    servers = [s for item in bootstrap for s in item.split(",") if s.strip()]
    if not servers:
        if cfg is None:
            _usage("give -c/--config FILE or --bootstrap host:port")
        servers = list(cfg.kafka.bootstrap_servers)
    try:
        security: ClientSecurity
        if all(tls_override):
            tls = KafkaTlsConfig(cafile=cafile, certfile=certfile, keyfile=keyfile)
            security = ClientSecurity(ssl_context=build_ssl_context(tls))
        elif cfg is not None:
            # The gateway's own way in: mutual TLS or SASL_SSL, as configured.
            security = client_security(cfg.kafka)
        else:
            _usage("without -c/--config give --cafile, --certfile and --keyfile (mutual TLS)")
    except ValidationError as exc:
        _usage("; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors()))
    except KafkaError as exc:
        _usage(str(exc))
    classes = cfg.classes if cfg is not None else _default_classes()
    topic_classes = {c.kafka_topic: name for name, c in classes.items()}
    if not topics:
        unknown = sorted(ledger_classes - set(classes))
        if unknown:
            _usage(
                f"ledger classes {', '.join(unknown)} have no Kafka topic in the config; "
                "pass --topic"
            )
        topics = sorted({classes[name].kafka_topic for name in ledger_classes})
    source = KafkaSource(
        bootstrap_servers=servers,
        ssl_context=security.ssl_context,
        topics=topics,
        isolation_level=isolation,
        sasl=security.sasl,
    )
    return source, topic_classes


def verify(
    *,
    ledger: Annotated[
        list[Path], typer.Option(help="Ack ledger(s) from `sim --ledger` (repeatable).")
    ],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Gateway config: Kafka connection and topics."),
    ] = None,
    drops: Annotated[
        list[Path] | None, typer.Option(help="Drop ledger(s) from the gateway (repeatable).")
    ] = None,
    bootstrap: Annotated[
        list[str] | None, typer.Option(help="Kafka host:port (overrides the config).")
    ] = None,
    cafile: Annotated[Path | None, typer.Option(help="CA bundle (overrides config).")] = None,
    certfile: Annotated[Path | None, typer.Option(help="Client certificate.")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="Client key.")] = None,
    topic: Annotated[
        list[str] | None,
        typer.Option(help="Topic to read (repeatable; default: the ledger classes' topics)."),
    ] = None,
    isolation: Annotated[
        str, typer.Option(help="read_uncommitted or read_committed.")
    ] = "read_uncommitted",
    timeout: Annotated[float, typer.Option(help="Deadline for reading Kafka (s).")] = 120.0,
    wait: Annotated[
        float,
        typer.Option(help="While messages are missing, read again for up to this long (s)."),
    ] = 0.0,
    strict: Annotated[
        bool, typer.Option(help="Also fail on duplicates and out-of-order records.")
    ] = False,
    show: Annotated[int, typer.Option(help="How many offenders to name per kind.")] = 20,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the report as JSON here.")
    ] = None,
) -> None:
    """Read Kafka back and check every acknowledged message arrived, once and in order."""
    if isolation not in ("read_uncommitted", "read_committed"):
        _usage("--isolation: read_uncommitted or read_committed")
    if timeout <= 0 or show < 0 or wait < 0:
        _usage("--timeout must be > 0, --wait and --show >= 0")
    try:
        acks: list[AckEntry] = [e for path in ledger for e in read_ack_ledger(path)]
        drop_entries: list[DropEntry] = [e for path in drops or [] for e in read_drop_ledger(path)]
    except LedgerError as exc:
        _usage(str(exc))
    source, topic_classes = _kafka_source(
        config=config,
        bootstrap=bootstrap or [],
        cafile=cafile,
        certfile=certfile,
        keyfile=keyfile,
        topics=list(topic or []),
        ledger_classes={e.class_name for e in acks},
        isolation=isolation,  # type: ignore[arg-type]
    )
    report = run_verification(
        acks, drop_entries, source, topic_classes, timeout_s=timeout, wait_s=wait
    )
    print_verify_report(_out, report, show=show, strict=strict)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_json(strict=strict), indent=2) + "\n")
    if not report.ok(strict=strict):
        raise typer.Exit(1)


def run_verification(
    acks: list[AckEntry],
    drops: list[DropEntry],
    source: KafkaSource,
    topic_classes: dict[str, str],
    *,
    timeout_s: float,
    wait_s: float = 0.0,
    on_retry: Callable[[VerifyReport], None] | None = None,
) -> VerifyReport:
    """Read ``source`` into an :class:`Oracle`; exits 2 when Kafka cannot be read.

    With ``wait_s``, a report with missing messages is taken as "the gateway is still
    forwarding its backlog": the topics are read again from the start (a fresh end-offset
    snapshot) until nothing is missing or ``wait_s`` has passed.
    """
    deadline = time.monotonic() + wait_s
    while True:
        oracle = Oracle(acks, drops, topic_classes=topic_classes)
        try:
            summary = asyncio.run(read_topics(source, oracle.add, timeout_s=timeout_s))
        except KafkaError as exc:
            _usage(str(exc))
        report = oracle.finish()
        report.notes.extend(summary.notes())
        left = deadline - time.monotonic()
        if not report.total.missing or left <= 0:
            return report
        _err.print(f"{report.total.missing} missing; reading again ({left:.0f} s of --wait left)")
        if on_retry is not None:
            on_retry(report)
        time.sleep(min(2.0, left))
