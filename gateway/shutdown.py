"""The drain step of a graceful stop (SIGTERM), between "broker closed" and "forwarder stopped".

Once the broker has closed its listeners and connections nothing new is acknowledged; what is
acknowledged is committed in the buffer, so stopping at once loses nothing (the rows are sent
after the next start). But Kafka is often reachable at that moment, and what the forwarder
can still hand it within the shutdown deadline is better sent now: fewer rows left behind,
no duplicate of a batch whose acks were in flight. :func:`drain` keeps the forwarder running
while it makes progress, and gives up as soon as it does not (Kafka down or frozen, breaker
open): the budget is an upper bound, never a wait for an outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DrainOutcome", "drain", "drain_budget"]

log = logging.getLogger("gateway.shutdown")

_POLL_S = 0.05
_STALL_S = 1.0
"""No row forwarded for this long: Kafka is not taking them; stop draining."""


@dataclass(frozen=True)
class DrainOutcome:
    rows_before: int
    rows_after: int
    seconds: float
    reason: str
    """``empty``, ``stalled`` (no progress) or ``budget`` (time is up)."""


def drain_budget(shutdown_deadline_s: float) -> float:
    """Share of the shutdown deadline the drain may use: a quarter (the rest is for the
    lifecycle flush, the services and the producer's own stop, see gateway/app.py)."""
    return shutdown_deadline_s / 4


async def drain(
    rows: Callable[[], int],
    forwarded: Callable[[], int],
    budget_s: float,
    *,
    stall_s: float = _STALL_S,
) -> DrainOutcome:
    """Wait until ``rows()`` is 0, ``forwarded()`` stops growing for ``stall_s``, or
    ``budget_s`` passes."""
    started = time.monotonic()
    before = rows()
    last_count, last_progress = forwarded(), started
    reason = "empty"
    while rows() > 0:
        now = time.monotonic()
        if now - started >= budget_s:
            reason = "budget"
            break
        count = forwarded()
        if count != last_count:
            last_count, last_progress = count, now
        elif now - last_progress >= stall_s:
            reason = "stalled"
            break
        await asyncio.sleep(_POLL_S)  # polling counters: no event for "forwarded" exists
    outcome = DrainOutcome(before, rows(), round(time.monotonic() - started, 3), reason)
    log.info(
        "stopping: drained %d of %d buffered rows to Kafka in %.1f s (%s); %d stay buffered"
        " for the next start",
        outcome.rows_before - outcome.rows_after,
        outcome.rows_before,
        outcome.seconds,
        outcome.reason,
        outcome.rows_after,
    )
    return outcome
