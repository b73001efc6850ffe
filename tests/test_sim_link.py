"""device_sim/link.py: paho clients on one asyncio loop, over real sockets.

A queued publish is written on the loop's next turn; only a socket that did not take it all
gets a writable watch. Both paths are exercised here against a bare TCP peer that answers
CONNECT and reads (or stops reading) what the client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.client import CallbackAPIVersion

from device_sim.link import PahoLoopDriver
from tests.harness import eventually

_CONNACK = b"\x20\x02\x00\x00"


class _Peer:
    """Accepts one MQTT connection, sends CONNACK, then counts the bytes it reads while
    ``reading`` is set."""

    def __init__(self) -> None:
        self.received = 0
        self.reading = asyncio.Event()
        self.reading.set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readexactly(2)  # CONNECT's fixed header (a short packet)
            writer.write(_CONNACK)
            while True:
                await self.reading.wait()
                chunk = await reader.read(65536)
                if not chunk:
                    return
                self.received += len(chunk)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def _connected_client(driver: PahoLoopDriver, port: int) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="link-test")
    connected = asyncio.Event()
    client.on_connect = lambda *_args: connected.set()
    driver.attach(client)
    await asyncio.to_thread(client.connect, "127.0.0.1", port, 60)
    await asyncio.wait_for(connected.wait(), 10)
    return client


async def test_publishes_are_written_without_a_watch_and_a_full_socket_gets_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    watches: list[int] = []
    add_writer = loop.add_writer

    def counting_add_writer(fd: int, callback: Any, *args: Any) -> None:
        watches.append(fd)
        add_writer(fd, callback, *args)

    monkeypatch.setattr(loop, "add_writer", counting_add_writer)
    errors: list[BaseException] = []
    driver = PahoLoopDriver(loop, lambda _c, exc: errors.append(exc))
    peer = _Peer()
    port = await peer.start()
    client = await _connected_client(driver, port)
    try:
        start = peer.received
        client.publish("t/small", b"x" * 100, qos=0)
        await eventually(lambda: peer.received - start >= 100, "a small publish written", 10)
        assert watches == []  # written on the loop's next turn, no writable watch

        peer.reading.clear()  # the peer stops reading: the socket fills up
        big = b"y" * (8 << 20)
        client.publish("t/big", big, qos=0)
        await eventually(lambda: watches, "a writable watch on the full socket", 10)
        assert client.want_write()  # paho holds bytes the socket refused
        assert len(watches) == 1
        before = peer.received
        peer.reading.set()  # the writable watch must now deliver the rest
        await eventually(lambda: peer.received - before >= len(big) - (4 << 20), "the rest", 30)
        await eventually(lambda: not client.want_write(), "paho's queue empty", 30)
        assert errors == []
    finally:
        driver.forget(client)
        await peer.close()
