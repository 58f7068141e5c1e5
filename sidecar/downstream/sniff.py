"""One port, two protocols: the first bytes of an app connection choose HTTP/1.1 or HTTP/2.

Every `protocol: http` listener accepts with a `SniffProtocol`. Its first read decides: the
HTTP/2 connection preface (`PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n`, RFC 9113 3.4: what an h2c
client with prior knowledge, such as a gRPC channel to an insecure target, sends first) hands
the connection to `H2AppConnection`; anything else to `DownstreamProtocol`, exactly as when it
was the listener's protocol. The hand-over is `transport.set_protocol` and the new protocol's
`connection_made`, once per connection: after it, reads go straight to the chosen protocol,
so HTTP/1.1 pays one comparison of its first bytes and nothing per request.

Until it decides, the sniffer stands in for the connection where the listener looks: it is
counted as an app connection, is idle for the drain, and is closed if no decision comes within
`header_timeout` (a client that sent a prefix of the preface and stalled). The HTTP/2 module
(and the engine it loads) is imported on the first HTTP/2 connection only.
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

from sidecar.downstream.context import ListenerContext
from sidecar.downstream.protocol import DownstreamProtocol
from sidecar.upstream.connection import reset

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_PREFACE_LEN: Final = len(PREFACE)


class SniffProtocol(asyncio.Protocol):
    __slots__ = ("ctx", "transport", "buffered", "handed", "closed", "timer")

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.buffered = b""
        self.handed = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.stats.downstream_connections += 1
        self.timer = ctx.loop.call_later(ctx.limits.header_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self.handed:
            return
        if self.buffered:
            data = self.buffered + data
        if data[:1] == b"P" and PREFACE.startswith(data[:_PREFACE_LEN]):
            if len(data) < _PREFACE_LEN:
                self.buffered = data  # a prefix of the preface so far: wait for the rest
                return
            from sidecar.downstream.http2 import H2AppConnection  # the first h2 connection

            self._hand_over(H2AppConnection(self.ctx), data)
            return
        self._hand_over(DownstreamProtocol(self.ctx), data)

    def _hand_over(self, proto: asyncio.Protocol, data: bytes) -> None:
        """`proto` takes the connection over, with what was read so far; the counts move with
        it (down here, up in its `connection_made`, with nothing run in between)."""
        self.handed = True
        self.buffered = b""
        self._leave()
        transport = self.transport
        assert transport is not None
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handed or self.closed:
            return
        self.closed = True
        self._leave()
        self.ctx.changed()

    def _leave(self) -> None:
        """The sniffer no longer holds the connection: its timer and its place in the
        listener's connections and count go."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.stats.downstream_connections -= 1

    def _too_slow(self) -> None:
        self.timer = None
        if self.transport is not None and not self.handed:
            self.transport.close()

    # --- draining (ListenerContext.connections): no request has begun -----------------------
    @property
    def idle(self) -> bool:
        return True

    def close_if_idle(self) -> bool:
        if self.transport is not None and not self.closed and not self.handed:
            self.transport.close()
            return True
        return False

    def abort(self) -> None:
        if self.transport is not None and not self.closed and not self.handed:
            reset(self.transport)
