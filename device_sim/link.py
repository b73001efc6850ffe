"""Drive many paho-mqtt clients from one asyncio loop (the way aiomqtt does it).

paho's ``loop_start()`` is one thread and one ``select()`` per client and breaks at about 340
clients (file descriptors >= 1024). Instead paho tells us about its socket through the
``on_socket_*`` callbacks and we register it with the event loop: readable → ``loop_read()``;
when paho queues bytes, ``loop_write()`` on the loop's next turn, and a writable watch only if
the socket did not take them all; one timer calls ``loop_misc()`` (keepalive pings, ping
timeouts) for every client once a second.

The write goes first and the watch only after: a socket with room is the usual case, and a
watch per publish (``add_writer``, an epoll wake-up, ``remove_writer``) showed as 14 % of the
simulator's profile at 4,000 msg/s; without it the simulator spends 7 % less CPU per message
(docs/benchmarks.md, session 11). It shares the cores with the gateway it measures.

paho's ``connect()`` does a blocking TCP connect, so it runs in a worker thread (a full
listen backlog would otherwise stall the whole loop for a SYN retransmit). The socket
callbacks it fires from that thread are handed to the loop with ``call_soon_threadsafe``;
callbacks fired on the loop thread act at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["PahoLoopDriver"]


class PahoLoopDriver:
    """Registers paho clients' sockets with one asyncio loop.

    ``on_error(client, exc)`` is called when paho raises out of ``loop_read``/``loop_write``
    (it normally reports I/O errors as return codes and ``on_disconnect`` instead).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_error: Callable[[mqtt.Client, BaseException], None],
    ) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._on_error = on_error
        self._open: dict[mqtt.Client, int] = {}

    @property
    def open_sockets(self) -> int:
        """Clients with a socket registered right now."""
        return len(self._open)

    def attach(self, client: mqtt.Client) -> None:
        """Route ``client``'s socket events to this loop; call before ``connect``."""
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write

    def misc(self) -> None:
        """Keepalive work for every client; the fleet calls this once a second."""
        for client in list(self._open):
            try:
                client.loop_misc()
            except Exception as exc:
                self._on_error(client, exc)

    def forget(self, client: mqtt.Client) -> None:
        """Unregister and close ``client``'s socket without MQTT (last resort at shutdown)."""
        fd = self._open.pop(client, None)
        if fd is not None:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _call(self, func: Callable[..., Any], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            func(*args)
        else:
            self._loop.call_soon_threadsafe(func, *args)

    # paho callbacks: (client, userdata, sock); they may run on the connect thread.

    def _socket_open(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._call(self._add_reader, client, sock.fileno())

    def _socket_close(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        # The fd is captured now: paho closes the socket right after this callback.
        self._call(self._remove, client, sock.fileno())

    def _register_write(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._call(self._add_writer, client, sock.fileno())

    def _unregister_write(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self._call(self._loop.remove_writer, fd)

    # loop-thread side

    def _add_reader(self, client: mqtt.Client, fd: int) -> None:
        self._open[client] = fd
        self._loop.add_reader(fd, self._readable, client)

    def _add_writer(self, client: mqtt.Client, fd: int) -> None:
        if self._open.get(client) == fd:
            # Not from inside paho's publish() (it holds its locks and may be in a callback):
            # on the loop's next turn, with whatever else was queued meanwhile.
            self._loop.call_soon(self._write_now, client, fd)

    def _write_now(self, client: mqtt.Client, fd: int) -> None:
        if self._open.get(client) != fd:
            return  # closed meanwhile
        try:
            client.loop_write()
        except Exception as exc:
            self._on_error(client, exc)
            return
        if client.want_write() and self._open.get(client) == fd:
            self._loop.add_writer(fd, self._writable, client, fd)  # the socket is full

    def _remove(self, client: mqtt.Client, fd: int) -> None:
        if fd < 0:
            # paho closing a socket that :meth:`forget` already closed: nothing registered.
            return
        if self._open.get(client) == fd:
            del self._open[client]
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)

    def _readable(self, client: mqtt.Client) -> None:
        try:
            client.loop_read()
        except Exception as exc:
            self._on_error(client, exc)

    def _writable(self, client: mqtt.Client, fd: int) -> None:
        try:
            client.loop_write()
        except Exception as exc:
            self._on_error(client, exc)
        # Guard against a stale registration (a register queued from the connect thread that
        # landed after paho had already drained its queue): never spin on a writable socket.
        if not client.want_write():
            self._loop.remove_writer(fd)
