"""Less memory per connection: amqtt's per-session state machine and queues, slimmed.

amqtt 0.12.1 gives each ``Session`` its own ``transitions.Machine`` (states new / connected /
disconnected, five transitions, two enter callbacks): about 14 KB of Python objects per
connected device, a quarter of the broker's per-connection heap, for a three-value field.
:func:`slim_session` swaps it for :class:`SessionStates`, which has the same surface amqtt and
we use (``state``, ``connect()``, ``disconnect()``, ``is_connected()``), the same transition
table, the same enter callbacks and the same error (``transitions.MachineError``) for a
transition the table does not allow (amqtt's take-over loop catches it).

Every ``asyncio.Queue`` allocates three deques and an ``Event`` (with a fourth deque) when it
is built, about 3 KB, and a connection has four (the session's retained and delivered
messages, the handler's pending (un)subscriptions) that mostly stay empty. :class:`LazyQueue`
builds the parts on first use instead.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Final, TypeVar

from transitions import MachineError

__all__ = ["LazyQueue", "SessionStates", "slim_session"]

_T = TypeVar("_T")
_LAZY: Final = ("_getters", "_putters", "_queue", "_finished")

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


class LazyQueue(asyncio.Queue[_T]):
    """An ``asyncio.Queue`` whose deques and ``Event`` exist only once something uses them.

    ``asyncio.Queue`` reaches them as plain attributes; the stock constructor runs (so any
    other field a Python version adds is set), then the four parts are dropped and
    ``__getattr__`` (only called for a missing attribute) rebuilds each on first access.
    """

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        for name in _LAZY:
            self.__dict__.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        if name in ("_getters", "_putters", "_queue"):
            value: Any = collections.deque()
        elif name == "_finished":
            value = asyncio.Event()
            if not self.__dict__.get("_unfinished_tasks", 0):
                value.set()  # as the stock constructor leaves it: nothing unfinished
        else:
            raise AttributeError(name)
        self.__dict__[name] = value
        return value


def slim_session(session: Any) -> None:
    """Replace ``session.transitions`` (a Machine) by a :class:`SessionStates` in the same
    state, and the session's empty queues by :class:`LazyQueue`; a session already slimmed
    (a persistent one reconnecting) is left alone."""
    current = getattr(session, "transitions", None)
    if current is None or isinstance(current, SessionStates):
        return
    session.transitions = SessionStates(session, str(current.state))
    for name in ("retained_messages", "delivered_message_queue"):
        queue = getattr(session, name, None)
        if type(queue) is asyncio.Queue and queue.empty():
            setattr(session, name, LazyQueue())
