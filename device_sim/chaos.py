"""The chaos harness: real Kafka, the gateway as a child process, a simulated fleet with its ack
ledger, and faults on a seeded schedule; at the end the verifier compares ledger and Kafka.

Layout of one run (all under ``options.work_dir``)::

    devices ──▶ mqtt proxy (storms) ──▶ gateway (tidegate run, SIGKILLed and restarted)
                                           │ bridge
                                           ▼
                                        kafka proxies (cut / pause) ──▶ Kafka brokers
                                                                      (stopped, killed)

:func:`run_chaos` runs it and returns a :class:`~device_sim.chaos_report.ChaosResult`;
``device_sim/chaos_cli.py`` is the command line. See docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from device_sim.chaos_faults import ChaosEnv, FaultRecord, inject, restore_everything
from device_sim.chaos_procs import GatewayRunner, SimRunner, run_cli
from device_sim.chaos_report import ChaosResult, verify_run
from device_sim.chaos_schedule import FaultSpec, build_schedule
from device_sim.options import parse_classes
from device_sim.tcp_proxy import TcpProxy
from gateway.dev.kafka import create_topics, read_state, start_kafka, stop_kafka
from gateway.dev.kafka_ops import thaw_brokers
from gateway.dev.kafka_state import KafkaState
from gateway.errors import TidegateError

__all__ = ["ChaosOptions", "ChaosSetupError", "run_chaos"]

DELIVERY_MODES = ("at_least_once", "exactly_once")


class ChaosSetupError(TidegateError):
    """The run could not be set up (bad options, config rejected, Kafka did not start)."""


@dataclass(frozen=True)
class ChaosOptions:
    """One chaos run. ``faults`` counts per kind (see ``chaos_schedule.FAULT_KINDS``)."""

    work_dir: Path
    seed: int
    duration_s: float = 180.0
    faults: dict[str, int] = field(default_factory=dict)
    devices: int = 50
    rate: float = 10.0
    """Messages per second per device (QoS1)."""
    classes: str = "telemetry:4,event:1"
    brokers: int = 1
    kafka_state: Path | None = None
    """Reuse a running local Kafka (its state file) instead of starting one."""
    delivery: str = "at_least_once"
    warmup_s: float = 15.0
    tail_s: float = 20.0
    storm_devices: int = 100
    max_file_mb: int = 2
    """Buffer cap for ``disk_full`` (``buffer.max_file_bytes``), when that fault is planned."""
    drain_timeout_s: float = 180.0
    verify_wait_s: float = 60.0
    keep_kafka: bool = False
    gateway_src: Path | None = None
    """Run the gateway from this source tree (e.g. ``git archive`` of a commit) instead of
    this checkout; the harness, simulator and verifier still run from here."""


async def run_chaos(options: ChaosOptions, say: Callable[[str], None] = print) -> ChaosResult:
    """Run the whole scenario; raises :class:`ChaosSetupError` if it cannot start.

    Everything started here is stopped here (by PID), also on errors and cancellation.
    """
    if options.delivery not in DELIVERY_MODES:
        raise ChaosSetupError(f"--delivery: one of {', '.join(DELIVERY_MODES)}")
    schedule = build_schedule(
        FaultSpec(options.duration_s, options.faults, options.warmup_s, options.tail_s),
        options.seed,
    )
    work = options.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = f"{options.seed}-{secrets.token_hex(3)}"
    classes = [name for name, _ in parse_classes(options.classes)]
    topics = {name: f"chaos.{run}.{name}" for name in classes}
    say(f"chaos run {run}: {len(schedule)} faults over {options.duration_s:g}s, work dir {work}")

    kafka_proxies: list[TcpProxy] = []
    mqtt_proxy = TcpProxy(name="mqtt")
    gateway: GatewayRunner | None = None
    sim: SimRunner | None = None
    env: ChaosEnv | None = None
    started_kafka: KafkaState | None = None
    try:
        state, kafka_proxies = await _kafka(options, work, say)
        if options.kafka_state is None:
            started_kafka = state
        await asyncio.to_thread(
            create_topics, state, [*topics.values(), f"chaos.{run}.dlq"], partitions=3
        )
        await mqtt_proxy.start()
        disk_cap = options.faults.get("disk_full", 0) > 0
        config = _write_config(
            work,
            run=run,
            state=state,
            topics=topics,
            proxies=kafka_proxies,
            options=options,
            disk_cap=disk_cap,
        )
        code, output = await asyncio.to_thread(
            run_cli, ["check-config", str(config)], src=options.gateway_src
        )
        if code != 0 and disk_cap and "max_file_bytes" in output:
            say("buffer.max_file_bytes rejected by check-config: disk_full faults are skipped")
            disk_cap = False
            config = _write_config(
                work,
                run=run,
                state=state,
                topics=topics,
                proxies=kafka_proxies,
                options=options,
                disk_cap=disk_cap,
            )
            code, output = await asyncio.to_thread(
                run_cli, ["check-config", str(config)], src=options.gateway_src
            )
        if code != 0:
            raise ChaosSetupError(f"gateway config rejected:\n{output.strip()}")
        gateway = GatewayRunner(
            config, work / "gateway", work / "gateway.log", src=options.gateway_src
        )
        await gateway.start()
        mqtt_proxy.set_upstream(gateway.mqtt_port)

        def storm_args(k: int) -> list[str]:
            return [
                *_sim_common(mqtt_proxy.port, options),
                f"--devices={options.storm_devices}",
                "--count=5",
                "--connect-rate=0",
                f"--prefix=storm{k}-",
                f"--seed={options.seed + 1000 + k}",
            ]

        env = ChaosEnv(
            kafka=state,
            kafka_proxies=kafka_proxies,
            mqtt_proxy=mqtt_proxy,
            gateway=gateway,
            topics=list(topics.values()),
            rng=random.Random(options.seed),
            work_dir=work,
            disk_cap=disk_cap,
            storm_devices=options.storm_devices,
            storm_args=storm_args,
            say=say,
        )
        sim = SimRunner(
            "fleet",
            work,
            [
                *_sim_common(mqtt_proxy.port, options),
                f"--devices={options.devices}",
                f"--duration={options.duration_s}",
                f"--rate={options.rate}",
                f"--seed={options.seed}",
            ],
        ).start()
        env.t0 = time.monotonic()
        records: list[FaultRecord] = []
        for planned in schedule:
            delay = planned.at_s - env.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if not sim.running:
                say(f"  the fleet exited early (code {sim.proc and sim.proc.returncode})")
                break
            record = await inject(env, planned)
            records.append(record)
            say(f"  {_fault_line(record)}")
        say("faults done; waiting for the fleet to finish")
        fleet_code = await sim.wait(options.duration_s + 180 - env.now())
        for burst in env.storms:
            await burst.wait(120)
        await restore_everything(env, {})
        drained, rows_left = await _drain(gateway, options.drain_timeout_s)
        say(f"buffer drained: {drained} (rows left {rows_left})")
        drops = await _drop_ledger(config, work, options.gateway_src)
        await gateway.terminate()
        ledgers = [sim.ledger, *(b.ledger for b in env.storms)]
        report = await verify_run(
            env.kafka,
            ledgers,
            drops,
            topics,
            read_committed=options.delivery == "exactly_once",
            wait_s=options.verify_wait_s,
        )
        result = ChaosResult.build(
            options=options,
            run=run,
            faults=records,
            planned=len(schedule),
            report=report,
            fleets={s.name: s.summary() for s in [sim, *env.storms]},
            fleet_exit=fleet_code,
            drained=drained,
            rows_left=rows_left,
            drop_ledger=drops,
            gateway_starts=gateway.starts,
        )
        (work / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        return result
    finally:
        for runner in [sim, *(env.storms if env else [])]:
            if runner is not None:
                runner.cleanup()
        if gateway is not None:
            gateway.cleanup()
        await mqtt_proxy.close()
        if env is not None:
            # Thaw anything still frozen before stopping it (a stopped JVM ignores SIGTERM).
            with contextlib.suppress(Exception):
                await asyncio.to_thread(thaw_brokers, env.kafka)
        if started_kafka is not None and not options.keep_kafka:
            await asyncio.to_thread(stop_kafka, started_kafka.state_file)
        for proxy in kafka_proxies:
            await proxy.close()


async def _kafka(
    options: ChaosOptions, work: Path, say: Callable[[str], None]
) -> tuple[KafkaState, list[TcpProxy]]:
    """Start (or reuse) the cluster and the bridge-side proxies in front of its brokers."""
    if options.kafka_state is not None:
        state = read_state(options.kafka_state)
        proxies: list[TcpProxy] = []
        if state.proxy_bootstrap is not None:
            # The cluster advertises proxy ports: serve them again if they are free.
            try:
                for broker in state.brokers:
                    proxy = TcpProxy(
                        broker.proxied_port, listen_port=broker.proxy_port or 0, name="kafka"
                    )
                    proxies.append(await proxy.start())
            except OSError as exc:
                say(f"cannot serve the cluster's proxy ports ({exc}); proxy cuts are skipped")
                for proxy in proxies:
                    await proxy.close()
                proxies = []
        return state, proxies
    proxies = [await TcpProxy(name=f"kafka-{i + 1}").start() for i in range(options.brokers)]
    say(f"starting Kafka ({options.brokers} broker(s)) in {work / 'kafka'}")
    try:
        state = await asyncio.to_thread(
            start_kafka,
            work / "kafka",
            work / "pki",
            brokers=options.brokers,
            topics=(),
            proxy_ports=[p.port for p in proxies],
        )
    except BaseException:
        for proxy in proxies:
            await proxy.close()
        raise
    for proxy, broker in zip(proxies, state.brokers, strict=True):
        proxy.set_upstream(broker.proxied_port)
    return state, proxies


def _sim_common(port: int, options: ChaosOptions) -> list[str]:
    return [
        f"--port={port}",
        "--qos=1",
        f"--classes={options.classes}",
        "--inflight=20",
        "--connect-attempts=100",
        "--connect-timeout=10",
        "--drain-timeout=90",
    ]


def _write_config(
    work: Path,
    *,
    run: str,
    state: KafkaState,
    topics: dict[str, str],
    proxies: list[TcpProxy],
    options: ChaosOptions,
    disk_cap: bool,
) -> Path:
    bootstrap = state.proxy_bootstrap if proxies else state.bootstrap
    assert bootstrap is not None
    servers = ", ".join(f'"{s}"' for s in bootstrap.split(","))
    classes = "\n".join(
        f'[classes.{name}]\nkafka_topic = "{topic}"\npriority = {8 if name == "event" else 5}\n'
        for name, topic in topics.items()
    )
    buffer = f"[buffer]\nmax_file_bytes = {options.max_file_mb << 20}\n" if disk_cap else ""
    delivery = "" if options.delivery == "at_least_once" else f'delivery = "{options.delivery}"\n'
    path = work / "gateway.toml"
    path.write_text(
        f"""# Written by the chaos harness (device_sim/chaos.py), run {run}.
