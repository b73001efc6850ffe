"""amqtt's per-connection broker loop, without its four waiter tasks, and our acknowledgements.

amqtt 0.12.1's ``Broker._client_message_loop`` keeps four tasks per connected client, each
awaiting one thing (the disconnect, the next SUBSCRIBE, the next UNSUBSCRIBE, the next
message the client published), and re-arms them through ``asyncio.wait``: with their
coroutines, futures, contexts and the queue deques their ``get()`` builds, about a third of
the broker's heap per idle device. :func:`client_message_loop` does the same work in the
connection's own task: it handles whatever is ready (the disconnect before subscriptions,
as amqtt does), and otherwise waits on the handler's one
:class:`~edge.session_state.Wakeup`, which the handler sets on a disconnect or stop and
when a sink future resolves, and the :class:`~edge.session_state.LazyQueue` s set on every
put. The acknowledgements of stored publishes (:meth:`~edge.amqtt_acks.AckFlow.pump_acks`)
go out from here too, before anything else: a connection is two tasks, this one and its
reader. amqtt's handlers (``_handle_disconnect``, ``_handle_subscription``, ...) are called
with an already-resolved future in place of the waiter task, as amqtt's loop does.

The client-published message queue is always empty here (our reader hands publishes to the
sink, not to amqtt's delivery queue); it is still served, so nothing amqtt puts there is lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from edge.session_state import LazyQueue

if TYPE_CHECKING:
    from edge.amqtt_handler import EdgeProtocolHandler

__all__ = ["client_message_loop"]

log = logging.getLogger("edge.broker")


def _resolved(value: Any) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def client_message_loop(broker: Any, session: Any, handler: EdgeProtocolHandler) -> None:
    """Serve one connection until it disconnects. The session's delivery queue must be a
    :class:`LazyQueue` (slimmed sessions have one; the broker runs amqtt's loop otherwise)."""
    deliveries: LazyQueue[Any] = session.delivered_message_queue
    activity = handler.activity
    subscriptions = handler._pending_subscriptions
    unsubscriptions = handler._pending_unsubscriptions
    deliveries.wakeup = activity  # a resumed session: this connection's loop now
    try:
        while True:
            if handler.acks_ready():  # first: acknowledging is never wrong once stored
                await handler.pump_acks()
                continue
            if handler.disconnect_due():
                result = _resolved(handler.disconnect_result())
                await broker._handle_disconnect(session, handler, result)
                return
            if not subscriptions.empty():
                request = _resolved(subscriptions.get_nowait())
                await broker._handle_subscription(session, handler, request)
            elif not unsubscriptions.empty():
                request = _resolved(unsubscriptions.get_nowait())
                await broker._handle_unsubscription(session, handler, request)
            elif not deliveries.empty():
                message = _resolved(deliveries.get_nowait())
                if not await broker._handle_message_delivery(session, handler, message):
                    return
            else:
                await activity.wait()
    except asyncio.CancelledError:
        # As amqtt's loop: a cancelled connection task ends its loop quietly, and
        # _handle_client_session's cleanup then stops the handler.
        log.debug("device %s: connection loop cancelled", handler.device_id)
    finally:
        if deliveries.wakeup is activity:
            deliveries.wakeup = None
