"""A byte splice between two transports: CONNECT, WebSocket upgrades and TCP listeners.

Each transport gets a `_End` protocol (via `set_protocol`). Bytes read on one end are written
to the other; when the other's write buffer passes its high-water mark, the reading end is
paused until it drains (backpressure both ways). Half-close is carried across: EOF from one
side becomes `write_eof()` on the other, and the tunnel closes once both directions ended or
either side is lost. `on_close` tells the owner (for counting and draining).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.flow_control import WRITE_HIGH_WATER, WRITE_LOW_WATER
from sidecar.upstream.connection import reset


class _End(asyncio.Protocol):
    __slots__ = ("tunnel", "transport", "peer", "eof", "closed", "bytes_in")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: _End | None = None
        self.eof = False
        self.closed = False
        self.bytes_in = 0

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.closed:
            return False
        if peer.eof:
            self.tunnel.close()
            return False
        # A TLS transport (an upstream the sidecar originates TLS to) closes on EOF whatever we
        # answer (asyncio warns if asked to stay open), and cannot send a half-close either.
        tls = self.transport.get_extra_info("ssl_object") is not None
        if peer.transport.can_write_eof():
            try:
                peer.transport.write_eof()
            except (OSError, RuntimeError):
                self.tunnel.close()
                return False
            return not tls  # keep our write side open: the peer may still send
        if peer.transport.get_extra_info("ssl_object") is not None and not tls:
            # The app half-closed towards a TLS upstream: the EOF cannot be carried; keep the
            # other direction open until the upstream has answered and closed.
            return True
        self.tunnel.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.tunnel.end_lost(self)

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.closed:
            try:
                peer.transport.pause_reading()
            except RuntimeError:
                pass

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.closed:
            try:
                peer.transport.resume_reading()
            except RuntimeError:
                pass


class Tunnel:
    """Owns the two ends; `close()` flushes both, `abort()` resets both."""

    __slots__ = ("app", "upstream", "on_close", "_done")

    def __init__(
        self,
        app: asyncio.Transport,
        upstream: asyncio.Transport,
        on_close: Callable[[Tunnel], None] | None = None,
    ) -> None:
        self.app = _End(self, app)
        self.upstream = _End(self, upstream)
        self.app.peer = self.upstream
        self.upstream.peer = self.app
        self.on_close = on_close
        self._done = False
        for end in (self.app, self.upstream):
            end.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
            end.transport.set_protocol(end)
            # Reading may have been paused by the HTTP layer; the tunnel reads both ways.
            try:
                end.transport.resume_reading()
            except RuntimeError:
                pass

    def start(self, to_upstream: bytes = b"", to_app: bytes = b"") -> None:
        if to_upstream:
            self.upstream.transport.write(to_upstream)
        if to_app:
            self.app.transport.write(to_app)

    @property
    def bytes(self) -> tuple[int, int]:
        """(from app, from upstream)."""
        return self.app.bytes_in, self.upstream.bytes_in

    def end_lost(self, end: _End) -> None:
        peer = end.peer
        if peer is not None and not peer.closed:
            peer.transport.close()  # flush what we already have for it, then close
        self._finish()

    def close(self, linger: float | None = None) -> None:
        """Graceful: flush and FIN both ends; with `linger`, reset whatever has not closed
        within that many seconds (SO_LINGER's bound, without blocking the loop in close())."""
        for end in (self.app, self.upstream):
            if not end.closed:
                end.transport.close()
        if linger is not None and not (self.app.closed and self.upstream.closed):
            asyncio.get_running_loop().call_later(linger, self._linger_expired)
        self._finish()

    def _linger_expired(self) -> None:
        for end in (self.app, self.upstream):
            if not end.closed:
                reset(end.transport)

    def abort(self) -> None:
        for end in (self.app, self.upstream):
            if not end.closed:
                reset(end.transport)
        self._finish()

    def _finish(self) -> None:
        """Report once: the tunnel ended (one end is gone and the other is closing)."""
        if self._done:
            return
        self._done = True
        if self.on_close is not None:
            self.on_close(self)

    @property
    def done(self) -> bool:
        return self._done


def splice(
    app: asyncio.Transport,
    upstream: asyncio.Transport,
    tunnels: set[Tunnel],
    on_end: Callable[[], None],
    to_upstream: bytes = b"",
    to_app: bytes = b"",
    app_eof: bool = False,
) -> Tunnel:
    """The one tunnel hand-off (CONNECT, accepted upgrades, TCP listeners): start a tunnel
    between the two sockets, kept in `tunnels` until it ends, when `on_end` runs once. The
    bytes each side sent before (`to_upstream`, `to_app`) go first; an app's EOF that arrived
    before the tunnel existed (`app_eof`) is carried across."""

    def finished(tunnel: Tunnel) -> None:
        tunnels.discard(tunnel)
        on_end()

    tunnel = Tunnel(app, upstream, finished)
    tunnels.add(tunnel)
    tunnel.start(to_upstream=to_upstream, to_app=to_app)
    if app_eof and upstream.can_write_eof():
        upstream.write_eof()
        tunnel.app.eof = True
    return tunnel
