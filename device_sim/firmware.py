"""The device side of firmware updates (docs/firmware.md), for simulated devices.

:class:`FirmwareAgent` is the pure part: it decides what a device does with an offer or a
chunk and keeps the device's "flash" (the partial image and the next chunk to ask for),
which survives disconnects and power loss, so a transfer resumes where it stopped. It
verifies the manifest's Ed25519 signature on the offer and the image's SHA-256 before it
installs; a tampered image is refused. Faults: drop the connection once mid-transfer
(losing the chunk that just arrived, as power loss would) and fail the installation.

:class:`FirmwareDevice` drives one agent over a paho client registered with a
:class:`device_sim.link.PahoLoopDriver`; :func:`run_firmware_fleet` runs many of them in one
asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from device_sim.link import PahoLoopDriver
from edge.firmware_model import (
    FirmwareFormatError,
    parse_chunk_payload,
    parse_manifest_record,
    verify_manifest,
)

__all__ = ["FirmwareAgent", "FirmwareDevice", "Outgoing", "run_firmware_fleet"]

log = logging.getLogger(__name__)


@dataclass
class Outgoing:
    """What the agent wants done after a message."""

    publish: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """``(leaf, JSON)`` under the device's firmware topic: ``req`` or ``status``."""
    drop: bool = False
    """Lose the connection now (power loss)."""
    installed: bool = False
    """The new image is installed: reconnect announcing the new version."""


@dataclass
class _Flash:
    release_id: str
    version: str
    size: int
    sha256: str
    chunk_bytes: int
    chunk_count: int
    data: bytearray
    next_index: int = 0