[gateway]
id = "chaos-{run}"
data_dir = "{work / "gateway"}"
shutdown_deadline_s = 5.0

[[broker.listeners]]
name = "tcp"
host = "127.0.0.1"
port = 0

[broker]
allow_anonymous = true  # loopback fault injection; also runs older gateway trees (--src)

{buffer}
{classes}
[routing]
dead_letter_topic = "chaos.{run}.dlq"

[kafka]
bootstrap_servers = [{servers}]
send_deadline_s = 8.0
request_timeout_s = 5.0
retry_backoff_max_s = 1.0
{delivery}
[kafka.tls]
cafile = "{state.ca_file}"
certfile = "{state.cert_file}"
keyfile = "{state.key_file}"

[admin]
port = 0
"""
    )
    return path


async def _drain(gateway: GatewayRunner, timeout_s: float) -> tuple[bool, int | None]:
    """Wait until the buffer is empty (bounded); returns (drained, rows left)."""
    deadline = time.monotonic() + timeout_s
    rows: int | None = None
    while time.monotonic() < deadline:
        rows = await gateway.buffer_rows()
        if rows == 0:
            return True, 0
        await asyncio.sleep(0.5)
    return False, rows


async def _drop_ledger(config: Path, work: Path, src: Path | None) -> Path | None:
    """The gateway's drop ledger (``tidegate drops export``, from the running gateway), or
    None when this gateway has no such command."""
    path = work / "drops.jsonl"
    code, _ = await asyncio.to_thread(
        run_cli, ["drops", "export", "-c", str(config), "--out", str(path)], src=src
    )
    return path if code == 0 and path.exists() else None


def _fault_line(record: FaultRecord) -> str:
    details = " ".join(f"{k}={v}" for k, v in record.details.items())
    note = f" ({record.note})" if record.note else ""
    return (
        f"t={record.started_at_s:7.1f}s {record.kind:<14} {record.status}{note} "
        f"[{record.ended_at_s - record.started_at_s:.1f}s] {details}"
    )
