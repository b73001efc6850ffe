"""``tidegate chaos``: the chaos harness from the command line (see docs/reliability.md).

Exit codes: 0 nothing acknowledged was lost or reordered (exactly-once: nor duplicated) and
every fault did what it claims; 1 a broken promise (missing, reordered, EOS duplicates);
2 bad arguments or the run could not be set up; 3 the numbers are clean but the run did not
prove what it should (a kill found the buffer empty, a fault failed, the buffer never drained).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from device_sim.chaos import ChaosOptions, ChaosSetupError, run_chaos
from device_sim.chaos_report import ChaosResult
from device_sim.chaos_schedule import ScheduleError, parse_fault_counts
from gateway.errors import TidegateError

__all__ = ["DEFAULT_FAULTS", "chaos", "default_faults"]

_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)

DEFAULT_FAULTS = "gateway_kill=6,broker_restart=1,proxy_cut=2,disk_full=1,storm=1"
"""The CI mix (one broker). With three brokers ``leader_kill=2`` is added."""


def default_faults(brokers: int) -> str:
    """The fault mix used when ``--faults`` is not given."""
    return DEFAULT_FAULTS + (",leader_kill=2" if brokers >= 3 else "")


def _usage(message: str) -> NoReturn:
    _err.print(f"tidegate chaos: {message}", markup=False, highlight=False)
    raise typer.Exit(2)


def chaos(
    *,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the fault schedule (random if unset).")
    ] = None,
    duration: Annotated[
        float, typer.Option(help="Seconds of load; faults happen inside it.")
    ] = 180.0,
    faults: Annotated[
        str | None,
        typer.Option(
            help="KIND=COUNT,... of gateway_kill, broker_restart, leader_kill, proxy_cut, "
            f"disk_full, storm (default: {DEFAULT_FAULTS}, plus leader_kill=2 with 3 brokers)."
        ),
    ] = None,
    devices: Annotated[int, typer.Option(help="Simulated devices publishing QoS1.")] = 50,
    rate: Annotated[float, typer.Option(help="Messages/s per device.")] = 10.0,
    classes: Annotated[str, typer.Option(help="Classes with weights.")] = "telemetry:4,event:1",
    brokers: Annotated[int, typer.Option(help="Kafka nodes to start (3: RF 3, min ISR 2).")] = 1,
    kafka_state: Annotated[
        Path | None,
        typer.Option(help="Reuse this running local Kafka (state.json) instead of starting one."),
    ] = None,
    delivery: Annotated[
        str, typer.Option(help="Gateway delivery mode: at_least_once or exactly_once.")
    ] = "at_least_once",
    storm_devices: Annotated[
        int, typer.Option(help="Extra devices connecting at once in each storm (0: none).")
    ] = 100,
    max_file_mb: Annotated[
        int, typer.Option(help="buffer.max_file_bytes in MiB when disk_full is scheduled.")
    ] = 2,
    warmup: Annotated[float, typer.Option(help="Seconds before the first fault.")] = 15.0,
    tail: Annotated[float, typer.Option(help="Fault-free seconds at the end of the load.")] = 20.0,
    drain_timeout: Annotated[
        float, typer.Option(help="Deadline for the buffer to drain after the load (s).")
    ] = 180.0,
    verify_wait: Annotated[
        float, typer.Option(help="While messages are missing, read Kafka again this long (s).")
    ] = 60.0,
    work_dir: Annotated[
        Path | None, typer.Option(help="Directory for Kafka, gateway, ledgers and result.json.")
    ] = None,
    keep_kafka: Annotated[bool, typer.Option(help="Leave the started Kafka running.")] = False,
    gateway_src: Annotated[
        Path | None,
        typer.Option(help="Run the gateway from this source tree (e.g. a git archive)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the result JSON here.")
    ] = None,
) -> None:
    """Run real Kafka, the gateway and a fleet, inject faults on a seeded schedule, verify."""
    if devices < 1 or rate <= 0 or duration <= 0 or storm_devices < 0:
        _usage("--devices >= 1, --rate > 0, --duration > 0, --storm-devices >= 0")
    if not 1 <= brokers <= 5:
        _usage("--brokers: 1..5")
    if max_file_mb < 1:
        _usage("--max-file-mb: at least 1")
    try:
        counts = parse_fault_counts(faults if faults is not None else default_faults(brokers))
    except ScheduleError as exc:
        _usage(str(exc))
    if counts["leader_kill"] and brokers < 3 and kafka_state is None:
        _usage("leader_kill needs --brokers 3 (a partition leader must be able to move)")
    chosen_seed = seed if seed is not None else secrets.randbelow(1_000_000)
    directory = work_dir or Path(tempfile.mkdtemp(prefix=f"tidegate-chaos-{chosen_seed}-"))
    options = ChaosOptions(
        work_dir=directory,
        seed=chosen_seed,
        duration_s=duration,
        faults=counts,
        devices=devices,
        rate=rate,
        classes=classes,
        brokers=brokers,
        kafka_state=kafka_state,
        delivery=delivery,
        warmup_s=warmup,
        tail_s=tail,
        storm_devices=storm_devices,
        max_file_mb=max_file_mb,
        drain_timeout_s=drain_timeout,
        verify_wait_s=verify_wait,
        keep_kafka=keep_kafka,
        gateway_src=None if gateway_src is None else gateway_src.resolve(),
    )

    def say(line: str) -> None:
        _err.print(line, markup=False, highlight=False)

    try:
        result = asyncio.run(run_chaos(options, say))
    except (ChaosSetupError, ScheduleError) as exc:
        _usage(str(exc))
    except TidegateError as exc:
        _err.print(f"tidegate chaos: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    print_result(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    raise typer.Exit(result.exit_code)


def print_result(result: ChaosResult) -> None:
    """The fault list, per-class numbers, offenders and the verdict."""
    _out.print(f"seed {result.seed}  run {result.run}  delivery {result.delivery}", markup=False)
    for f in result.faults:
        details = " ".join(f"{k}={v}" for k, v in f.details.items())
        note = f" ({f.note})" if f.note else ""
        _out.print(
            f"  t={f.started_at_s:7.1f}s {f.kind:<14} {f.status}{note} {details}",
            markup=False,
            highlight=False,
        )
    _out.print(f"{'class':<12}{'acked':>9}{'in kafka':>10}{'missing':>9}{'dups':>7}{'reord':>7}")
    for name, s in result.by_class.items():
        _out.print(
            f"{name:<12}{s['acknowledged']:>9}{s['found']:>10}{s['missing']:>9}"
            f"{s['duplicates']:>7}{s['out_of_order']:>7}",
            markup=False,
        )
    for kind in ("missing", "out_of_order"):
        for sample in result.samples.get(kind, [])[:10]:
            _out.print(f"  {kind}: {sample}", markup=False, highlight=False)
    for stream in result.worst_streams[:10]:
        _out.print(f"  worst: {stream}", markup=False, highlight=False)
    for note in result.notes:
        _out.print(f"  note: {note}", markup=False, highlight=False)
    for problem in result.problems:
        _out.print(f"  problem: {problem}", markup=False, highlight=False)
    _out.print(result.total_line(), markup=False, highlight=False)
    verdict = {0: "OK", 1: "BROKEN PROMISE", 3: "INCONCLUSIVE"}[result.exit_code]
    _out.print(verdict, markup=False)
    _out.print(f"result: {Path(result.options['work_dir']) / 'result.json'}", markup=False)
