"""A circuit breaker around Kafka. Pure state machine: no I/O, the clock is injected.

closed ──(N consecutive failures, or a failure rate over a window)──▶ open
open ──(cool-down elapsed)──▶ half_open: exactly one probe batch may go through
half_open ──success──▶ closed        half_open ──failure──▶ open (longer cool-down)

While closed, a failure below the threshold is retried after a short capped, jittered
exponential backoff (:meth:`CircuitBreaker.delay`). While open no Kafka call is made at all:
the forwarder waits :meth:`CircuitBreaker.delay` seconds, then probes. The cool-down grows
with every consecutive trip (``open_base_s * 2**(trips-1)``, capped at ``open_max_s``) and is
jittered downward so that a fleet of gateways does not probe a recovering cluster in lockstep.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["BreakerPolicy", "BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    """Where the breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When the breaker opens and for how long."""

    failure_threshold: int = 5
    """Consecutive failures that open the breaker."""
    failure_rate: float = 0.5
    """Also open when this share of the last ``window`` outcomes failed (1.0 disables)."""
    window: int = 20
    """Outcomes the failure rate is computed over (and needs before it applies)."""
    retry_base_s: float = 0.2
    """First retry delay while closed; doubles per consecutive failure."""
    open_base_s: float = 1.0
    """Cool-down after the first trip."""
    open_max_s: float = 10.0
    """Cap on the cool-down and on retry delays."""
    jitter: float = 0.5
    """Delays are drawn from ``[d * (1 - jitter), d]``."""

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.window < 1:
            raise ValueError("failure_threshold and window must be at least 1")
        if not 0 < self.failure_rate <= 1 or not 0 <= self.jitter < 1:
            raise ValueError("failure_rate must be in (0, 1], jitter in [0, 1)")
        if self.retry_base_s <= 0 or self.open_base_s <= 0 or self.open_max_s <= 0:
            raise ValueError("delays must be positive")


class CircuitBreaker:
    """Decides whether a Kafka call may be made now, and how long to wait otherwise."""

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._rng = rng or random.Random()  # jitter, not crypto
        self.state = BreakerState.CLOSED
        self.since = clock()
        """Clock reading of the last state change."""
        self.consecutive_failures = 0
        self.trips = 0
        """Consecutive openings without a successful probe in between."""
        self.total_trips = 0
        self._outcomes: deque[bool] = deque(maxlen=self.policy.window)
        self._open_until = 0.0
        self._retry_at = 0.0
        self._probe_out = False

    # ----------------------------------------------------------------- decisions

    def allow(self) -> bool:
        """May a Kafka call be made now? In half-open, only the one probe is allowed."""
        now = self._clock()
        if self.state is BreakerState.OPEN:
            if now < self._open_until:
                return False
            self._enter(BreakerState.HALF_OPEN, now)
        if self.state is BreakerState.HALF_OPEN:
            if self._probe_out:
                return False
            self._probe_out = True
            return True
        return now >= self._retry_at

    def delay(self) -> float:
        """Seconds until :meth:`allow` can say yes (0 when it can now)."""
        now = self._clock()
        if self.state is BreakerState.OPEN:
            return max(0.0, self._open_until - now)
        if self.state is BreakerState.HALF_OPEN:
            return 0.0 if not self._probe_out else self.policy.retry_base_s
        return max(0.0, self._retry_at - now)

    # ------------------------------------------------------------------ outcomes

    def record_success(self) -> None:
        """A call went through (Kafka answered and accepted)."""
        now = self._clock()
        self.consecutive_failures = 0
        self._outcomes.append(True)
        self._retry_at = 0.0
        if self.state is not BreakerState.CLOSED:
            self.trips = 0
            self._outcomes.clear()
            self._enter(BreakerState.CLOSED, now)

    def record_failure(self) -> None:
        """A call failed for a reason that retrying later may fix."""
        now = self._clock()
        self.consecutive_failures += 1
        self._outcomes.append(False)
        if self.state is BreakerState.HALF_OPEN or self._should_trip():
            self._trip(now)
            return
        if self.state is BreakerState.CLOSED:
            base = self.policy.retry_base_s * 2 ** min(self.consecutive_failures - 1, 20)
            self._retry_at = now + self._jittered(min(base, self.policy.open_max_s))

    def _should_trip(self) -> bool:
        if self.state is not BreakerState.CLOSED:
            return False
        if self.consecutive_failures >= self.policy.failure_threshold:
            return True
        outcomes = self._outcomes
        if len(outcomes) < self.policy.window or self.policy.failure_rate >= 1:
            return False
        return outcomes.count(False) / len(outcomes) >= self.policy.failure_rate

    def _trip(self, now: float) -> None:
        self.trips += 1
        self.total_trips += 1
        cooldown = min(
            self.policy.open_max_s, self.policy.open_base_s * 2 ** min(self.trips - 1, 20)
        )
        self._open_until = now + self._jittered(cooldown)
        self._enter(BreakerState.OPEN, now)

    def _enter(self, state: BreakerState, now: float) -> None:
        self.state = state
        self.since = now
        self._probe_out = False

    def _jittered(self, seconds: float) -> float:
        return self._rng.uniform(seconds * (1 - self.policy.jitter), seconds)

    def snapshot(self, wall_now: float | None = None) -> dict[str, Any]:
        """The admin API's ``kafka.breaker`` document (``since`` as wall-clock seconds)."""
        now = self._clock()
        wall = time.time() if wall_now is None else wall_now
        return {
            "state": self.state.value,
            "since": round(wall - (now - self.since), 3),
            "consecutive_failures": self.consecutive_failures,
            "trips": self.total_trips,
            "next_probe_in_s": round(self.delay(), 3)
            if self.state is not BreakerState.CLOSED
            else None,
        }
