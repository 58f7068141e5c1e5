"""A `protocol: tcp` listener: each app connection spliced to a connection to the cluster."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from sidecar.downstream.context import ListenerContext
from sidecar.downstream.tunnel import splice
from sidecar.errors import InternalError, NoRoute, SidecarError
from sidecar.log import Throttled
from sidecar.rescue import internal_error
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.connection import reset
from sidecar.upstream.pool import Pool

log = logging.getLogger("sidecar.tcp")
# One line per interval: a dead upstream fails every app connection the same way.
_CONNECT_LOG = Throttled(log, interval=5.0)


class TcpProxyProtocol(asyncio.Protocol):
    """Holds the app's bytes (reading paused) until the upstream connection exists, then hands
    both sockets to a Tunnel.

    Each app connection gets an upstream connection of its own, opened at once
    (`Pool.open_dedicated`): tunnels never wait in the pool's queue, which is for HTTP
    requests. What limits a TCP listener is its own `limits.max_connections` (beyond it, new
    app connections wait in the kernel backlog, as on HTTP listeners) and the cluster's
    `connect_timeout`."""

    def __init__(self, ctx: ListenerContext, cluster_name: str) -> None:
        self.ctx = ctx
        self.cluster_name = cluster_name
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.pool: Pool | None = None
        self.cluster: Cluster | None = None
        self.closed = False
        self.eof = False
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        ctx = self.ctx
        ctx.stats.downstream_connections += 1
        ctx.stats.inflight += 1
        self.started = ctx.loop.time()
        transport.pause_reading()
        cluster = ctx.clusters.get(self.cluster_name)
        try:
            if cluster is None:
                raise NoRoute(f"cluster {self.cluster_name} does not exist")
            self.cluster = cluster
            refusal = ctx.admit()
            if refusal is not None:
                raise refusal
            pool = cluster.pick()
            pool.open_dedicated(self)  # counted in its inflight until tunnel_closed
            self.pool = pool
        except SidecarError as exc:
            self.on_pool_error(exc)
        except Exception as exc:  # a bug: the app still gets an answer (a close), logged once
            internal_error(exc, "tcp_accept", True)
            ctx.stats.internal_errors += 1
            self.on_pool_error(InternalError(f"{type(exc).__name__}", self.cluster_name))

    def data_received(self, data: bytes) -> None:
        # Only before the tunnel exists. uvloop starts reading after connection_made returns
        # even when it paused reading there, so pause again here: without this, an app sending
        # fast piled its bytes up here until the upstream connected (48 MiB sent, 85 MiB held).
        self.pending += data
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self._end()

    def _end(self) -> None:
        """The one place this app connection stops counting (and its tunnel, if any, in its
        pool's inflight)."""
        if self.closed:
            return
        self.closed = True
        self.ctx.stats.downstream_connections -= 1
        self.ctx.stats.inflight -= 1
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.tunnel_closed()
        self.ctx.changed()

    # --- TunnelWaiter ---------------------------------------------------------------------------
    def on_pool_tunnel(self, transport: asyncio.Transport) -> None:
        try:
            self._splice(transport)
        except Exception as exc:  # called from the connect task: it would only be logged
            internal_error(exc, "tcp_splice", True)
            self.ctx.stats.internal_errors += 1
            reset(transport)
            if self.transport is not None:
                self.transport.abort()

    def _splice(self, upstream: asyncio.Transport) -> None:
        if self.closed or self.transport is None:
            upstream.close()  # the app left while it connected
            return
        ctx = self.ctx

        def finished() -> None:
            if self.cluster is not None:
                self.cluster.stats.request_done(ctx.name, 200, ctx.loop.time() - self.started)
            self._end()

        splice(self.transport, upstream, ctx.tunnels, finished,
               to_upstream=bytes(self.pending), app_eof=self.eof)
        self.pending.clear()

    def on_pool_error(self, exc: SidecarError) -> None:
        if self.cluster is not None:
            self.cluster.stats.local_error(exc.code)
        _CONNECT_LOG.log(
            "tcp_connect", logging.WARNING, "tcp connect failed",
            listener=self.ctx.name, cluster=self.cluster_name, error=exc.code, detail=exc.detail,
        )
        if self.closed:
            return  # the app left while we connected: already counted out
        if self.transport is not None:
            self.transport.close()
        self._end()

