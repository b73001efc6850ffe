"""Commands and their results outbox, in the buffer file (tables ``commands`` and
``command_results``, schema version 3).

Every state change and its result row are written in one transaction, so the outbox never
misses a change and never reports one that did not happen. All SQL runs through the buffer's
``transaction()`` / ``read()``: the gateway keeps one writer connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aiosqlite

from edge.buffer import Buffer
from edge.buffer_types import now_ms
from edge.commands_model import TERMINAL_STATES, Command, Rejection, parse_device_result
from gateway.errors import BufferStoreError

__all__ = ["CommandStore", "OutboxResult", "PendingCommand"]

log = logging.getLogger(__name__)

_TERMINAL_SQL = "(" + ",".join(f"'{s}'" for s in TERMINAL_STATES) + ")"
_INSERT_RESULT = (
    "INSERT INTO command_results (command_id, device_id, status, reason, output, at_ms)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_MAX_DEVICE_RESULTS = 10_000
"""Device result reports waiting for their commit; the broker's in-flight cap keeps the real
number far lower (devices x cap), this is a guard against a bug."""


@dataclass(frozen=True, slots=True)
class PendingCommand:
    """A command waiting for delivery."""

    command_id: str
    device_id: str
    name: str
    params_json: str
    expires_ms: int
    attempts: int


@dataclass(frozen=True, slots=True)
class OutboxResult:
    """A result row not yet acknowledged by Kafka."""

    id: int
    command_id: str
    device_id: str
    status: str
    reason: str | None
    output_json: str | None
    at_ms: int


class CommandStore:
    """Durable command state. ``run()`` commits device result reports (group commit)."""

    def __init__(self, buffer: Buffer, *, remember_ids: int, reject_unknown_devices: bool) -> None:
        self._buffer = buffer
        self._remember = remember_ids
        self._reject_unknown = reject_unknown_devices
        self._seq: int | None = None
        self._device_results: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._results_ready = asyncio.Event()
        self.outbox_added = asyncio.Event()
        """Set whenever result rows were committed (the result sender waits on it)."""
        self.invalid_device_results = 0

    # ------------------------------------------------------------------ intake

    async def accept(self, items: Sequence[Command | Rejection]) -> list[str]:
        """Store a batch from Kafka in one transaction; return the devices with new work.

        A command id already known is skipped (accepted once). Rejections are stored as
        ``rejected`` commands (when they have an id) so a repeat is not reported twice.
        """
        now = now_ms()
        woken: list[str] = []
        async with self._buffer.transaction() as db:
            if self._seq is None:
                cursor = await db.execute("SELECT coalesce(max(seq), 0) FROM commands")
                row = await cursor.fetchone()
                self._seq = int(row[0]) if row else 0
            for entry in items:
                item = entry
                if item.command_id is not None and await _known(db, item.command_id):
                    log.info("command %s seen again: accepted once, ignored", item.command_id)
                    continue
                if isinstance(item, Command):
                    reason = await self._reason_to_reject(db, item, now)
                    if reason is None:
                        self._seq += 1
                        await _insert(db, item, self._seq, "pending", now)
                        await db.execute(
                            _INSERT_RESULT,
                            (item.command_id, item.device_id, "accepted", None, None, now),
                        )
                        woken.append(item.device_id)
                        continue
                    item = Rejection(reason, item.command_id, item.device_id)
                log.warning(
                    "command %s for %s rejected: %s", item.command_id, item.device_id, item.reason
                )
                if item.command_id is not None and item.device_id is not None and item.remember:
                    self._seq += 1
                    await db.execute(
                        "INSERT INTO commands (command_id, seq, device_id, name, params,"
                        " priority, ttl_s, expires_ms, state, received_ms, updated_ms)"
                        " VALUES (?, ?, ?, '', '{}', 0, 0, ?, 'rejected', ?, ?)",
                        (item.command_id, self._seq, item.device_id, now, now, now),
                    )
                cid, did = item.command_id or "", item.device_id or ""
                # With tenants the rejection goes to the tenant the command came for, which
                # the device's own tenant may not be: recorded in the result's output.
                output = None if item.tenant is None else json.dumps({"tenant": item.tenant})
                await db.execute(_INSERT_RESULT, (cid, did, "rejected", item.reason, output, now))
            await self._trim(db)
        self.outbox_added.set()
        return woken

    async def _reason_to_reject(
        self, db: aiosqlite.Connection, command: Command, now: int
    ) -> str | None:
        if command.expires_ms <= now:
            return "expired on arrival"
        if self._reject_unknown:
            cursor = await db.execute(
                "SELECT 1 FROM devices WHERE device_id = ?", (command.device_id,)
            )
            if await cursor.fetchone() is None:
                return "unknown device"
        return None

    async def _trim(self, db: aiosqlite.Connection) -> None:
        """Forget the oldest finished commands past ``remember_ids``."""
        await db.execute(
            f"DELETE FROM commands WHERE command_id IN (SELECT command_id FROM commands"
            f" WHERE state IN {_TERMINAL_SQL} ORDER BY updated_ms DESC LIMIT -1 OFFSET ?)",
            (self._remember,),
        )

    # ---------------------------------------------------------------- delivery

    async def next_for(self, device_id: str, now: int) -> PendingCommand | None:
        """The device's next deliverable command: priority, then arrival order."""
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT command_id, device_id, name, params, expires_ms, attempts FROM commands"
                " WHERE device_id = ? AND state = 'pending' AND expires_ms > ?"
                " AND coalesce(not_before_ms, 0) <= ? ORDER BY priority DESC, seq LIMIT 1",
                (device_id, now, now),
            )
            row = await cursor.fetchone()
        return None if row is None else PendingCommand(*row)

    async def ready_devices(self, now: int) -> list[str]:
        """Devices with a deliverable command now."""
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT DISTINCT device_id FROM commands WHERE state = 'pending'"
                " AND expires_ms > ? AND coalesce(not_before_ms, 0) <= ?",
                (now, now),
            )
            return [str(r[0]) for r in await cursor.fetchall()]

    async def attempt(self, command_id: str) -> None:
        """Count a delivery attempt (before the PUBLISH goes out)."""
        async with self._buffer.transaction() as db:
            await db.execute(
                "UPDATE commands SET attempts = attempts + 1, updated_ms = ? WHERE command_id = ?",
                (now_ms(), command_id),
            )

    async def delivered(self, command: PendingCommand) -> None:
        """The device PUBACKed the command."""
        await self._transition(command.command_id, ("pending",), "delivered", None, None)

    async def expire_due(self, now: int) -> int:
        """Pending commands past their TTL become ``expired`` (with a result each)."""
        async with self._buffer.read() as db:  # the common case: nothing due, no write
            cursor = await db.execute(
                "SELECT 1 FROM commands WHERE state = 'pending' AND expires_ms <= ? LIMIT 1",
                (now,),
            )
            if await cursor.fetchone() is None:
                return 0
        async with self._buffer.transaction() as db:
            cursor = await db.execute(
                "SELECT command_id, device_id FROM commands"
                " WHERE state = 'pending' AND expires_ms <= ?",
                (now,),
            )
            due = list(await cursor.fetchall())
            for command_id, device_id in due:
                await db.execute(
                    "UPDATE commands SET state = 'expired', updated_ms = ? WHERE command_id = ?",
                    (now, command_id),
                )
                await db.execute(
                    _INSERT_RESULT, (command_id, device_id, "expired", "ttl passed", None, now)
                )
        if due:
            log.info("%d commands expired", len(due))
            self.outbox_added.set()
        return len(due)

    async def _transition(
        self,
        command_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        reason: str | None,
        output_json: str | None,
    ) -> bool:
        now = now_ms()
        marks = ",".join("?" * len(from_states))
        async with self._buffer.transaction() as db:
            cursor = await db.execute(
                f"UPDATE commands SET state = ?, updated_ms = ? WHERE command_id = ?"
                f" AND state IN ({marks}) RETURNING device_id",
                (to_state, now, command_id, *from_states),
            )
            row = await cursor.fetchone()
            if row is not None:
                await db.execute(
                    _INSERT_RESULT, (command_id, row[0], to_state, reason, output_json, now)
                )
        if row is not None:
            self.outbox_added.set()
        return row is not None

    # ------------------------------------------------------ device result reports

    def submit_device_result(self, device_id: str, payload: bytes) -> asyncio.Future[None]:
        """From the intake: a publish on ``.../cmd/result``; resolves once committed, so the
        device's PUBACK follows the commit like any other publish."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self._device_results) >= _MAX_DEVICE_RESULTS:
            future.set_exception(BufferStoreError("too many device results waiting"))
            return future
        self._device_results.append((device_id, payload, future))
        self._results_ready.set()
        return future

    async def run(self) -> None:
        """Commit device result reports as they come, in batches."""
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            batch, self._device_results = self._device_results, []
            try:
                changed = await self._apply_device_results(batch)
            except Exception as exc:
                for _d, _p, future in batch:
                    if not future.done():
                        future.set_exception(BufferStoreError(f"storing a result failed: {exc}"))
                continue
            for _d, _p, future in batch:
                if not future.done():
                    future.set_result(None)
            if changed:
                self.outbox_added.set()

    async def _apply_device_results(
        self, batch: list[tuple[str, bytes, asyncio.Future[None]]]
    ) -> int:
        changed = 0
        now = now_ms()
        async with self._buffer.transaction() as db:
            for device_id, payload, _future in batch:
                result = parse_device_result(payload)
                if result is None:
                    self.invalid_device_results += 1
                    log.warning("device %s sent an unusable command result; ignored", device_id)
                    continue
                # A result may overtake our record of the PUBACK (devices report, then ack) or
                # follow a restart that lost it: then the delivery is recorded first, so the
                # history always reads accepted, delivered, executed|failed. A finished
                # command keeps its first result (the device reports a repeat it ignored).
                cursor = await db.execute(
                    "SELECT state FROM commands WHERE command_id = ? AND device_id = ?",
                    (result.command_id, device_id),
                )
                row = await cursor.fetchone()
                if row is None or row[0] not in ("pending", "delivered"):
                    log.info(
                        "result from %s for %s not applied (unknown, other device or finished)",
                        device_id,
                        result.command_id,
                    )
                    continue
                if row[0] == "pending":
                    await db.execute(
                        _INSERT_RESULT,
                        (result.command_id, device_id, "delivered", None, None, now),
                    )
                await db.execute(
                    "UPDATE commands SET state = ?, updated_ms = ? WHERE command_id = ?",
                    (result.status, now, result.command_id),
                )
                await db.execute(
                    _INSERT_RESULT,
                    (result.command_id, device_id, result.status, None, result.output_json, now),
                )
                changed += 1
        return changed

    # ------------------------------------------------------------------ outbox

    async def outbox(self, limit: int) -> list[OutboxResult]:
        """Oldest unsent results first."""
        async with self._buffer.read() as db:
            cursor = await db.execute(
                "SELECT id, command_id, device_id, status, reason, output, at_ms"
                " FROM command_results ORDER BY id LIMIT ?",
                (limit,),
            )
            return [OutboxResult(*r) for r in await cursor.fetchall()]

    async def sent(self, ids: Sequence[int]) -> None:
        """Kafka acknowledged these results."""
        if not ids:
            return
        async with self._buffer.transaction() as db:
            await db.executemany("DELETE FROM command_results WHERE id = ?", [(i,) for i in ids])

    async def state_of(self, command_id: str) -> dict[str, object] | None:
        """The stored row of a command (admin API)."""
        async with self._buffer.read() as db:
            db.row_factory = aiosqlite.Row
            try:
                cursor = await db.execute(
                    "SELECT * FROM commands WHERE command_id = ?", (command_id,)
                )
                row = await cursor.fetchone()
            finally:
                db.row_factory = None
        return None if row is None else dict(row)

    async def wait_outbox(self, max_wait: float) -> None:
        """Return when results were added, or after ``max_wait`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                await self.outbox_added.wait()
        self.outbox_added.clear()


async def _known(db: aiosqlite.Connection, command_id: str) -> bool:
    cursor = await db.execute("SELECT 1 FROM commands WHERE command_id = ?", (command_id,))
    return await cursor.fetchone() is not None


async def _insert(db: aiosqlite.Connection, c: Command, seq: int, state: str, now: int) -> None:
    await db.execute(
        "INSERT INTO commands (command_id, seq, device_id, name, params, priority, ttl_s,"
        " expires_ms, not_before_ms, state, received_ms, updated_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            c.command_id,
            seq,
            c.device_id,
            c.name,
            c.params_json,
            c.priority,
            c.ttl_s,
            c.expires_ms,
            c.not_before_ms,
            state,
            now,
            now,
        ),
    )
