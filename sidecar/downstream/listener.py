"""Binding listeners and accepting app connections: loopback unless allowed, EMFILE-proof.

We run our own accept loop (a reader on the listening socket) instead of `create_server`,
for two things the loops do not offer: at `max_connections` we stop accepting and leave new
connections in the kernel backlog (they wait, they are not refused); and when the process is
out of file descriptors (EMFILE) we shed: a reserved descriptor is freed, the pending
connection accepted and closed at once, counted, logged once per interval, and the loop goes
on. Accepted sockets are handed to `connect_accepted_socket` with the listener's protocol.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable

from sidecar.observe.stats import ListenerStats

log = logging.getLogger("sidecar.listener")

_ACCEPT_BATCH = 64
_SHED_LOG_INTERVAL = 10.0
_RETRY_AFTER_EMFILE = 0.1


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Listener:
    """One listening socket feeding `protocol_factory`."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        protocol_factory: Callable[[], asyncio.Protocol],
        stats: ListenerStats,
        loop: asyncio.AbstractEventLoop,
        max_connections: int = 10000,
        allow_remote: bool = False,
        backlog: int = 1024,
    ) -> None:
        if not allow_remote and not is_loopback(host):
            raise ValueError(
                f"listener {name}: {host} is not a loopback address; an egress listener "
                "reachable from outside the pod is an open relay (set allow_remote: true)"
            )
        self.name = name
        self.host = host
        self.port = port
        self._factory = protocol_factory
        self._stats = stats
        self._loop = loop
        self._max = max_connections
        self._backlog = backlog
        self._sock: socket.socket | None = None
        self._reading = False
        self._reserve: int | None = None
        self._last_shed_log = -1e9
        self._shed_since_log = 0
        self._tasks: set[asyncio.Task[object]] = set()
        self._closed = False

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(self._backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._reserve = os.open(os.devnull, os.O_RDONLY)
        self._start_reading()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _start_reading(self) -> None:
        if not self._reading and self._sock is not None and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def capacity_changed(self) -> None:
        """A connection closed: resume accepting if we had stopped at max_connections."""
        if not self._reading and self._stats.downstream_connections < self._max:
            self._start_reading()

    def _accept(self) -> None:
        sock = self._sock
        assert sock is not None
        for _ in range(_ACCEPT_BATCH):
            if self._stats.downstream_connections + len(self._tasks) >= self._max:
                # Leave the rest in the kernel backlog until a connection closes.
                self._stop_reading()
                return
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._shed()
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._factory, conn)
            )
            self._tasks.add(task)
            task.add_done_callback(self._accepted)

    def _accepted(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("accept failed", extra={"fields": {"listener": self.name,
                                                            "error": str(task.exception())}})

    def _shed(self) -> None:
        """Out of descriptors: free the reserve, accept and close one pending connection, so
        the backlog does not hold the app's connect forever, and pause briefly."""
        sock = self._sock
        assert sock is not None
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, _ = sock.accept()
                conn.close()
            except OSError:
                pass
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._reserve = None
        self._stats.shed_connections += 1
        self._shed_since_log += 1
        now = self._loop.time()
        if now - self._last_shed_log >= _SHED_LOG_INTERVAL:
            log.error(
                "out of file descriptors: shedding new connections",
                extra={"fields": {"listener": self.name, "shed": self._shed_since_log}},
            )
            self._last_shed_log = now
            self._shed_since_log = 0
        self._stop_reading()
        self._loop.call_later(_RETRY_AFTER_EMFILE, self._start_reading)

    def stop_accepting(self) -> None:
        """Close the listening socket (new connects are refused by the kernel)."""
        self._closed = True
        self._stop_reading()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def __repr__(self) -> str:
        return f"<Listener {self.name} {self.host}:{self.port}>"
