"""The live fuzz target's broker process: ``python -m tests.fuzz_broker``.

A real :class:`EdgeBroker` with the ACL and quotas on (small payload and subscription limits,
so those paths are fuzzed too) and a sink that accepts and forgets every publish. Prints
``{"port": N}`` when listening; ERROR log lines go to stderr (the fuzzer treats any as a
failure); stops when stdin closes and prints its counters as one JSON line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys

from edge.acl import AclPolicy
from edge.broker import EdgeBroker
from edge.broker_state import Security
from edge.ingest import InboundPublish
from edge.quotas import QuotaLimits, Quotas, QuotaSettings

MAX_PACKET = 4096


class _DiscardSink:
    """Accepts every publish at once and keeps nothing (bounded memory)."""

    def __init__(self) -> None:
        self.count = 0

    def submit(self, publish: InboundPublish) -> asyncio.Future[None]:
        self.count += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class _Benign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # amqtt logs a peer that closed before a whole CONNECT at ERROR: not a failure.
        return not (record.name == "amqtt.broker" and record.getMessage().startswith("No data"))


async def main() -> None:
    sink = _DiscardSink()
    quotas = Quotas(
        QuotaSettings(
            on_oversize="puback_discard",
            default=QuotaLimits(
                messages_per_s=1e6, messages_burst=1e6, max_payload_bytes=100, max_subscriptions=4
            ),
            connections_per_s=1e6,
            connections_burst=1e6,
        )
    )
    broker = EdgeBroker(
        listeners=[("default", "127.0.0.1", 0)],
        sink=sink,
        observer=None,
        max_inflight_per_session=8,
        allow_anonymous=True,
        max_packet_size=MAX_PACKET,
        connect_timeout=2.0,
        security=Security(acl=AclPolicy.with_extra(), quotas=quotas),
    )
    async with broker:
        print(json.dumps({"port": broker.bound_addresses["default"][1]}), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the fuzzer closes our stdin
        stats = {k: v for k, v in dataclasses.asdict(broker.stats).items() if k != "_log"}
    print(json.dumps({"sink": sink.count, "stats": stats, **dataclasses.asdict(quotas.counters)}))


if __name__ == "__main__":
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Benign())
    logging.basicConfig(level=logging.ERROR, handlers=[handler])
    asyncio.run(main())
