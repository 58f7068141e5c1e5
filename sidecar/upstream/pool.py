"""A keep-alive pool for one endpoint: idle connections (LIFO), FIFO waiters, limits, expiry.

Decisions are synchronous and made in plain methods (httpcore's pool does the same); the only
awaits are the connects, each in a task the pool owns. Handing out an idle connection costs
no allocation and no await: that is the hot path of a keep-alive proxy.

Freshness: an idle connection is never handed out once its upstream closed it (its protocol
saw EOF/RST and left the pool at once), once the upstream's `Keep-Alive: timeout=` or our
`idle_timeout` (or a learned shorter idle timeout) is about to pass, or past its jittered
`max_lifetime`. LIFO reuse keeps the freshest connections busy and lets the rest idle out.
One timer per pool (through the wheel) closes idle connections as they expire.

The keep-alive race (a request crossing the upstream's FIN) is narrowed two more ways, both
only for endpoints that have been seen closing idle connections themselves (`watch_closes`),
so that the others pay nothing: the kernel is asked, just before reuse, whether a FIN or RST
is already waiting that the loop has not read (`UpstreamConnection.peer_gone`, one poll(2));
and an endpoint that closes right after every response is not reused for a while (see
EARLY_CLOSE below).

`min_idle` is refilled as soon as the idle count drops below it (an idle connection handed
out, or closed by the upstream), not when the timer next fires: the next burst must find warm
connections. Connects in flight that no waiter will take count as refills, so there is never
more than one refill in flight per missing slot, and never beyond `max_connections`. No refill
while the endpoint is not `warm` (terminating, not ready, unhealthy, ejected: the cluster says)
or the pool is closing. A `terminating` endpoint keeps no idle connection: its idle ones close
at once and the ones its in-flight requests finish with are closed instead of pooled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, cast

from sidecar.clock import Clock
from sidecar.errors import (
    ConnectFailed,
    LocalResourcesExhausted,
    PoolTimeout,
    SidecarError,
    local_shortage,
)
from sidecar.observe.stats import ClusterStats
from sidecar.streams import Carrier, CarrierOwner, EndpointStream, EndpointUser, StreamWaiter
from sidecar.timers import Timed, Wheel
from sidecar.upstream.connection import UpstreamConnection
from sidecar.upstream.h2settings import H2Settings

if TYPE_CHECKING:
    from sidecar.config import PoolConfig
    from sidecar.upstream.http2 import H2Connection

log = logging.getLogger("sidecar.pool")

# How long idle connections above max_idle may stay before they are closed.
EXCESS_IDLE: Final = 1.0

# An endpoint that closes connections right after its responses while advertising keep-alive
# makes every reuse a race with its FIN. A close counts as "right after" when the connection
# had been idle at most EARLY_CLOSE (the FIN travels with the response: the loop sees it one
# iteration or a few later), or when a reused connection failed as a keep-alive race (the
# exchange tells the pool). After EARLY_CLOSES such closes in a row (a reuse that got its
# response breaks the row), the endpoint's connections are not reused for REUSE_HOLD seconds:
# each is closed after its response, as if it had said `Connection: close`. Then reuse is tried
# again, so an endpoint that was fixed (or redeployed) is reused again within REUSE_HOLD.
EARLY_CLOSE: Final = 0.05
EARLY_CLOSES: Final = 3
REUSE_HOLD: Final = 30.0


@dataclass(frozen=True, slots=True)
class PoolSettings:
    max_connections: int = 100
    min_idle: int = 0
    max_idle: int = 20
    idle_timeout: float = 60.0
    max_lifetime: float = 600.0
    connect_timeout: float = 2.0
    max_pending: int = 1000
    pending_timeout: float = 1.0

    @classmethod
    def from_config(cls, cfg: PoolConfig) -> PoolSettings:
        return cls(
            max_connections=cfg.max_connections,
            min_idle=cfg.min_idle,
            max_idle=cfg.max_idle,
            idle_timeout=cfg.idle_timeout,
            max_lifetime=cfg.max_lifetime,
            connect_timeout=cfg.connect_timeout,
            max_pending=cfg.max_pending,
            pending_timeout=cfg.pending_timeout,
        )


class TunnelWaiter(Protocol):
    """A `protocol: tcp` listener's app connection waiting for its dedicated upstream socket
    (`Pool.open_dedicated`). A Protocol: one call per TCP connection, off the request path."""

    def on_pool_tunnel(self, transport: asyncio.Transport) -> None: ...
    def on_pool_error(self, exc: SidecarError) -> None: ...


class TlsHooks(Protocol):
    """What the pool needs of a cluster's TLS origin (see upstream/tls.py)."""

    server_hostname: str | None

    def context_for_connect(self) -> ssl.SSLContext: ...
    def connect_timeouts(self, connect_timeout: float) -> tuple[float, float]: ...
    def on_connected(self, transport: asyncio.BaseTransport) -> None: ...
    def describe_error(self, exc: BaseException) -> str: ...
    def capture_session(self, transport: asyncio.BaseTransport) -> None: ...


