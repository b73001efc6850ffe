"""Firmware to devices: offers, chunk serving, status reports and the campaign ticker.

- Offers go out at QoS 1 on ``<device_topic>/offer`` to connected devices of the rings that
  started; an offer not acknowledged stays ``waiting`` and is sent on the next connection.
  A device that reconnects with an unfinished download is offered the release again; it
  resumes from the chunk it stopped at (its progress is its own, the gateway serves any
  chunk it asks for).
- Chunk requests (``/req``) are acknowledged at once (a lost one is simply asked again) and
  queued (bounded: beyond ``max_queued_requests`` a request is dropped and counted); workers
  read the chunk from the cached image and publish it at QoS 0 on ``/chunk`` straight to the
  device's connection. QoS 0 so that a device that vanished does not hold a worker for
  amqtt's 5 s PUBACK wait; the device asks again after its own timeout.
- Status reports (``/status``) are committed in batches before their PUBACK, like uplink.
- The ticker evaluates each running campaign's current ring with
  :func:`edge.firmware_rollout.decide` (pause, advance, complete), fails targets past
  ``device_timeout_s``, and sends offers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from edge.downlink import AmqttDeviceLink
from edge.firmware_model import chunk_payload
from edge.firmware_rollout import decide
from edge.firmware_store import FirmwareStore, Release
from edge.firmware_wire import (
    ControlOp,
    cancel_payload,
    offer_payload,
    parse_request,
    parse_status,
)
from gateway.config import FirmwareConfig
from gateway.errors import BufferStoreError

__all__ = ["FirmwareEngine", "FirmwareLink"]

log = logging.getLogger(__name__)

_MAX_REPORTS = 10_000
_PARALLEL_OFFERS = 32


class FirmwareLink(AmqttDeviceLink):
    """The device link plus QoS 0 publishes (chunks)."""

    async def publish_qos0(self, device_id: str, topic: str, payload: bytes) -> bool:
        handler = self._handler(device_id)
        if handler is None:
            return False
        try:
            await handler.mqtt_publish(topic, payload, 0, False)
        except Exception as exc:  # amqtt raises its own errors, OSError...
            log.info("chunk to %s not sent: %r", device_id, exc)
            return False
        return True


class FirmwareEngine:
    """Serves firmware and drives campaigns. ``run()`` until cancelled."""

    def __init__(self, store: FirmwareStore, link: FirmwareLink, config: FirmwareConfig) -> None:
        self._store = store
        self._link = link
        self._config = config
        self._requests: asyncio.Queue[tuple[str, int, str, int]] = asyncio.Queue(
            config.max_queued_requests
        )
        self._reports: list[tuple[str, dict[str, Any], asyncio.Future[None]]] = []
        self._reports_ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._reconnected: set[str] = set()
        self._offering: set[str] = set()
        self._allowed: dict[str, set[str]] = {}
        """device -> releases it may pull (set when offered, dropped when finished)."""
        self._releases: dict[str, Release] = {}
        self._connection: dict[str, int] = {}
        """device -> its connection count, to recognise requests from a connection gone."""
        self._served: dict[str, tuple[str, int]] = {}
        """device -> the last chunk sent on its current connection."""
        self._offer_slots = asyncio.Semaphore(_PARALLEL_OFFERS)
        self._tasks: asyncio.TaskGroup | None = None
        self.stats: dict[str, int] = {
            "offers": 0,
            "chunks_sent": 0,
            "chunk_bytes_sent": 0,
            "requests_dropped": 0,
            "requests_refused": 0,
            "requests_repeated": 0,
            "invalid_messages": 0,
            "reports": 0,
        }

    # -- topics -----------------------------------------------------------------------

    def _topic(self, device_id: str, leaf: str) -> str:
        return self._config.device_topic.replace("{device_id}", device_id) + "/" + leaf

    # -- observer (edge.ingest.SessionObserver) ----------------------------------------

    def device_connected(self, device_id: str, peer: str) -> None:
        # A new connection: requests queued from the old one are void (their chunk would
        # reach the new connection unasked), and a chunk served on the old one may be lost.
        self._connection[device_id] = self._connection.get(device_id, 0) + 1
        self._served.pop(device_id, None)
        self._reconnected.add(device_id)
        self._wake.set()

    def device_disconnected(self, device_id: str) -> None:
        """Nothing to do: the device's progress is its own; it resumes on reconnect."""

    # -- from the intake ----------------------------------------------------------------

    def submit(self, device_id: str, topic: str, payload: bytes) -> asyncio.Future[None]:
        """A publish under the device's firmware topic; the PUBACK waits for the future."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        leaf = topic.rsplit("/", 1)[-1]
        if leaf == "req":
            request = parse_request(payload)
            if request is None:
                self.stats["invalid_messages"] += 1
            else:
                try:
                    connection = self._connection.get(device_id, 0)
                    self._requests.put_nowait((device_id, connection, *request))
                except asyncio.QueueFull:
                    self.stats["requests_dropped"] += 1
            future.set_result(None)
        elif leaf == "status":
            report = parse_status(payload)
            if report is None:
                self.stats["invalid_messages"] += 1
                log.warning("device %s sent an unusable firmware status; ignored", device_id)
                future.set_result(None)
            elif len(self._reports) >= _MAX_REPORTS:
                future.set_exception(BufferStoreError("too many firmware reports waiting"))
            else:
                self._reports.append((device_id, report, future))
                self._reports_ready.set()
        else:
            self.stats["invalid_messages"] += 1
            future.set_result(None)
        return future

    def wake(self) -> None:
        self._wake.set()

    # -- loops --------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            for n in range(self._config.max_parallel_chunks):
                tasks.create_task(self._serve(), name=f"fw-serve-{n}")
            tasks.create_task(self._commit_reports(), name="fw-reports")
            tasks.create_task(self._tick_loop(), name="fw-ticker")

    async def _serve(self) -> None:
        while True:
            device_id, connection, release_id, index = await self._requests.get()
            if connection != self._connection.get(device_id, 0):
                continue  # asked on a connection that is gone
            if self._served.get(device_id) == (release_id, index):
                # Already sent on this connection (TCP delivers it or the connection dies,
                # and then the device asks again on its next one): a repeat would only
                # double the device's download.
                self.stats["requests_repeated"] += 1
                continue
            try:
                await self._serve_one(device_id, release_id, index)
            except Exception:
                log.exception("serving chunk %d of %s to %s failed", index, release_id, device_id)

    async def _serve_one(self, device_id: str, release_id: str, index: int) -> None:
        release = self._releases.get(release_id)
        if release is None or release_id not in self._allowed.get(device_id, ()):
            self.stats["requests_refused"] += 1
            return
        size = self._config.device_chunk_bytes
        if index * size >= release.size:
            self.stats["requests_refused"] += 1
            return
        path = self._store.image_path(release.sha256)
        data = await asyncio.to_thread(_pread, path, index * size, size)
        payload = chunk_payload(release_id, index, data)
        if await self._link.publish_qos0(device_id, self._topic(device_id, "chunk"), payload):
            self._served[device_id] = (release_id, index)
            self.stats["chunks_sent"] += 1
            self.stats["chunk_bytes_sent"] += len(data)

    async def _commit_reports(self) -> None:
        while True:
            await self._reports_ready.wait()
            self._reports_ready.clear()
            batch, self._reports = self._reports, []
            try:
                await self._store.apply_reports([(d, r) for d, r, _f in batch])
            except Exception as exc:
                for _d, _r, future in batch:
                    if not future.done():
                        future.set_exception(BufferStoreError(f"storing a report failed: {exc}"))
                continue
            for device_id, report, future in batch:
                self.stats["reports"] += 1
                if report["state"] in ("installed", "failed"):
                    self._allowed.get(device_id, set()).discard(report["release_id"])
                if not future.done():
                    future.set_result(None)
            self._wake.set()

    async def _tick_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._tick()
            except Exception:  # the store failed (disk, I/O): try again next tick
                log.exception("firmware campaign tick failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.tick_interval_s):
                    await self._wake.wait()

    async def _tick(self) -> None:
        await self._store.time_out(int(self._config.device_timeout_s * 1000))
        for campaign in await self._store.campaigns():
            counts = await self._store.ring_counts(campaign.campaign_id, campaign.ring)
            decision = decide(
                state=campaign.state,
                ring=campaign.ring,
                ring_count=len(campaign.rings),
                counts=counts,
                failure_threshold=campaign.failure_threshold,
                accepted_failures=campaign.accepted_failures,
            )
            cid = campaign.campaign_id
            if decision.action == "pause":
                await self._store.set_campaign(
                    cid, from_states=("running",), state="paused", reason=decision.reason
                )
            elif decision.action == "complete":
                await self._store.set_campaign(
                    cid, from_states=("running",), state="completed", reason=decision.reason
                )
            elif decision.action == "advance":
                await self._store.set_campaign(
                    cid,
                    from_states=("running",),
                    state="running",
                    reason=decision.reason,
                    ring=campaign.ring + 1,
                )
                self._wake.set()  # offer the next ring now
            elif campaign.state == "running":
                for device_id in await self._store.offerable(cid, campaign.ring, 100_000):
                    self._offer_later(device_id)
        reconnected, self._reconnected = self._reconnected, set()
        for device_id in reconnected:
            if await self._store.open_targets(device_id):
                self._offer_later(device_id)

    def _offer_later(self, device_id: str) -> None:
        if device_id in self._offering or not self._link.is_connected(device_id):
            return
        assert self._tasks is not None
        self._offering.add(device_id)
        self._tasks.create_task(self._offer(device_id), name=f"fw-offer:{device_id}")

    async def _offer(self, device_id: str) -> None:
        try:
            async with self._offer_slots:
                for target in await self._store.open_targets(device_id):
                    if target.state == "waiting" and target.campaign_state != "running":
                        continue  # a paused campaign reaches no new device
                    release = await self._release(target.release_id)
                    if release is None:
                        continue
                    self._allowed.setdefault(device_id, set()).add(release.release_id)
                    payload = offer_payload(
                        target.campaign_id, release, self._config.device_chunk_bytes
                    )
                    self.stats["offers"] += 1
                    # Recorded first: the device may report on it before its PUBACK is seen.
                    await self._store.offered(target.campaign_id, device_id)
                    topic = self._topic(device_id, "offer")
                    if not await self._link.publish(device_id, topic, payload):
                        await self._store.unoffered(target.campaign_id, device_id)
                    break  # one offer at a time per device
        except Exception:
            log.exception("offering firmware to %s failed", device_id)
        finally:
            self._offering.discard(device_id)

    async def _release(self, release_id: str) -> Release | None:
        release = self._releases.get(release_id)
        if release is None:
            release = await self._store.release(release_id)
            if release is not None:
                self._releases[release_id] = release
                await self._store.touch(release_id)
        return release

    # -- operations ----------------------------------------------------------------------

    async def control(self, op: ControlOp) -> str | None:
        """Apply a campaign operation; None, or why it was rejected."""
        store, cid = self._store, op.campaign_id
        if op.op == "start":
            assert op.release_id is not None
            reason = await store.start_campaign(
                cid,
                op.release_id,
                op.devices,
                op.rings or tuple(self._config.default_rings),
                self._config.default_failure_threshold
                if op.failure_threshold is None
                else op.failure_threshold,
            )
        elif op.op == "pause":
            ok = await store.set_campaign(
                cid, from_states=("running",), state="paused", reason="paused by operator"
            )
            reason = None if ok else "not running"
        elif op.op == "resume":
            ok = await store.set_campaign(
                cid,
                from_states=("paused",),
                state="running",
                reason="resumed by operator",
                accept_failures=True,
            )
            reason = None if ok else "not paused"
        elif op.op == "abort":
            reason = await self._stop_campaign(cid, "aborted")
        else:
            reason = await self._rollback(cid)
        self._wake.set()
        return reason

    async def _stop_campaign(self, campaign_id: str, state: str) -> str | None:
        campaign = next(
            (
                c
                for c in await self._store.campaigns(active_only=False)
                if c.campaign_id == campaign_id
            ),
            None,
        )
        if campaign is None:
            return "unknown campaign"
        ok = await self._store.set_campaign(
            campaign_id,
            from_states=("running", "paused", "completed"),
            state=state,
            reason=f"{state} by operator",
        )
        if not ok:
            return f"campaign is {campaign.state}"
        for device_id, allowed in list(self._allowed.items()):
            if campaign.release_id in allowed:
                allowed.discard(campaign.release_id)
                await self._link.publish(
                    device_id, self._topic(device_id, "offer"), cancel_payload(campaign.release_id)
                )
        return None

    async def _rollback(self, campaign_id: str) -> str | None:
        campaigns = {c.campaign_id: c for c in await self._store.campaigns(active_only=False)}
        campaign = campaigns.get(campaign_id)
        if campaign is None:
            return "unknown campaign"
        previous = await self._store.previous_release(campaign.release_id)
        if previous is None:
            return "no previous release of this device type in the cache"
        devices = await self._store.campaign_devices(campaign_id)
        reason = await self._stop_campaign(campaign_id, "rolled_back")
        if reason is not None:
            return reason
        return await self._store.start_campaign(
            f"{campaign_id}.rollback",
            previous,
            devices,
            (100.0,),
            campaign.failure_threshold,
            rollback_of=campaign_id,
        )


def _pread(path: os.PathLike[str], offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)