class FirmwareAgent:
    """One device's firmware logic. Not thread-safe; call from one loop."""

    def __init__(
        self,
        *,
        version: str,
        trusted: Sequence[Ed25519PublicKey],
        drop_at_chunk: int | None = None,
        fail_install: bool = False,
    ) -> None:
        self.version = version
        self._trusted = list(trusted)
        self._drop_at = drop_at_chunk
        self._fail_install = fail_install
        self.flash: _Flash | None = None
        self.outstanding: int | None = None
        self.downloaded_bytes = 0
        """Chunk bytes received over the device's life (resumes included)."""
        self.drops = 0
        self.verified: str | None = None
        """Release id whose signature and hash verified before the last install."""
        self.refused: list[str] = []

    def connection_lost(self) -> None:
        """The request in flight is gone with the connection."""
        self.outstanding = None

    def on_offer(self, payload: bytes) -> Outgoing:
        out = Outgoing()
        try:
            offer = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return out
        if not isinstance(offer, dict):
            return out
        release_id = offer.get("release_id")
        if offer.get("cancel"):
            if self.flash is not None and self.flash.release_id == release_id:
                self.flash, self.outstanding = None, None
            return out
        try:
            manifest = parse_manifest_record(payload)
            verify_manifest(manifest, self._trusted)
            chunk_bytes = int(offer["chunk_bytes"])
        except (FirmwareFormatError, KeyError, TypeError, ValueError) as exc:
            self.refused.append(str(release_id))
            reason = exc.reason if isinstance(exc, FirmwareFormatError) else "bad offer"
            out.publish.append(("status", _status(release_id, "failed", reason=reason)))
            return out
        if manifest.version == self.version:
            out.publish.append(
                ("status", _status(manifest.release_id, "installed", version=self.version))
            )
            return out
        flash = self.flash
        if flash is not None and flash.release_id == manifest.release_id:
            if self.outstanding is not None:
                return out  # already pulling it: a repeated offer
        else:
            flash = self.flash = _Flash(
                manifest.release_id,
                manifest.version,
                manifest.size,
                manifest.sha256,
                chunk_bytes,
                -(-manifest.size // chunk_bytes),
                bytearray(),
            )
        out.publish.append(
            ("status", _status(flash.release_id, "downloading", nbytes=len(flash.data)))
        )
        self._request(out, flash)
        return out

    def _request(self, out: Outgoing, flash: _Flash) -> None:
        self.outstanding = flash.next_index
        out.publish.append(("req", {"release_id": flash.release_id, "index": flash.next_index}))

    def on_chunk(self, payload: bytes) -> Outgoing:
        out = Outgoing()
        chunk = parse_chunk_payload(payload)
        if chunk is None:
            return out
        self.downloaded_bytes += len(chunk.data)
        flash = self.flash
        if flash is None or chunk.release_id != flash.release_id or chunk.index != self.outstanding:
            return out  # stale or unasked: counted as downloaded, not used
        self.outstanding = None
        if self._drop_at is not None and chunk.index == self._drop_at:
            self._drop_at = None
            self.drops += 1
            out.drop = True  # power lost before this chunk reached flash
            return out
        flash.data.extend(chunk.data)
        flash.next_index += 1
        if flash.next_index < flash.chunk_count:
            quarter = max(1, flash.chunk_count // 4)
            if flash.next_index % quarter == 0:
                out.publish.append(
                    ("status", _status(flash.release_id, "downloading", nbytes=len(flash.data)))
                )
            self._request(out, flash)
            return out
        return self._install(out, flash)

    def _install(self, out: Outgoing, flash: _Flash) -> Outgoing:
        self.flash = None
        image = bytes(flash.data)
        if len(image) != flash.size or hashlib.sha256(image).hexdigest() != flash.sha256:
            self.refused.append(flash.release_id)
            out.publish.append(
                ("status", _status(flash.release_id, "failed", reason="sha256 mismatch"))
            )
            return out
        self.verified = flash.release_id
        if self._fail_install:
            out.publish.append(
                ("status", _status(flash.release_id, "failed", reason="install failed"))
            )
            return out
        self.version = flash.version
        out.installed = True
        out.publish.append(
            ("status", _status(flash.release_id, "installed", version=flash.version))
        )
        return out


def _status(
    release_id: Any,
    state: str,
    *,
    nbytes: int | None = None,
    version: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"release_id": release_id, "state": state}
    if nbytes is not None:
        status["bytes"] = nbytes
    if version is not None:
        status["version"] = version
    if reason is not None:
        status["reason"] = reason
    return status


class FirmwareDevice:
    """A simulated device: connects, announces its type and version on ``d/{id}/meta``,
    follows offers, asks chunks one at a time (again after ``request_timeout_s``), and
    reconnects after a drop or an install. Final reports are re-sent on every connection
    until the gateway acknowledged them."""

    def __init__(
        self,
        driver: PahoLoopDriver,
        device_id: str,
        agent: FirmwareAgent,
        *,
        host: str,
        port: int,
        device_type: str,
        request_timeout_s: float = 5.0,
        reconnect_delay_s: float = 0.2,
        password: str | None = None,
    ) -> None:
        self.device_id = device_id
        self.agent = agent
        self._driver = driver
        self._host, self._port = host, port
        self._type = device_type
        self._password = password
        self._timeout = request_timeout_s
        self._reconnect_delay = reconnect_delay_s
        self._base = f"d/{device_id}/fw"
        self._client: mqtt.Client | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._progress = asyncio.Event()
        self._final: dict[str, Any] | None = None
        self._final_mid: int | None = None
        self.final_acked = asyncio.Event()
        self.connects = 0

    async def run(self) -> None:
        """Until cancelled: stay connected, reconnecting after losses."""
        while True:
            try:
                await self._connect()
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.info("%s: connect failed (%r)", self.device_id, exc)
                await asyncio.sleep(self._reconnect_delay)
                continue
            watchdog = asyncio.create_task(self._watchdog())
            try:
                await self._lost.wait()
            finally:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            self.agent.connection_lost()
            await asyncio.sleep(self._reconnect_delay)

    async def _connect(self) -> None:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.device_id
        )
        self._driver.attach(client)
        if self._password is not None:
            client.username_pw_set(self.device_id, self._password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._connected.clear()
        self._lost.clear()
        self._client = client
        try:
            await asyncio.to_thread(client.connect, self._host, self._port, 30)
            async with asyncio.timeout(30):
                await self._connected.wait()
        except BaseException:
            # Abandoned for good: a late CONNACK must not bring up a second connection.
            self._client = None
            self._driver.forget(client)
            raise
        self.connects += 1

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if client is not self._client or reason.is_failure:
            return  # a stale client, or refused (the connect times out and is retried)
        client.subscribe([(f"{self._base}/offer", 1), (f"{self._base}/chunk", 0)])
        meta = {"type": self._type, "firmware_version": self.agent.version}
        client.publish(f"d/{self.device_id}/meta", json.dumps(meta), qos=1)
        if self._final is not None:
            self._final_mid = client.publish(
                f"{self._base}/status", json.dumps(self._final), qos=1
            ).mid
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, *_: Any) -> None:
        if client is self._client:  # a stale client's end says nothing about this one
            self._lost.set()

    def _on_publish(self, client: mqtt.Client, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        if client is self._client and mid == self._final_mid and self._final is not None:
            self._final = None
            self.final_acked.set()

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if client is not self._client:
            return  # a connection this device already gave up
        leaf = msg.topic.rsplit("/", 1)[-1]
        payload = bytes(msg.payload)
        out = self.agent.on_offer(payload) if leaf == "offer" else self.agent.on_chunk(payload)
        self._progress.set()
        if out.drop:
            self._driver.forget(client)  # no DISCONNECT: the gateway sees the socket die
            self._lost.set()
            return
        for leaf_out, body in out.publish:
            info = client.publish(f"{self._base}/{leaf_out}", json.dumps(body), qos=1)
            if body.get("state") in ("installed", "failed"):
                self._final, self._final_mid = body, info.mid
        if out.installed:
            client.disconnect()  # reboot into the new image; reconnect announces it

    async def _watchdog(self) -> None:
        """Ask again when a requested chunk does not come (a request or chunk was lost)."""
        while True:
            self._progress.clear()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._progress.wait()
                continue
            except TimeoutError:
                pass
            flash, client = self.agent.flash, self._client
            if flash is not None and self.agent.outstanding is not None and client is not None:
                request = {"release_id": flash.release_id, "index": self.agent.outstanding}
                client.publish(f"{self._base}/req", json.dumps(request), qos=1)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.disconnect()
            self._driver.forget(self._client)


@dataclass
class FleetSpec:
    device_id: str
    drop_at_chunk: int | None = None
    fail_install: bool = False


async def run_firmware_fleet(
    specs: Sequence[FleetSpec],
    *,
    host: str,
    port: int,
    device_type: str,
    version: str,
    trusted: Sequence[Ed25519PublicKey],
    until: Any,
    within_s: float,
    password: str | None = None,
) -> dict[str, FirmwareDevice]:
    """Run devices until ``until(devices)`` holds (checked every 0.2 s) or ``within_s``
    passes (TimeoutError); then disconnect them all. With ``password`` devices log in with
    their id as user name."""
    loop = asyncio.get_running_loop()
    driver = PahoLoopDriver(loop, lambda _c, exc: log.warning("paho error: %r", exc))
    devices = {
        s.device_id: FirmwareDevice(
            driver,
            s.device_id,
            FirmwareAgent(
                version=version,
                trusted=trusted,
                drop_at_chunk=s.drop_at_chunk,
                fail_install=s.fail_install,
            ),
            host=host,
            port=port,
            device_type=device_type,
            password=password,
        )
        for s in specs
    }
    tasks = [
        asyncio.create_task(d.run(), name=f"fw-device:{d.device_id}") for d in devices.values()
    ]
    try:
        async with asyncio.timeout(within_s):
            while not until(devices):
                driver.misc()
                await asyncio.sleep(0.2)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for device in devices.values():
            device.close()
    return devices