class _Pending(Timed):
    """A queued waiter with its pending_timeout deadline (a Timed for the wheel)."""

    __slots__ = ("waiter", "user", "method", "deadline", "filed_bucket", "since", "pool", "done",
                 "mux")

    def __init__(self, waiter: StreamWaiter, user: EndpointUser, method: bytes, since: float,
                 deadline: float, pool: Pool, mux: bool = False) -> None:
        self.mux = mux  # waits for an HTTP/2 stream (else an HTTP/1.1 connection)
        self.waiter = waiter
        self.user = user
        self.method = method
        self.since = since
        self.deadline = deadline
        self.filed_bucket = 0
        self.pool = pool
        self.done = False

    def on_deadline(self, now: float) -> None:
        if not self.done:
            self.pool._expire_waiter(self)


class Pool(Timed, CarrierOwner):
    __slots__ = (
        "cluster",
        "ip",
        "port",
        "key",
        "settings",
        "stats",
        "_loop",
        "_now",
        "_wheel",
        "_idle",
        "_active",
        "_connecting",
        "_waiters",
        "_tasks",
        "tls",
        "deadline",
        "filed_bucket",
        "learned_idle_timeout",
        "closing",
        "on_connection_closed",
        "_tunnels",
        "watch_closes",
        "early_closes",
        "no_reuse_until",
        "warm",
        "terminating",
        "protocol",
        "h2",
        "alpn_h2",
        "_mux",
        "_mux_connecting",
        "_mux_waiting",
    )

    def __init__(
        self,
        cluster: str,
        ip: str,
        port: int,
        settings: PoolSettings,
        stats: ClusterStats,
        loop: asyncio.AbstractEventLoop,
        wheel: Wheel,
        tls: TlsHooks | None = None,
        clock: Clock | None = None,
        protocol: str = "http1",
        h2: H2Settings | None = None,
    ) -> None:
        self.cluster = cluster
        # SPEC section 11: "http1", "http2" or "auto" (TLS: the endpoint's ALPN choice, learned
        # from the first handshake; cleartext: the app's protocol, per request).
        self.protocol = protocol
        self.h2 = h2 if h2 is not None else H2Settings()
        self.alpn_h2: bool | None = None  # auto with TLS: what the endpoint chose, once known
        self._mux: list[H2Connection] = []  # open HTTP/2 connections (idle or carrying streams)
        self._mux_connecting = 0  # of _connecting: HTTP/2 connects
        self._mux_waiting = 0  # of _waiters: those waiting for an HTTP/2 stream
        self.ip = ip
        self.port = port
        self.key = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        self.settings = settings
        self.stats = stats
        self.tls = tls
        self._loop = loop
        # The one clock the pool reads (sidecar/clock.py): the loop's, unless a test gives a
        # fake one. A bound method, called without a lookup by name.
        self._now: Callable[[], float] = clock.now if clock is not None else loop.time
        self._wheel = wheel
        self._idle: list[Carrier] = []  # a stack: the freshest is last
        self._active: set[Carrier] = set()  # carrying a request's stream
        self._connecting = 0
        self._waiters: deque[_Pending] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.deadline = math.inf  # earliest idle expiry (Timed)
        self.filed_bucket = 0
        self.learned_idle_timeout = math.inf
        self.closing = False
        self._tunnels = 0  # dedicated connections (TCP listeners) not yet closed
        self.watch_closes = False  # the endpoint closes idle connections: look before reuse
        self.early_closes = 0  # closes right after a response, in a row
        self.no_reuse_until = 0.0  # loop time until which connections are not reused
        # Set by the cluster. `warm`: min_idle connections may be opened ahead of requests (the
        # endpoint is serving: ready, not terminating, healthy, not ejected). `terminating`:
        # discovery says it takes no new requests; nothing is kept idle (see set_terminating).
        self.warm = True
        self.terminating = False
        self.on_connection_closed: Callable[[Pool], None] | None = None

    # --- introspection ---------------------------------------------------------------------------
    def now(self) -> float:
        return self._now()

    @property
    def inflight(self) -> int:
        """Requests using this endpoint now (least-request balancing): waiting for a stream,
        carried by one, or a TCP listener's tunnel. Counted here alone, from what the pool
        holds, so it cannot drift (the drain and the balancer read it)."""
        n = len(self._active) + len(self._waiters) + self._tunnels
        for conn in self._mux:
            n += conn.stream_count()
        return n

    @property
    def streams(self) -> int:
        """Open HTTP/2 streams on this endpoint's connections (sidecar_upstream_streams)."""
        n = 0
        for conn in self._mux:
            n += conn.stream_count()
        return n

    def protocol_name(self) -> str:
        """What the connections to this endpoint speak now (`/clusters`): http2 when any is
        HTTP/2 (or the cluster says http2), else http1."""
        return "http2" if self._mux or self.protocol == "http2" or self.alpn_h2 else "http1"

    @property
    def idle_count(self) -> int:
        return len(self._idle) + sum(1 for c in self._mux if c.is_idle())

    @property
    def active_count(self) -> int:
        return len(self._active) + sum(1 for c in self._mux if not c.is_idle())

    @property
    def pending_count(self) -> int:
        return len(self._waiters)

    @property
    def connecting_count(self) -> int:
        return self._connecting

    @property
    def total(self) -> int:
        return len(self._idle) + len(self._active) + self._connecting + len(self._mux)

    def __repr__(self) -> str:
        return (
            f"<Pool {self.cluster}/{self.key} [Requests: {self.inflight} active, "
            f"{len(self._waiters)} queued | Connections: {len(self._active)} active, "
            f"{len(self._idle)} idle, {self._connecting} connecting]>"
        )

    def _idle_timeout(self) -> float:
        configured = self.settings.idle_timeout  # not min(): a generic call, compiled
        learned = self.learned_idle_timeout
        return learned if learned < configured else configured

    # --- acquiring ------------------------------------------------------------------------------
    def take_idle(self, now: float = 0.0) -> Carrier | None:
        """A fresh idle connection, synchronously, or None. Expired ones found on the way are
        closed (that is the second line of defence; the expiry timer is the first). `now`:
        the clock, if the caller has just read it."""
        idle = self._idle
        if not idle:
            return None
        if not now:
            now = self._now()
        idle_timeout = self._idle_timeout()
        while idle:
            conn = idle.pop()
            if conn.usable(now, idle_timeout) and not (self.watch_closes and conn.peer_gone()):
                self._active.add(conn)
                if len(idle) < self.settings.min_idle:
                    self.prewarm()  # refill now: the next burst finds warm connections
                return conn
            self._retire(conn, now)
        return None

    def wants_mux(self, h2_app: bool) -> bool:
        """Whether a request goes out as an HTTP/2 stream (SPEC section 11): always for
        `http2`, never for `http1`; for `auto`, what the endpoint chose by ALPN with TLS (the
        first connect decides), else the app's own protocol (`h2_app`)."""
        protocol = self.protocol
        if protocol == "http2":
            return True
        if protocol == "http1":
            return False
        if self.tls is not None:
            return self.alpn_h2 is True
        return h2_app

    def acquire(
        self, waiter: StreamWaiter, user: EndpointUser, method: bytes, fresh: bool = False,
        h2_app: bool = False,
    ) -> EndpointStream | None:
        """A stream bound to `user` now (`method`: the request's, for the response parser),
        or None after queueing `waiter` (it is then called back exactly once with
        `on_pool_stream` or `on_pool_error`, unless it cancels). Raises PoolTimeout when the
        queue is full. `fresh`: skip idle connections and open a new one (after a stale one).
        `h2_app`: the app sent the request over HTTP/2 (see `wants_mux`)."""
        if self.protocol != "http1" and self.wants_mux(h2_app):
            return self._acquire_mux(waiter, user, method)
        now = self._now()
        if not fresh:
            conn = self.take_idle(now)
            if conn is not None:
                return conn.open_stream(user, method, now)
        if self.closing:
            raise ConnectFailed(f"{self.key}: endpoint is being removed", self.cluster)
        if len(self._waiters) >= self.settings.max_pending:
            raise PoolTimeout(f"{self.key}: max_pending ({self.settings.max_pending}) reached")
        pending = _Pending(waiter, user, method, now, now + self.settings.pending_timeout, self)
        self._waiters.append(pending)
        self._wheel.schedule(pending)
        # Open a connection for every waiter not already covered by a connect in flight.
        if self._h1_connecting() < self._h1_waiting() and (
            self.total < self.settings.max_connections
        ):
            self._start_connect()
        elif fresh and self.total >= self.settings.max_connections and self._idle:
            # A fresh connection is wanted but the pool is full: make room by closing the
            # oldest idle one (it may well be stale too).
            self.rotate_oldest(1)
            self._start_connect()
        # No min_idle refill from here: with no idle connection to take, the endpoint may well
        # be down, and refills per request would multiply the connects it refuses.
        return None

    def _h1_waiting(self) -> int:
        return len(self._waiters) - self._mux_waiting

    def _h1_connecting(self) -> int:
        return self._connecting - self._mux_connecting

    # --- HTTP/2: streams on few multiplexed connections ------------------------------------------
    def _acquire_mux(
        self, waiter: StreamWaiter, user: EndpointUser, method: bytes
    ) -> EndpointStream | None:
        """A stream on an open HTTP/2 connection with room, or None after queueing `waiter`.
        A new connection opens only when every open one carries as many streams as the peer
        allows (capped by `http2.max_concurrent_streams`), up to `max_connections`."""
        now = self._now()
        for conn in self._mux:
            if conn.capacity() > 0:
                if conn.past_lifetime(now):
                    conn.retire("max_lifetime")
                    continue
                return conn.open_stream(user, method, now)
        if self.closing:
            raise ConnectFailed(f"{self.key}: endpoint is being removed", self.cluster)
        if len(self._waiters) >= self.settings.max_pending:
            raise PoolTimeout(f"{self.key}: max_pending ({self.settings.max_pending}) reached")
        pending = _Pending(waiter, user, method, now, now + self.settings.pending_timeout, self,
                           True)
        self._waiters.append(pending)
        self._mux_waiting += 1
        self._wheel.schedule(pending)
        self._mux_connect_if_needed()
        return None

    def _mux_connect_if_needed(self) -> None:
        """Connects for the HTTP/2 waiters no open connection or connect in flight covers."""
        if self.closing or not self._mux_waiting:
            return
        per_conn = self.h2.max_concurrent_streams
        while (self._mux_waiting > self._mux_connecting * per_conn
               and self.total < self.settings.max_connections):
            self._start_connect(True)

    def _serve_mux(self, conn: H2Connection) -> None:
        """Give `conn`'s free streams to the oldest HTTP/2 waiters (with TLS `auto`, to any
        waiter: the endpoint chose h2 for all)."""
        any_kind = self.protocol != "auto" or self.tls is not None
        while self._waiters and conn.capacity() > 0:
            pending = self._next_waiter(None if any_kind else True)
            if pending is None:
                return
            now = self._now()
            self.stats.pool_wait.observe(now - pending.since)
            pending.waiter.on_pool_stream(conn.open_stream(pending.user, pending.method, now))

    def mux_capacity(self, conn: H2Connection) -> None:
        """`conn`'s room changed (the peer's SETTINGS, its GOAWAY): serve or connect."""
        if not conn.is_closed():
            self._serve_mux(conn)
        self._mux_connect_if_needed()

    def _mux_stream_ended(self, conn: H2Connection, now: float) -> None:
        if conn.is_closed():
            self._mux_connect_if_needed()
            return
        if conn.is_reusable() and conn.past_lifetime(now):
            conn.retire("max_lifetime")
        if conn.is_closed():
            self._mux_connect_if_needed()
            return
        if conn.is_idle() and (self.closing or self.terminating):
            conn.close("drain" if self.closing else "endpoint_removed")
            return
        self._serve_mux(conn)
        if conn.is_idle():
            expiry = conn.expiry(self._idle_timeout())
            if expiry < self.deadline:
                self.deadline = expiry
                self._wheel.schedule(self)
        self._mux_connect_if_needed()

    def cancel(self, waiter: StreamWaiter) -> None:
        """The waiter went away (the app disconnected, or its deadline passed)."""
        for pending in self._waiters:
            if pending.waiter is waiter:
                self._settle(pending)
                self._waiters.remove(pending)
                return

    def _settle(self, pending: _Pending) -> None:
        """`pending` is answered (or gone): the wheel lets go of it, and of the waiter's
        exchange it holds, now rather than at its pending_timeout."""
        if pending.mux and not pending.done:
            self._mux_waiting -= 1
        pending.done = True
        self._wheel.cancel(pending)

    def _expire_waiter(self, pending: _Pending) -> None:
        self._settle(pending)
        try:
            self._waiters.remove(pending)
        except ValueError:
            return
        self.stats.pool_wait.observe(self._now() - pending.since)
        pending.waiter.on_pool_error(
            PoolTimeout(
                f"no connection to {self.key} within {self.settings.pending_timeout:g}s",
                self.cluster,
            )
        )

    def _next_waiter(self, mux: bool | None = False) -> _Pending | None:
        """The oldest waiter for an HTTP/1.1 connection (`mux` False), an HTTP/2 stream
        (True) or either (None)."""
        waiters = self._waiters
        while waiters:
            pending = waiters[0]
            if pending.done:
                waiters.popleft()
                continue
            if mux is None or pending.mux is mux:
                waiters.popleft()
                self._settle(pending)
                return pending
            break
        if not waiters or (mux is False and not self._h1_waiting()):
            return None
        if mux is True and not self._mux_waiting:
            return None
        for pending in waiters:  # both kinds queued (auto in cleartext): the oldest of its kind
            if not pending.done and pending.mux is mux:
                waiters.remove(pending)
                self._settle(pending)
                return pending
        return None

    def _hand_over(self, conn: Carrier) -> bool:
        """Open a stream on `conn` (already counted active) for the oldest waiter. False when
        there is none."""
        pending = self._next_waiter(None if self.tls is not None else False)
        if pending is None:
            return False
        now = self._now()
        self.stats.pool_wait.observe(now - pending.since)
        pending.waiter.on_pool_stream(conn.open_stream(pending.user, pending.method, now))
        return True

    # --- connecting -----------------------------------------------------------------------------
    def _start_connect(self, mux: bool = False) -> None:
        self._connecting += 1
        if mux:
            self._mux_connecting += 1
        task = self._loop.create_task(self._connect(mux))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def prewarm(self) -> None:
        """Open connections until min_idle are idle or on their way to be (connects in flight
        beyond those the waiters will take). Never while not warm, terminating or closing."""
        if not self.warm or self.terminating or self.closing:
            return
        if self.protocol == "http2" or self.alpn_h2:
            # One HTTP/2 connection carries many streams: keep one open ahead of requests.
            if (self.settings.min_idle > 0 and not self._mux and not self._mux_connecting
                    and self.total < self.settings.max_connections):
                self._start_connect(True)
            return
        spare = self._connecting - len(self._waiters)  # connects that will end up idle
        missing = self.settings.min_idle - len(self._idle) - (spare if spare > 0 else 0)
        room = self.settings.max_connections - self.total
        for _ in range(missing if missing < room else room):
            self._start_connect()

    async def _open(self, conn: asyncio.Protocol) -> None:
        """Connect `conn`'s socket (and its TLS), within `connect_timeout`: the one place a
        socket to the endpoint is opened, for pooled and dedicated connections alike."""
        loop = self._loop
        tls = self.tls
        if tls is None:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, self.ip, self.port),
                self.settings.connect_timeout,
            )
            return
        handshake_timeout, total = tls.connect_timeouts(self.settings.connect_timeout)
        await asyncio.wait_for(
            loop.create_connection(
                lambda: conn,
                self.ip,
                self.port,
                ssl=tls.context_for_connect(),
                server_hostname=tls.server_hostname,
                ssl_handshake_timeout=handshake_timeout,
            ),
            total,
        )

    async def _first_settings(self, conn: H2Connection, started: float) -> None:
        """Wait (within what is left of `connect_timeout`) for the endpoint's first SETTINGS:
        its stream limit is known before any stream is handed out, and an endpoint that does
        not speak HTTP/2 fails here, as a connect."""
        seen = conn.settings_seen
        if seen is None or seen.done():
            return
        left = started + self.settings.connect_timeout - self._now()
        try:
            await asyncio.wait_for(seen, left if left > 0.05 else 0.05)
        except TimeoutError:
            raise ConnectionError("no HTTP/2 SETTINGS from the endpoint in time") from None
        if conn.is_closed():
            raise ConnectionError("the endpoint closed the connection before its HTTP/2 "
                                  "SETTINGS (does it speak HTTP/2?)")

    def _connected(self, conn: UpstreamConnection | H2Connection, started: float) -> None:
        """A connect succeeded: count it, its duration and its TLS handshake (resumed or not),
        and hand the TLS session to the cache."""
        self.stats.connections_opened += 1
        self.stats.connect_duration.observe(self._now() - started)
        tls = self.tls
        if tls is not None and conn.transport is not None:
            tls.on_connected(conn.transport)
            resumed = conn.tls_handshake()
            if resumed is not None:
                self.stats.tls_handshakes[resumed] += 1

    def _connect_error(self, exc: BaseException) -> SidecarError:
        """What a failed connect says to the request that waited for it: the sidecar's own
        shortage (EMFILE, ENOBUFS, EADDRNOTAVAIL...) is a verdict on nobody; the rest is the
        endpoint's `connect_failed`."""
        if local_shortage(exc):
            return LocalResourcesExhausted(self._describe(exc), self.cluster)
        return ConnectFailed(self._describe(exc), self.cluster)

    async def _connect(self, mux: bool = False) -> None:
        settings = self.settings
        started = self._now()
        # Jitter max_lifetime by up to -20 % so connections opened together do not all
        # expire (and reconnect) together.
        lifetime = settings.max_lifetime * (1.0 - 0.2 * random.random())
        probe: _AlpnProbe | None = None
        proto: asyncio.Protocol
        if self.tls is not None and (mux or (self.protocol == "auto" and self.alpn_h2 is None)):
            # The handshake's ALPN decides which carrier gets the socket: nothing is sent
            # before it (an endpoint that did not choose h2 never sees the HTTP/2 preface).
            proto = probe = _AlpnProbe(self, started, started + lifetime)
        elif mux:
            proto = _h2_connection(self, started, started + lifetime)
        else:
            proto = UpstreamConnection(self, self.key, started, started + lifetime)
        try:
            await self._open(proto)
            if probe is not None:
                proto = probe.chosen()
                spoken = not isinstance(proto, UpstreamConnection)
                if mux and not spoken:
                    raise ConnectionError(
                        f"TLS ALPN: the endpoint chose {probe.alpn or 'no protocol'}, not h2")
                if self.protocol == "auto":
                    self.alpn_h2 = spoken
            if not isinstance(proto, UpstreamConnection):
                await self._first_settings(cast("H2Connection", proto), started)
        except asyncio.CancelledError:
            self._connect_done(mux)
            _abort(proto, "drain")
            raise
        except Exception as exc:
            self._connect_done(mux)
            self._connect_failed(self._connect_error(exc), mux)
            _abort(proto, "error")  # connected, but not to a protocol we may speak
            return
        self._connect_done(mux)
        conn = cast("UpstreamConnection | H2Connection", proto)
        self._connected(conn, started)
        if conn.is_closed():
            return  # lost between connect and now
        if self.closing:
            conn.close("endpoint_removed")
            return
        conn.connected(self._now())
        if not isinstance(conn, UpstreamConnection):
            self._mux.append(conn)
            conn.on_capacity = self.mux_capacity
            self._serve_mux(conn)
            self._mux_stream_ended(conn, self._now())  # idle: its expiry on the timer
            return
        self._active.add(conn)
        if not self._hand_over(conn):
            self._active.discard(conn)
            self._park(conn)

    # --- dedicated connections (TCP listeners' tunnels) --------------------------------------
    def open_dedicated(self, waiter: TunnelWaiter) -> None:
        """Open a connection of its own for `waiter` (a `protocol: tcp` listener's tunnel) and
        call it back exactly once. Outside `max_connections`, `max_pending` and
        `pending_timeout`: those bound pooled HTTP requests, and a burst of tunnels must not
        take their places (1,500 simultaneous TCP connections once left 1,077 of them closed
        without data and an HTTP request to the same cluster with 503 pool_timeout). What
        bounds tunnels is their listener's `max_connections` and the kernel backlog; only
        `connect_timeout` applies here. Raises ConnectFailed when the endpoint is going.

        Counted in `inflight` from here until the waiter calls `tunnel_closed`, once, however
        its connection ends (its tunnel closed, the connect failed, the app left first)."""
        if self.closing:
            raise ConnectFailed(f"{self.key}: endpoint is being removed", self.cluster)
        self._tunnels += 1
        task = self._loop.create_task(self._connect_dedicated(waiter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_dedicated(self, waiter: TunnelWaiter) -> None:
        started = self._now()
        conn = UpstreamConnection(self, self.key, started, math.inf)
        try:
            await self._open(conn)
        except asyncio.CancelledError:
            conn.abort("drain")
            raise
        except Exception as exc:
            waiter.on_pool_error(self._connect_error(exc))
            return
        self._connected(conn, started)
        transport = None
        if not conn.is_closed():
            conn.connected(self._now())
            self._active.add(conn)
            # The one tunnel hand-off, as for CONNECT: a stream whose socket is detached.
            transport = conn.open_stream(_TUNNEL_USER, b"", self._now()).detach()
        if transport is None:
            waiter.on_pool_error(
                ConnectFailed(f"{self.key}: closed right after connecting", self.cluster)
            )
            return
        waiter.on_pool_tunnel(transport)

    def tunnel_closed(self) -> None:
        """A tunnel `open_dedicated` gave out has ended: it no longer counts in `inflight`."""
        self._tunnels -= 1

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            what = "TLS handshake or TCP connect" if self.tls is not None else "connect"
            return f"{self.key}: {what} timed out after {self.settings.connect_timeout:g}s"
        if self.tls is not None and isinstance(
            exc, ssl.SSLError | ssl.CertificateError | ConnectionAbortedError
        ):  # ConnectionAbortedError: the loop's own ssl_handshake_timeout
            return f"{self.key}: TLS: {self.tls.describe_error(exc)}"
        if isinstance(exc, OSError):
            return f"{self.key}: {exc.strerror or exc}"
        return f"{self.key}: {type(exc).__name__}: {exc}"

    def _connect_done(self, mux: bool) -> None:
        self._connecting -= 1
        if mux:
            self._mux_connecting -= 1

    def _connect_failed(self, exc: SidecarError, mux: bool = False) -> None:
        if mux:
            # The connect would have carried every HTTP/2 waiter no other connect covers: they
            # fail (the exchange retries elsewhere: nothing was written).
            room = self._mux_connecting * self.h2.max_concurrent_streams
            for conn in self._mux:
                room += conn.capacity()
            while self._mux_waiting > room:
                pending = self._next_waiter(True)
                if pending is None:
                    break
                self.stats.pool_wait.observe(self._now() - pending.since)
                pending.waiter.on_pool_error(exc)
            return
        pending = self._next_waiter()
        if pending is not None:
            self.stats.pool_wait.observe(self._now() - pending.since)
            pending.waiter.on_pool_error(exc)
        # Waiters beyond those covered by connects in flight get a connect of their own.
        if self._h1_connecting() < self._h1_waiting() and (
            self.total < self.settings.max_connections
        ):
            self._start_connect()

    # --- returning ------------------------------------------------------------------------------
    def release(self, stream: EndpointStream, now: float = 0.0) -> None:
        """The request is done with `stream` (its response ended): as `stream.release`."""
        stream.release(now or self._now(), True)

    # --- CarrierOwner: a connection tells the pool about itself ----------------------------------
    def stream_released(self, conn: Carrier, now: float, reusable: bool) -> None:
        if self._mux and conn in self._mux:
            self._mux_stream_ended(conn, now)
            return
        self._active.discard(conn)
        if conn.is_closed():
            return
        if self.tls is not None:
            transport = conn.tls_session_due()
            if transport is not None:
                self.tls.capture_session(transport)
        if not conn.is_reusable() or now < self.no_reuse_until:
            conn.close("not_reusable")
            self.stats.closed("not_reusable")
            self._maybe_connect_for_waiters()
            return
        if self.early_closes and conn.streams_opened() > 1:
            self.early_closes = 0  # a reused connection got its response: not every close
        if conn.past_lifetime(now):
            conn.close("max_lifetime")
            self.stats.closed("max_lifetime")
            self._maybe_connect_for_waiters()
            return
        conn.parked(now)
        if self._waiters:
            self._active.add(conn)
            if self._hand_over(conn):
                return  # the waiter has its stream
            self._active.discard(conn)
        self._park(conn)

    def stream_reset(self, conn: Carrier, reason: str) -> None:
        if self._mux and conn in self._mux:
            self._mux_stream_ended(conn, self._now())
            return
        self._active.discard(conn)
        if conn.is_closed():
            return  # carrier_closed already counted why
        self.stats.closed(reason)
        if reason != "tunnel":
            self._maybe_connect_for_waiters()

    def tls_error(self, exc: BaseException) -> str | None:
        return self.tls.describe_error(exc) if self.tls is not None else None

    def _park(self, conn: Carrier) -> None:
        if self.closing:
            conn.close("drain")
            self.stats.closed("drain")
            return
        if self.terminating:
            conn.close("endpoint_removed")  # its pod is shutting down and waits on us
            self.stats.closed("endpoint_removed")
            return
        idle = self._idle
        idle.append(conn)
        if len(idle) > self.settings.max_idle:
            # Above max_idle. Closing now would churn: whenever concurrency bursts past
            # max_idle, every release closes a connection the next request reopens (seen: half
            # the throughput at 64 app connections with the default max_idle of 20). The excess
            # is trimmed instead, oldest first, once it has stayed idle EXCESS_IDLE seconds.
            expiry = idle[0].idle_since() + EXCESS_IDLE
        else:
            expiry = conn.expiry(self._idle_timeout())
        if expiry < self.deadline:
            self.deadline = expiry
            self._wheel.schedule(self)

    def discard(self, conn: Carrier, reason: str, abort: bool = False) -> None:
        """Take `conn` out for good (error, timeout): never back in the pool."""
        self.stream_reset(conn, reason)
        if abort:
            conn.abort(reason)
        else:
            conn.close(reason)

    def _maybe_connect_for_waiters(self) -> None:
        self._mux_connect_if_needed()
        if (
            self._waiters
            and self._h1_connecting() < self._h1_waiting()
            and self.total < self.settings.max_connections
            and not self.closing
        ):
            self._start_connect()

    def carrier_closed(self, conn: Carrier, was_idle: bool) -> None:
        """Called by a connection whose socket closed (by us or by the upstream)."""
        if self._mux and conn in self._mux:
            h2conn = conn
            self._mux.remove(h2conn)
            self.stats.closed(h2conn.close_reason or "remote_closed")
            if self.on_connection_closed is not None:
                self.on_connection_closed(self)
            self._mux_connect_if_needed()
            return
        if was_idle:
            try:
                self._idle.remove(conn)
            except ValueError:
                pass
            else:
                now = self._now()
                idle_for = conn.idle_for(now)
                if conn.closed_by_peer():
                    self.stats.closed("remote_closed")
                    self.watch_closes = True
                    # The upstream closes idle connections sooner than we would: learn it, so
                    # that we retire them before it does. Ignore implausibly short idles.
                    if 1.0 <= idle_for < self._idle_timeout():
                        self.learned_idle_timeout = idle_for * 0.9
                    elif idle_for <= EARLY_CLOSE:
                        self.note_early_close(now)
                    if len(self._idle) < self.settings.min_idle:
                        self.prewarm()  # not after our own closes (drain, rotation, expiry)
        elif conn in self._active:
            self._active.discard(conn)
            if conn.closed_by_peer():
                self.stats.closed("remote_closed")
        if self.on_connection_closed is not None:
            self.on_connection_closed(self)
        self._maybe_connect_for_waiters()

    def race_lost(self, conn: Carrier, idle_before: float, now: float) -> None:
        """A request on `conn`, reused, lost the keep-alive race (the exchange saw it). The
        endpoint closes idle connections; if `conn` had been idle only a moment, it closed it
        right after its last response."""
        self.watch_closes = True
        if idle_before <= EARLY_CLOSE:
            self.note_early_close(now)

    def note_early_close(self, now: float) -> None:
        """A connection of this endpoint closed right after a response (idle for a moment,
        or a reuse lost the keep-alive race). After EARLY_CLOSES in a row, stop reusing its
        connections for REUSE_HOLD seconds."""
        self.watch_closes = True
        self.early_closes += 1
        if self.early_closes >= EARLY_CLOSES:
            self.early_closes = 0
            if now >= self.no_reuse_until:
                log.info("%s/%s closes connections right after its responses: not reusing "
                         "them for %gs", self.cluster, self.key, REUSE_HOLD)
            self.no_reuse_until = now + REUSE_HOLD

    def _retire(self, conn: Carrier, now: float) -> None:
        if conn.is_closed():
            return
        if not conn.is_reusable():
            reason = "remote_closed"
            if conn.idle_for(now) <= EARLY_CLOSE:
                self.note_early_close(now)  # closed right after its response
        elif conn.past_lifetime(now):
            reason = "max_lifetime"
        else:
            reason = "idle_timeout"
        conn.close(reason)
        self.stats.closed(reason)

    # --- the pool's one timer ---------------------------------------------------------------------
    def on_deadline(self, now: float) -> None:
        idle_timeout = self._idle_timeout()
        keep: list[Carrier] = []
        nxt = math.inf
        for conn in self._idle:
            if not conn.is_idle():
                continue
            expiry = conn.expiry(idle_timeout)
            if expiry <= now:
                self._retire(conn, now)
            else:
                keep.append(conn)
                nxt = min(nxt, expiry)
        # Trim idle connections beyond max_idle that stayed unused EXCESS_IDLE seconds. The list
        # is a stack (freshest last), so the longest idle are at the front.
        excess = len(keep) - self.settings.max_idle
        while excess > 0 and keep[0].idle_since() + EXCESS_IDLE <= now:
            conn = keep.pop(0)
            conn.close("pool_full")
            self.stats.closed("pool_full")
            excess -= 1
        if excess > 0:
            nxt = min(nxt, keep[0].idle_since() + EXCESS_IDLE)
        self._idle = keep
        for h2conn in list(self._mux):
            if not h2conn.is_reusable():
                continue
            expiry = h2conn.expiry(idle_timeout)
            if expiry <= now:
                if h2conn.is_idle():
                    h2conn.close("max_lifetime" if h2conn.past_lifetime(now) else "idle_timeout")
                else:
                    h2conn.retire("max_lifetime")  # no new streams; the open ones finish
            else:
                nxt = min(nxt, expiry)
        self.deadline = nxt
        self._wheel.schedule(self)
        self.prewarm()

    # --- lifecycle --------------------------------------------------------------------------------
    def close_idle(self, reason: str, linger: float | None = None) -> int:
        """Close every idle connection gracefully. Returns how many."""
        idle, self._idle = self._idle, []
        for conn in idle:
            if linger is not None:
                conn.close_within(reason, linger)
            else:
                conn.close(reason)
            self.stats.closed(reason)
        closed = len(idle)
        for h2conn in list(self._mux):
            if h2conn.is_idle():
                closed += 1
                if linger is not None:
                    h2conn.close_within(reason, linger)
                else:
                    h2conn.close(reason)  # counted by carrier_closed
        return closed

    def rotate_oldest(self, count: int) -> int:
        """Close up to `count` of the oldest idle connections, so that new requests open
        connections to other (newer) endpoints. Returns how many were closed."""
        if count <= 0 or not self._idle:
            return 0
        victims = sorted(self._idle, key=lambda c: c.opened_at())[:count]
        for conn in victims:
            self._idle.remove(conn)
            conn.close("rotated")
            self.stats.closed("rotated")
        return len(victims)

    def set_terminating(self, terminating: bool) -> None:
        """Discovery marked the endpoint terminating (or not ready): its in-flight requests
        finish, its idle connections close now, and none is kept idle from here on. False: it
        serves again (the cluster prewarms it when it is warm)."""
        self.terminating = terminating
        if terminating:
            self.close_idle("endpoint_removed")

    def start_closing(self, reason: str) -> None:
        """No new requests: fail the waiters, close idle connections; active ones finish and
        are closed on release."""
        self.closing = True
        while self._waiters:
            pending = self._waiters.popleft()
            if not pending.done:
                self._settle(pending)
                pending.waiter.on_pool_error(
                    ConnectFailed(f"{self.key}: endpoint removed while waiting", self.cluster)
                )
        self.close_idle(reason)
        for h2conn in list(self._mux):
            h2conn.retire(reason)  # its streams finish, then it closes

    def abort_all(self, reason: str) -> int:
        """Abort every connection (RST). Returns how many were active."""
        busy = len(self._active)
        for conn in list(self._active):
            conn.abort(reason)
            self.stats.closed(reason)
        self._active.clear()
        for h2conn in list(self._mux):
            if not h2conn.is_idle():
                busy += 1
            h2conn.abort(reason)
        self.close_idle(reason)
        for task in list(self._tasks):
            task.cancel()
        return busy

    @property
    def empty(self) -> bool:
        return not self._active and not self._idle and not self._connecting and not self._mux


class _AlpnProbe(asyncio.Protocol):
    """The protocol of a TLS connection whose application protocol the handshake decides
    (`auto`, and `http2`, which requires h2): once the handshake is done it hands the transport
    to the carrier that speaks what ALPN selected, before any byte is read or written."""


    def __init__(self, pool: Pool, now: float, expires_at: float) -> None:
        self.pool = pool
        self.now = now
        self.expires_at = expires_at
        self.carrier: UpstreamConnection | H2Connection | None = None
        self.alpn: str | None = None  # what the endpoint chose

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = self.alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        pool = self.pool
        carrier: UpstreamConnection | H2Connection
        if alpn == "h2":
            carrier = _h2_connection(pool, self.now, self.expires_at)
        else:
            carrier = UpstreamConnection(pool, pool.key, self.now, self.expires_at)
        self.carrier = carrier
        transport.set_protocol(carrier)
        carrier.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def chosen(self) -> UpstreamConnection | H2Connection:
        carrier = self.carrier
        if carrier is None:
            raise ConnectionError("TLS connection lost before the handshake ended")
        return carrier


def _h2_connection(pool: Pool, now: float, expires_at: float) -> H2Connection:
    """A new HTTP/2 carrier; its module (and the nghttp2 binding) is imported on first use."""
    from sidecar.upstream.http2 import H2Connection

    return H2Connection(pool, pool.key, now, expires_at, pool.h2)


def _abort(proto: asyncio.Protocol, reason: str) -> None:
    if isinstance(proto, _AlpnProbe):
        carrier = proto.carrier
        if carrier is None:
            return
        proto = carrier
    carrier = cast("UpstreamConnection | H2Connection", proto)
    if carrier.transport is not None:
        carrier.abort(reason)


class _TunnelUser(EndpointUser):
    """Bound for the instant between a dedicated connection's stream opening and its socket
    being detached to a tunnel (`_connect_dedicated`); nothing reaches it."""

    __slots__ = ()


_TUNNEL_USER: Final = _TunnelUser()
