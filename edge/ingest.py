"""The seam between the embedded MQTT broker and whatever stores what devices publish.

The broker calls :meth:`IngestSink.submit` synchronously, in the order it read the PUBLISH
packets off each device's socket, and sends the PUBACK only after the returned future
resolves. The sink owns durability (group commit) and backpressure (a future that stays
pending while the buffer is full withholds the PUBACK).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

__all__ = ["InboundPublish", "IngestSink", "SessionObserver"]


# Not frozen: a frozen dataclass's __init__ costs ~4x more (object.__setattr__ per
# field), and this one is built for every message on the hot path. Treat it as immutable.
@dataclass(slots=True, unsafe_hash=True)
class InboundPublish:
    """One PUBLISH as a device sent it."""

    device_id: str
    """The MQTT client id of the publishing session."""
    topic: str
    qos: int
    retain: bool
    payload: bytes
    received_at: float
    """Wall-clock time (``time.time()``) when the packet was read."""
    packet_id: int | None = None
    """MQTT packet id (QoS 1/2); with ``dup`` it lets the sink recognise a retransmission."""
    dup: bool = False
    """The DUP flag: the device says it may have sent this PUBLISH before."""


class IngestSink(Protocol):
    """Where inbound publishes go.

    Contract:
    - ``submit`` never blocks and never awaits: call order is storage order, so per-device
      order is the order packets were read.
    - The future resolves once the publish is durable (committed with synchronous=FULL) for
      QoS 1 and 2; for QoS 0 it may resolve before the commit (best effort).
    - While the buffer is full under a ``block`` policy the future stays pending.
    - The future fails only when the publish cannot be stored at all; the broker then closes
      the connection without acknowledging, and the device will resend.
    """

    def submit(self, publish: InboundPublish) -> asyncio.Future[None]: ...


class SessionObserver(Protocol):
    """Told when devices come and go (the device registry listens)."""

    def device_connected(self, device_id: str, peer: str) -> None: ...

    def device_disconnected(self, device_id: str) -> None: ...
