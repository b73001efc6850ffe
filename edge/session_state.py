"""A small replacement for the ``transitions.Machine`` amqtt builds for every session.

amqtt 0.12.1 gives each ``Session`` its own ``transitions.Machine`` (states new / connected /
disconnected, five transitions, two enter callbacks): about 14 KB of Python objects per
connected device, a quarter of the broker's per-connection heap, for a three-value field.
:func:`slim_session` swaps it for :class:`SessionStates`, which has the same surface amqtt and
we use (``state``, ``connect()``, ``disconnect()``, ``is_connected()``), the same transition
table, the same enter callbacks and the same error (``transitions.MachineError``) for a
transition the table does not allow (amqtt's take-over loop catches it).
"""

from __future__ import annotations

from typing import Any, Final

from transitions import MachineError

__all__ = ["SessionStates", "slim_session"]

_ALLOWED: Final = {
    # trigger -> {source: destination}, as in amqtt.session.Session._init_states
    "connect": {"new": "connected", "disconnected": "connected"},
    "disconnect": dict.fromkeys(("connected", "new", "disconnected"), "disconnected"),
}


class SessionStates:
    """The session state machine as one string and a lookup table."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Any, state: str = "new") -> None:
        self._session = session
        self.state = state

    def _go(self, trigger: str) -> bool:
        dest = _ALLOWED[trigger].get(self.state)
        if dest is None:
            raise MachineError(f"Can't trigger event {trigger} from state {self.state}!")
        self.state = dest
        # transitions runs the enter callback for reflexive transitions too.
        if dest == "connected":
            self._session._on_enter_connected()
        else:
            self._session._on_enter_disconnected()
        return True

    def connect(self) -> bool:
        """new/disconnected -> connected."""
        return self._go("connect")

    def disconnect(self) -> bool:
        """Any state -> disconnected."""
        return self._go("disconnect")

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_new(self) -> bool:
        return self.state == "new"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


def slim_session(session: Any) -> None:
    """Replace ``session.transitions`` (a Machine) by a :class:`SessionStates` in the same
    state; a session already slimmed (a persistent one reconnecting) is left alone."""
    current = getattr(session, "transitions", None)
    if current is None or isinstance(current, SessionStates):
        return
    session.transitions = SessionStates(session, str(current.state))
