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
builds the parts on first use instead, and answers ``qsize``/``empty`` without building
them; a :class:`Wakeup` it holds is set on every put (edge/amqtt_loop.py waits on one wake-up
per connection instead of one task per queue).

``asyncio.Event`` allocates a deque (~0.8 KB with the event) for waiters it mostly never has:
:class:`LazyEvent` builds it only while somebody waits. :class:`Wakeup` is what a single
waiting task needs (the ack pump, the reader at its in-flight cap, the connection loop): one
future while it waits, nothing otherwise. :func:`slim_stream` does the same for the stream
protocol's drain waiters.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Final, Literal, TypeVar

from transitions import MachineError

__all__ = ["LazyEvent", "LazyQueue", "SessionStates", "Wakeup", "slim_session", "slim_stream"]

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


class Wakeup:
    """Wakes the one task waiting in :meth:`wait`; :meth:`set` with nobody waiting is a no-op.

    Unlike ``asyncio.Event`` nothing is remembered: a waiter checks its condition, then waits
    (synchronously in between, so no wake-up is lost). A second concurrent waiter is a bug.
    """

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def wait(self) -> asyncio.Future[None]:
        """The future to await (a plain future, not a coroutine: no frame while waiting)."""
        current = self._future
        if current is not None and not current.done():
            raise RuntimeError("Wakeup already has a waiter")
        future = self._future = asyncio.get_running_loop().create_future()
        return future

    def set(self) -> None:
        future = self._future
        if future is not None:
            self._future = None
            if not future.done():  # done: its waiter was cancelled
                future.set_result(None)


class LazyEvent(asyncio.Event):
    """An ``asyncio.Event`` whose waiter deque exists only while somebody waits."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__.pop("_waiters", None)

    def __getattr__(self, name: str) -> Any:
        if name != "_waiters":
            raise AttributeError(name)
        waiters: collections.deque[Any] = collections.deque()
        self.__dict__[name] = waiters
        return waiters

    def set(self) -> None:
        if "_waiters" in self.__dict__:
            super().set()
        else:  # nobody waits: nothing to wake
            self._value = True

    async def wait(self) -> Literal[True]:
        if self._value:
            return True
        try:
            return await super().wait()
        finally:
            if not self.__dict__.get("_waiters", True):
                del self.__dict__["_waiters"]


class LazyQueue(asyncio.Queue[_T]):
    """An ``asyncio.Queue`` whose deques and ``Event`` exist only once something uses them.

    ``asyncio.Queue`` reaches them as plain attributes; the stock constructor runs (so any
    other field a Python version adds is set), then the four parts are dropped and
    ``__getattr__`` (only called for a missing attribute) rebuilds each on first access.
    """

    wakeup: Wakeup | None = None
    """Set after every put (the connection loop's wake-up)."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        for name in _LAZY:
            self.__dict__.pop(name, None)

    def qsize(self) -> int:
        queue = self.__dict__.get("_queue")
        return 0 if queue is None else len(queue)

    def empty(self) -> bool:
        return not self.qsize()

    def put_nowait(self, item: _T) -> None:
        super().put_nowait(item)  # asyncio.Queue.put ends here too
        if self.wakeup is not None:
            self.wakeup.set()

    def __getattr__(self, name: str) -> Any:
        if name in ("_getters", "_putters", "_queue"):
            value: Any = collections.deque()
        elif name == "_finished":
            value = LazyEvent()
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


def slim_stream(stream: asyncio.StreamWriter) -> None:
    """Swap the connection protocol's empty drain-waiter deque (~0.8 KB) for a list.

    asyncio's ``FlowControlMixin`` only appends to, iterates and removes from it (a waiter
    exists only while a write waits for the peer to read), all of which a list does.
    """
    protocol = getattr(stream, "_protocol", None)
    waiters = getattr(protocol, "_drain_waiters", None)
    if type(waiters) is collections.deque and not waiters:
        protocol._drain_waiters = []  # type: ignore[union-attr]
