"""Per-device publish counters for the dashboard's device table (its "msg/s" column is the
change of this count between two polls).

:class:`CountingSink` sits between the broker and the gateway's intake: it counts every
publish a device sends (uplink, meta, command results, firmware requests) and passes it on
unchanged, in the same call, so storage order and the acknowledgement contract of
:class:`edge.ingest.IngestSink` are untouched. Memory is bounded: at most ``max_devices``
ids are tracked; publishes of devices beyond that are counted only in ``untracked``.
"""

from __future__ import annotations

import asyncio

from edge.ingest import InboundPublish, IngestSink

__all__ = ["CountingSink"]

DEFAULT_MAX_DEVICES = 100_000


class CountingSink:
    """An :class:`~edge.ingest.IngestSink` that counts publishes per device, then delegates."""

    def __init__(self, inner: IngestSink, max_devices: int = DEFAULT_MAX_DEVICES) -> None:
        self._inner = inner
        self._max_devices = max_devices
        self._counts: dict[str, int] = {}
        self.untracked = 0
        """Publishes of devices not tracked because ``max_devices`` ids already are."""

    def submit(self, publish: InboundPublish) -> asyncio.Future[None]:
        count = self._counts.get(publish.device_id)
        if count is not None:
            self._counts[publish.device_id] = count + 1
        elif len(self._counts) < self._max_devices:
            self._counts[publish.device_id] = 1
        else:
            self.untracked += 1
        return self._inner.submit(publish)

    def count(self, device_id: str) -> int | None:
        """Publishes received from ``device_id`` since the gateway started (None: untracked)."""
        return self._counts.get(device_id, 0 if len(self._counts) < self._max_devices else None)
