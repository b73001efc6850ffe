"""The chaos harness's verdict: the verifier run over the ack ledgers, and the result record.

The verdict fails (exit 1) when anything acknowledged is missing or reordered, and in
exactly-once mode also on duplicates. A run whose faults were not what they claim (a kill
that found the buffer empty, a fault that errored) is flagged separately (exit 3): the
numbers may be fine, but the run did not prove what it was meant to.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_sim.chaos_faults import FaultRecord
from device_sim.kafka_reader import KafkaSource, read_topics
from device_sim.ledger import AckEntry, DropEntry, read_ack_ledger, read_drop_ledger
from device_sim.verify import Oracle, VerifyReport
from gateway.dev.kafka_admin import client_ssl_context
from gateway.dev.kafka_state import KafkaState

if TYPE_CHECKING:
    from device_sim.chaos import ChaosOptions

__all__ = ["ChaosResult", "verify_run"]


async def verify_run(
    state: KafkaState,
    ledgers: list[Path],
    drops: Path | None,
    topics: dict[str, str],
    *,
    read_committed: bool,
    wait_s: float,
    timeout_s: float = 120.0,
) -> VerifyReport:
    """Read the run's topics (direct listeners, not the proxies) into the oracle; while
    acknowledged messages are missing, read again until ``wait_s`` has passed."""
    acks: list[AckEntry] = [e for path in ledgers if path.exists() for e in read_ack_ledger(path)]
    drop_entries: list[DropEntry] = [] if drops is None else list(read_drop_ledger(drops))
    source = KafkaSource(
        bootstrap_servers=state.bootstrap_servers,
        ssl_context=client_ssl_context(state),
        topics=sorted(topics.values()),
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        client_id="tidegate-chaos-verify",
    )
    topic_classes = {topic: name for name, topic in topics.items()}
    deadline = time.monotonic() + wait_s
    while True:
        oracle = Oracle(acks, drop_entries, topic_classes=topic_classes)
        summary = await read_topics(source, oracle.add, timeout_s=timeout_s)
        report = oracle.finish()
        report.notes.extend(summary.notes())
        if not report.total.missing or time.monotonic() > deadline:
            return report
        await asyncio.sleep(2.0)


@dataclass
class ChaosResult:
    """Everything a run found; ``to_json`` is what ``result.json`` holds."""

    seed: int
    run: str
    delivery: str
    options: dict[str, Any]
    faults: list[FaultRecord]
    planned_faults: int
    acknowledged: int
    in_kafka: int
    missing: int
    duplicates: int
    out_of_order: int
    not_in_ledger: int
    dropped: int
    by_class: dict[str, dict[str, int]]
    worst_streams: list[dict[str, Any]]
    samples: dict[str, list[str]]
    notes: list[str]
    fleets: dict[str, dict[str, Any]]
    fleet_exit: int | None
    drained: bool
    rows_left: int | None
    drop_ledger: str | None
    gateway_starts: int
    kills: int = 0
    kills_nonempty: int = 0
    kafka_outages: int = 0
    problems: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        *,
        options: ChaosOptions,
        run: str,
        faults: list[FaultRecord],
        planned: int,
        report: VerifyReport,
        fleets: dict[str, dict[str, Any]],
        fleet_exit: int | None,
        drained: bool,
        rows_left: int | None,
        drop_ledger: Path | None,
        gateway_starts: int,
    ) -> ChaosResult:
        """Combine the fault records and the verifier's report."""
        total = report.total
        kills = [f for f in faults if f.kind == "gateway_kill" and f.status == "done"]
        outages = [
            f
            for f in faults
            if f.status == "done"
            and (
                f.kind in ("broker_restart", "leader_kill", "proxy_cut")
                or (f.kind == "disk_full" and f.details.get("reached_full"))
            )
        ]
        opts = asdict(options)
        opts["work_dir"] = str(options.work_dir)
        opts["kafka_state"] = None if options.kafka_state is None else str(options.kafka_state)
        opts["gateway_src"] = None if options.gateway_src is None else str(options.gateway_src)
        result = cls(
            seed=options.seed,
            run=run,
            delivery=options.delivery,
            options=opts,
            faults=faults,
            planned_faults=planned,
            acknowledged=total.acknowledged,
            in_kafka=total.found,
            missing=total.missing,
            duplicates=total.duplicates,
            out_of_order=total.out_of_order,
            not_in_ledger=total.not_in_ledger,
            dropped=total.dropped,
            by_class={name: asdict(s) for name, s in report.by_class().items()},
            worst_streams=[
                {"device_id": device, "class": name, **asdict(stats)}
                for (device, name), stats in report.worst_devices(20)
            ],
            samples={k: v[:20] for k, v in report.samples.items() if k != "not_in_ledger"},
            notes=list(report.notes),
            fleets=fleets,
            fleet_exit=fleet_exit,
            drained=drained,
            rows_left=rows_left,
            drop_ledger=None if drop_ledger is None else str(drop_ledger),
            gateway_starts=gateway_starts,
            kills=len(kills),
            kills_nonempty=sum(1 for f in kills if f.details.get("buffer_nonempty")),
            kafka_outages=len(outages),
        )
        result.problems = result._problems()
        return result

    def _problems(self) -> list[str]:
        out = []
        if self.acknowledged == 0:
            out.append("nothing was acknowledged")
        if self.kills_nonempty < self.kills:
            out.append(f"{self.kills - self.kills_nonempty} kill(s) found the buffer empty")
        out.extend(
            f"fault {f.status}: {f.kind}#{f.index}: {f.note}"
            for f in self.faults
            if f.status in ("error", "failed")
        )
        if len(self.faults) < self.planned_faults:
            out.append(f"only {len(self.faults)} of {self.planned_faults} faults ran")
        if not self.drained:
            out.append(f"buffer not drained at the end ({self.rows_left} rows left)")
        return out

    @property
    def broken_promises(self) -> bool:
        """Missing or reordered (and duplicated, in exactly-once mode) acknowledged data."""
        if self.missing or self.out_of_order:
            return True
        return self.delivery == "exactly_once" and self.duplicates > 0

    @property
    def exit_code(self) -> int:
        """0 ok, 1 broken promises, 3 the run did not prove what it should (see problems)."""
        if self.broken_promises:
            return 1
        return 3 if self.problems else 0

    def total_line(self) -> str:
        """One line for scripts and docs."""
        return (
            f"seed={self.seed} delivery={self.delivery} faults={len(self.faults)} "
            f"kills={self.kills} kills_nonempty={self.kills_nonempty} "
            f"kafka_outages={self.kafka_outages} acknowledged={self.acknowledged} "
            f"in_kafka={self.in_kafka} missing={self.missing} duplicates={self.duplicates} "
            f"out_of_order={self.out_of_order} not_in_ledger={self.not_in_ledger} "
            f"dropped={self.dropped}"
        )

    def to_json(self) -> dict[str, Any]:
        """The whole result as JSON-ready data."""
        data = asdict(self)
        data["faults"] = [asdict(f) for f in self.faults]
        data["exit_code"] = self.exit_code
        data["total_line"] = self.total_line()
        return data
