"""A loopback TCP proxy the chaos harness controls: cut, pause and drop connections on cue.

Two uses in the harness:

* between the gateway's bridge and Kafka (each broker advertises the proxy's port, see
  ``start_kafka(proxy_ports=...)``), so "cut" is a real network failure for the producer;
* between the simulated devices and the gateway's MQTT listener, so every device loses its
  connection at the same instant (a reconnect storm) and the gateway can restart on a new
  port while devices keep one address.

Controls:

* :meth:`TcpProxy.cut` - close every proxied connection (RST) and refuse new ones until
  :meth:`TcpProxy.restore`;
* :meth:`TcpProxy.drop_all` - close every proxied connection, keep accepting new ones;
* :meth:`TcpProxy.pause` / :meth:`TcpProxy.resume` - stop relaying bytes (connections stay
  open and nothing is read, so TCP backpressure builds up), like a black-holed link.

The relay holds at most one read chunk per direction, so memory is bounded whatever the
peers do. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from dataclasses import dataclass

__all__ = ["ProxyStats", "TcpProxy"]

_log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_CONNECT_TIMEOUT_S = 5.0


@dataclass
class ProxyStats:
    """Counters since the proxy started."""

    accepted: int = 0
    refused: int = 0
    """Connections closed at once: cut, or the upstream did not accept."""
    upstream_failures: int = 0
    dropped: int = 0
    """Established connections closed by cut/drop_all."""
    bytes_up: int = 0
    bytes_down: int = 0


class _Link:
    """One proxied connection: the client side, the upstream side and two pumps."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.pumps: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            _reset(writer)
        for pump in self.pumps:
            pump.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a failed network path or a dead peer looks."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:upstream_port``; use as an async context
    manager or call :meth:`start` / :meth:`close`."""

    def __init__(
        self, upstream_port: int | None = None, *, listen_port: int = 0, name: str = "proxy"
    ) -> None:
        self.name = name
        self.upstream_port = upstream_port
        self.stats = ProxyStats()
        self._listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._cut = False
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def port(self) -> int:
        """The port clients connect to (known after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError(f"{self.name}: not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def is_cut(self) -> bool:
        """True between :meth:`cut` and :meth:`restore`."""
        return self._cut

    @property
    def is_paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return not self._flowing.is_set()

    @property
    def active(self) -> int:
        """Connections relayed right now."""
        return len(self._links)

    async def start(self) -> TcpProxy:
        """Bind and start accepting."""
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self._listen_port, reuse_address=True
        )
        return self

    def set_upstream(self, port: int | None) -> None:
        """Where new connections go (existing ones keep their upstream). None: refuse."""
        self.upstream_port = port

    def cut(self) -> int:
        """Close every connection and refuse new ones until :meth:`restore`; returns how many
        were closed."""
        self._cut = True
        return self.drop_all()

    def restore(self) -> None:
        """Accept and relay again after :meth:`cut` (also resumes a pause)."""
        self._cut = False
        self._flowing.set()

    def drop_all(self) -> int:
        """Close every established connection now (new ones are still accepted)."""
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        self.stats.dropped += len(links)
        return len(links)

    def pause(self) -> None:
        """Stop relaying bytes; connections stay open (a black hole) until :meth:`resume`."""
        self._flowing.clear()

    def resume(self) -> None:
        """Relay again after :meth:`pause`."""
        self._flowing.set()

    async def close(self) -> None:
        """Stop listening, close every connection, wait for the handlers to finish."""
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        self.drop_all()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ relay

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio runs each accepted connection as its own task; remember it so close() can
        # cancel and await it (no orphan tasks).
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_port = self.upstream_port
        if self._cut or upstream_port is None:
            self.stats.refused += 1
            _reset(writer)
            return
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except (OSError, TimeoutError):
            self.stats.upstream_failures += 1
            self.stats.refused += 1
            _reset(writer)
            return
        if self._cut:  # cut while connecting
            _reset(up_writer)
            _reset(writer)
            self.stats.refused += 1
            return
        self.stats.accepted += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            async with asyncio.TaskGroup() as group:
                link.pumps = [
                    group.create_task(self._pump(reader, up_writer, up=True)),
                    group.create_task(self._pump(up_reader, writer, up=False)),
                ]
        except* (OSError, ConnectionError):
            pass  # a reset side ends the link; nothing to report
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        while True:
            await self._flowing.wait()
            data = await reader.read(_CHUNK)
            if not data:
                # Half-close is rare for MQTT and Kafka; a closed side ends the whole link.
                raise ConnectionResetError("peer closed")
            # Paused while reading: hold this one chunk until resumed (bounded memory).
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
            if up:
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
