"""The device side of downlink commands (docs/commands.md), for simulated devices.

A device applies a command (after a configurable delay; failing at a configurable rate),
reports the outcome on ``d/{device_id}/cmd/result`` and only then PUBACKs the command, so
"delivered" means applied. A command id it already executed is not applied again: the
remembered outcome is reported again (the gateway keeps the first report). The memory of
executed ids is bounded (oldest forgotten first).
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["CommandApplier", "CommandOutcome"]

REMEMBERED_IDS = 4096


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What to do with one received command."""

    command_id: str
    status: str
    """``executed`` or ``failed``."""
    repeat: bool
    """Already executed before: report again, do not apply."""

    def report(self) -> bytes:
        """The result payload."""
        output = {"simulated": True, "repeat": self.repeat}
        return json.dumps(
            {"command_id": self.command_id, "status": self.status, "output": output}
        ).encode()


class CommandApplier:
    """Decides, per received command, whether to apply it and with which outcome. Pure."""

    def __init__(self, *, failure_rate: float, rng: random.Random) -> None:
        self._failure_rate = failure_rate
        self._rng = rng
        self._done: OrderedDict[str, str] = OrderedDict()
        self.executions: dict[str, int] = {}
        """Executions per command id (bounded like the memory; for tests and reports)."""

    def receive(self, payload: bytes) -> CommandOutcome | None:
        """None for a payload that is not a command (acknowledged and ignored)."""
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return None
        command_id = data.get("command_id") if isinstance(data, dict) else None
        if not isinstance(command_id, str) or not command_id:
            return None
        known = self._done.get(command_id)
        if known is not None:
            return CommandOutcome(command_id, known, repeat=True)
        status = "failed" if self._rng.random() < self._failure_rate else "executed"
        self._done[command_id] = status
        self.executions[command_id] = self.executions.get(command_id, 0) + 1
        if len(self._done) > REMEMBERED_IDS:
            old, _ = self._done.popitem(last=False)
            self.executions.pop(old, None)
        return CommandOutcome(command_id, status, repeat=False)
