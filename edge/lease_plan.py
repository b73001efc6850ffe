"""How many rows of each class the next lease takes. Pure code, unit-tested on its own.

Higher priority goes first, but every class with a backlog is guaranteed ``min_share`` of
the batch, so a flood of events cannot starve telemetry forever. Whatever a class cannot
use (it has fewer rows) goes to the next class in priority order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["plan_lease"]


def plan_lease(
    backlog: Mapping[str, int], priority: Mapping[str, int], batch: int, min_share: float
) -> dict[str, int]:
    """Rows to take per class (only classes with a backlog appear)."""
    waiting = {c: n for c, n in backlog.items() if n > 0}
    if not waiting or batch <= 0:
        return {}
    order = sorted(waiting, key=lambda c: (-priority.get(c, 0), c))
    guaranteed = max(1, math.floor(batch * min_share)) if min_share > 0 else 0
    plan = {c: 0 for c in order}
    left = batch
    # The guaranteed floor first, lowest priority included.
    for cls in order:
        take = min(guaranteed, waiting[cls], left)
        plan[cls] += take
        left -= take
    # Then everything else by priority.
    for cls in order:
        take = min(waiting[cls] - plan[cls], left)
        plan[cls] += take
        left -= take
    return {c: n for c, n in plan.items() if n > 0}
