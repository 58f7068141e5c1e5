"""The per-endpoint pool through its public methods, on a real event loop, against a real TCP
server on 127.0.0.1: idle LIFO, limits and FIFO waiters, timeouts, freshness, cancellation."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest
import uvloop

from sidecar.clock import FakeClock
from sidecar.config import ClusterConfig
from sidecar.discovery.endpoints import Endpoint, Reset
from sidecar.errors import ConnectFailed, PoolTimeout, SidecarError, UpstreamError
from sidecar.http.headers import Headers
from sidecar.http.parser import ResponseHead
from sidecar.observe.stats import Stats
from sidecar.streams import EndpointStream, StreamWaiterBase
from sidecar.streams import EndpointUserBase as ConnectionUser
from sidecar.timers import Wheel
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.connection import UpstreamConnection
from sidecar.upstream.pool import EXCESS_IDLE, Pool, PoolSettings

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
pytestmark = pytest.mark.parametrize("loop", sorted(LOOPS))

BOUND = 5.0  # no step waits longer


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main, 30))


async def eventually(cond: Callable[[], bool], within: float = BOUND) -> None:
    """Poll state that the pool changes from socket callbacks (there is no event to await)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Upstream(asyncio.Protocol):
    """A tiny HTTP/1.1 server: answers each request head with `response`, optionally closing."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.conns.append(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.server.requests += 1
            assert self.transport is not None
            self.transport.write(self.server.response)
            if self.server.close_after_response:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.closed += 1


class Server:
    def __init__(self, response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                 close_after_response: bool = False) -> None:
        self.response = response
        self.close_after_response = close_after_response
        self.conns: list[Upstream] = []
        self.requests = 0
        self.closed = 0
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Upstream(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()
        self._server.close()
        await self._server.wait_closed()

    def close_all(self) -> None:
        """The upstream closes every connection (as when its keep-alive timer fires)."""
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()


class Waiter(StreamWaiterBase):
    """A request waiting for a stream, as the exchange would be (its `user` takes it)."""

    def __init__(self) -> None:
        self.fut: asyncio.Future[UpstreamConnection] = asyncio.get_running_loop().create_future()
        self.calls = 0
        self.user = User()

    def take(self, pool: Pool, fresh: bool = False) -> UpstreamConnection | None:
        """`pool.acquire` for this waiter: a connection now, or None (then `get`)."""
        return cast(UpstreamConnection | None, pool.acquire(self, self.user, b"GET", fresh))

    def on_pool_stream(self, stream: EndpointStream) -> None:
        self.calls += 1
        self.fut.set_result(cast(UpstreamConnection, stream))

    def on_pool_error(self, exc: SidecarError) -> None:
        self.calls += 1
        self.fut.set_exception(exc)

    async def get(self) -> UpstreamConnection:
        return await asyncio.wait_for(self.fut, BOUND)


class User(ConnectionUser):
    """Holds a bound connection for one request and records the response."""

    def __init__(self) -> None:
        self.done: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self.head: ResponseHead | None = None
        self.errors: list[UpstreamError] = []

    def on_response_head(self, head: ResponseHead) -> None:
        self.head = head

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_end(self, trailers: Headers | None) -> None:
        assert self.head is not None
        self.done.set_result(self.head)

    def on_upgrade(self, rest: bytes) -> None:
        pass

    def on_upstream_error(self, exc: UpstreamError) -> None:
        self.errors.append(exc)
        if not self.done.done():
            self.done.set_exception(exc)

    def on_upstream_pause_writing(self) -> None:
        pass

    def on_upstream_resume_writing(self) -> None:
        pass

    def batch_begin(self) -> None:
        pass

    def batch_end(self) -> None:
        pass


def send_get(conn: UpstreamConnection, user: ConnectionUser, host: bytes = b"t") -> None:
    """The exchange's part, by hand: `user` takes the stream the pool handed out on `conn` (or
    binds an idle one), and a GET goes out on it."""
    if conn.is_idle():
        conn.bind(user, b"GET")
    else:
        conn.user = user
    assert conn.transport is not None
    conn.transport.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")


async def request(pool: Pool, conn: UpstreamConnection) -> ResponseHead:
    """One GET on `conn`, then the connection goes back to the pool."""
    user = User()
    send_get(conn, user)
    head = await asyncio.wait_for(user.done, BOUND)
    pool.release(conn)
    return head


def make_pool(port: int, wheel: Wheel | None = None, clock: FakeClock | None = None,
              **settings: Any) -> Pool:
    loop = asyncio.get_running_loop()
    stats = Stats().cluster("c")
    if wheel is None:  # (not `wheel or ...`: an empty Wheel is falsy, it has a __len__)
        wheel = Wheel(loop)
    return Pool("c", "127.0.0.1", port, PoolSettings(**settings), stats, loop, wheel,
                clock=clock)


def loop_clock() -> FakeClock:
    """A clock the test moves by hand, starting at the loop's time (the pool's timer, on the
    wheel, still runs on the loop's: a test that advances this one past an expiry asks the
    pool before that timer could fire)."""
    return FakeClock(asyncio.get_running_loop().time())


async def connect(pool: Pool) -> UpstreamConnection:
    waiter = Waiter()
    conn = waiter.take(pool)
    return conn if conn is not None else await waiter.get()


def closed(pool: Pool, reason: str) -> int:
    return pool.stats.connections_closed.get(reason, 0)


def test_acquire_release_and_idle_lifo(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port)
            waiter = Waiter()
            assert waiter.take(pool) is None  # nothing idle: a connect starts
            assert pool.connecting_count == 1 and pool.pending_count == 1
            a = await waiter.get()
            b = await connect(pool)
            assert a is not b and pool.active_count == 2 and waiter.calls == 1
            assert (await request(pool, a)).status == 200
            assert (await request(pool, b)).status == 200
            assert (pool.idle_count, pool.active_count) == (2, 0)
            # LIFO: the most recently used (freshest) connection comes out first, at once.
            assert Waiter().take(pool) is b
            assert Waiter().take(pool) is a
            pool.release(a)
            pool.release(b)
            assert pool.take_idle() is b
            pool.release(b)
            assert server.requests == 2 and len(server.conns) == 2
            assert pool.stats.connections_opened == 2
            assert "2 idle" in repr(pool)
            pool.abort_all("drain")

    run_on(loop, main())


def test_max_connections_and_fifo_waiters(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port, max_connections=2)
            first, second = await connect(pool), await connect(pool)
            waiters = [Waiter() for _ in range(3)]
            for w in waiters:
                assert w.take(pool) is None
            assert pool.pending_count == 3 and pool.connecting_count == 0
            await asyncio.sleep(0.05)
            assert not any(w.fut.done() for w in waiters)
            await request(pool, first)  # released: handed to the oldest waiter, not parked
            got0 = await waiters[0].get()
            assert got0 is first and pool.idle_count == 0
            await request(pool, second)
            assert await waiters[1].get() is second
            assert not waiters[2].fut.done()
            await request(pool, got0)
            assert await waiters[2].get() is first
            assert len(server.conns) == 2  # never more than max_connections
            assert all(w.calls == 1 for w in waiters)
            pool.abort_all("drain")

    run_on(loop, main())


def test_served_and_cancelled_waiters_leave_the_wheel(loop: str) -> None:
    """A waiter's pending_timeout entry goes when the waiter is served or gone, not when the
    timeout would have passed: until then it keeps the request (and its app connection)."""
    async def main() -> None:
        async with Server() as server:
            wheel = Wheel(asyncio.get_running_loop())
            pool = make_pool(server.port, wheel, max_connections=1, pending_timeout=60)
            conn = await connect(pool)
            base = len(wheel)
            served, gone = Waiter(), Waiter()
            assert served.take(pool) is None and gone.take(pool) is None
            assert len(wheel) == base + 2
            pool.cancel(gone)
            assert len(wheel) == base + 1
            await request(pool, conn)  # released: handed to `served`
            assert await served.get() is conn
            assert len(wheel) == base
            pool.abort_all("drain")

    run_on(loop, main())


def test_max_pending_refuses_with_pool_timeout(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port, max_connections=1, max_pending=1)
            await connect(pool)
            Waiter().take(pool)
            with pytest.raises(PoolTimeout) as info:
                Waiter().take(pool)
            assert (info.value.status, info.value.code) == (503, "pool_timeout")
            pool.abort_all("drain")

    run_on(loop, main())


def test_pending_timeout(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port, max_connections=1, pending_timeout=0.2)
            await connect(pool)
            waits = pool.stats.pool_wait.count
            waiter = Waiter()
            started = asyncio.get_running_loop().time()
            assert waiter.take(pool) is None
            with pytest.raises(PoolTimeout):
                await waiter.get()
            waited = asyncio.get_running_loop().time() - started
            assert 0.15 <= waited < 1.0
            assert pool.pending_count == 0 and waiter.calls == 1
            assert pool.stats.pool_wait.count == waits + 1
            pool.abort_all("drain")

    run_on(loop, main())


def test_idle_connection_closed_by_the_upstream_is_never_handed_out(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port)
            conn = await connect(pool)
            await request(pool, conn)
            assert pool.idle_count == 1
            server.close_all()
            await asyncio.sleep(0.05)  # the upstream's FIN reaches us while the conn is idle
            waiter = Waiter()
            got = waiter.take(pool)
            if got is None:
                got = await waiter.get()
            assert got is not conn
            assert (await request(pool, got)).status == 200
            await eventually(lambda: conn.is_closed())
            assert pool.idle_count == 1 and closed(pool, "remote_closed") == 1
            pool.abort_all("drain")

    run_on(loop, main())


def test_connection_the_upstream_closes_after_responding_is_not_reused(loop: str) -> None:
    async def main() -> None:
        response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        async with Server(response, close_after_response=True) as server:
            pool = make_pool(server.port)
            for _ in range(3):
                conn = await connect(pool)
                head = await request(pool, conn)
                assert not head.keep_alive
                assert pool.idle_count == 0
            assert len(server.conns) == 3
            assert closed(pool, "not_reusable") == 3

    run_on(loop, main())


def test_keep_alive_timeout_retires_idle_connections(loop: str) -> None:
    async def main() -> None:
        response = (b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=0.4\r\n"
                    b"Content-Length: 0\r\n\r\n")
        async with Server(response) as server:
            pool = make_pool(server.port)
            conn = await connect(pool)
            await request(pool, conn)
            assert pool.take_idle() is conn  # fresh right after the response
            pool.release(conn)
            # The upstream would close at 0.4 s; we retire it at 90 % of that, by the timer.
            await eventually(lambda: conn.is_closed(), within=2.0)
            assert pool.idle_count == 0 and closed(pool, "idle_timeout") == 1
            assert Waiter().take(pool) is None  # a new connection is opened instead
            pool.abort_all("drain")

    run_on(loop, main())


def test_keep_alive_timeout_counts_from_the_end_of_the_response(loop: str) -> None:
    async def main() -> None:
        head = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=0.5\r\nContent-Length: 4\r\n\r\n"
        async with Server(head) as server:
            clock = loop_clock()
            pool = make_pool(server.port, clock=clock)
            conn = await connect(pool)
            user = User()
            send_get(conn, user)
            await eventually(lambda: user.head is not None)
            clock.advance(0.6)  # a slow body: longer than the keep-alive timeout
            server.conns[0].transport.write(b"body")  # type: ignore[union-attr]
            await asyncio.wait_for(user.done, BOUND)
            pool.release(conn)
            assert pool.take_idle() is conn  # the upstream's idle timer just started
            pool.abort_all("drain")

    run_on(loop, main())


def test_idle_timeout_and_max_lifetime(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port, idle_timeout=0.2)
            conn = await connect(pool)
            await request(pool, conn)
            await eventually(lambda: conn.is_closed(), within=2.0)
            assert closed(pool, "idle_timeout") == 1

            clock = loop_clock()
            pool = make_pool(server.port, clock=clock, max_lifetime=0.3, idle_timeout=60)
            conn = await connect(pool)
            await request(pool, conn)
            assert conn.expires_at - conn.created_at <= 0.3  # jittered down, never up
            clock.advance(0.35)
            # Past its lifetime: not handed out; closed when used (or by the timer).
            got = Waiter().take(pool)
            assert got is not conn
            await eventually(lambda: conn.is_closed())
            assert closed(pool, "max_lifetime") == 1
            pool.abort_all("drain")

            clock = loop_clock()
            pool = make_pool(server.port, clock=clock, max_lifetime=0.2, idle_timeout=60)
            conn = await connect(pool)
            user = User()
            send_get(conn, user)
            await asyncio.wait_for(user.done, BOUND)
            clock.advance(0.25)
            pool.release(conn)  # returned after its lifetime: closed, not parked
            assert pool.idle_count == 0 and closed(pool, "max_lifetime") == 1

    run_on(loop, main())


def test_max_idle(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port, max_idle=1)
            a, b = await connect(pool), await connect(pool)
            await request(pool, a)
            await request(pool, b)
            # Over max_idle the excess stays briefly (closing at once churns under bursts)...
            assert pool.idle_count == 2 and closed(pool, "pool_full") == 0
            # ...and is trimmed, oldest first, once it stayed idle for EXCESS_IDLE.
            await eventually(lambda: pool.idle_count == 1, within=EXCESS_IDLE + 2.0)
            assert closed(pool, "pool_full") == 1
            assert pool.take_idle() is b  # the freshest one was kept
            pool.abort_all("drain")

    run_on(loop, main())


def test_cancelled_waiter_during_connect_leaves_the_pool_clean(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port)
            waiter = Waiter()
            assert waiter.take(pool) is None
            pool.cancel(waiter)  # the app went away while the connect is in flight
            assert pool.pending_count == 0
            await eventually(lambda: pool.connecting_count == 0)
            assert waiter.calls == 0  # never called back after cancel
            assert (pool.idle_count, pool.active_count) == (1, 0)  # the connection is kept
            conn = Waiter().take(pool)
            assert conn is not None and (await request(pool, conn)).status == 200
            pool.abort_all("drain")

    run_on(loop, main())


def _full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: a new connect to it hangs (the kernel
    drops the SYN), which is how a slow or black-holed endpoint looks."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(lsock.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    return lsock, fillers


def test_cancelled_connect_and_connect_timeout_leave_the_pool_clean(loop: str) -> None:
    async def main() -> None:
        lsock, fillers = _full_backlog()
        try:
            port = lsock.getsockname()[1]
            pool = make_pool(port, connect_timeout=0.3)
            waiter = Waiter()
            assert waiter.take(pool) is None
            with pytest.raises(ConnectFailed, match="timed out"):
                await waiter.get()
            assert (pool.connecting_count, pool.pending_count, pool.total) == (0, 0, 0)

            pool = make_pool(port, connect_timeout=5.0)
            waiter = Waiter()
            assert waiter.take(pool) is None
            await asyncio.sleep(0.05)
            pool.cancel(waiter)
            assert pool.abort_all("drain") == 0  # cancels the connect task
            await eventually(lambda: pool.connecting_count == 0)
            assert pool.empty and waiter.calls == 0
        finally:
            for s in fillers:
                s.close()
            lsock.close()

    run_on(loop, main())


def test_connect_refused_is_connect_failed(loop: str) -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: connects are refused
            pool = make_pool(port)
            waiters = [Waiter() for _ in range(3)]
            for w in waiters:
                assert w.take(pool) is None
            for w in waiters:  # each waiter gets its own try and its own answer
                with pytest.raises(ConnectFailed) as info:
                    await w.get()
                assert info.value.code == "connect_failed" and info.value.status == 502
                assert f"127.0.0.1:{port}" in info.value.detail
            assert pool.empty and pool.pending_count == 0

    run_on(loop, main())


def test_error_on_a_connection_frees_its_slot_for_waiters(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port, max_connections=1)
            conn = await connect(pool)
            waiter = Waiter()
            assert waiter.take(pool) is None
            pool.discard(conn, "error", abort=True)
            replacement = await waiter.get()
            assert replacement is not conn
            assert (await request(pool, replacement)).status == 200
            assert closed(pool, "error") == 1
            pool.abort_all("drain")

    run_on(loop, main())


def test_start_closing_fails_waiters_and_refuses_new_requests(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port, max_connections=1)
            conn = await connect(pool)
            waiter = Waiter()
            waiter.take(pool)
            pool.start_closing("endpoint_removed")
            with pytest.raises(ConnectFailed):
                await waiter.get()
            with pytest.raises(ConnectFailed):
                Waiter().take(pool)
            await request(pool, conn)  # in flight work finishes; then the connection closes
            await eventually(lambda: pool.empty)
            assert closed(pool, "drain") == 1

    run_on(loop, main())


def test_prewarm_fills_min_idle(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port, min_idle=2)
            pool.prewarm()
            pool.prewarm()  # connects in flight count: no more than min_idle
            await eventually(lambda: pool.idle_count == 2)
            assert len(server.conns) == 2
            pool.abort_all("drain")

    run_on(loop, main())


def test_cluster_keeps_a_removed_endpoints_pool_until_its_work_is_done(loop: str) -> None:
    """An endpoint that leaves discovery and comes back while its old pool still finishes a
    request: both pools are tracked (gauges, /clusters, abort at grace) until the old one is
    empty."""

    async def main() -> None:
        async with Server() as server:
            aio_loop = asyncio.get_running_loop()
            cfg = ClusterConfig.model_validate({
                "name": "c",
                "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{server.port}"]},
            })
            cluster = Cluster(cfg, aio_loop, Wheel(aio_loop), Stats().cluster("c"))
            ep = Endpoint("127.0.0.1", server.port)
            cluster.apply(Reset((ep,)))
            old = cluster.pick()
            conn = await connect(old)
            cluster.apply(Reset(()))  # removed while a request is in flight on `conn`
            assert cluster.active_connections() == 1
            cluster.apply(Reset((ep,)))  # back again: a new pool takes new requests
            new = cluster.pick()
            assert new is not old
            assert cluster.active_connections() == 1  # the old pool's request still counts
            assert len(cluster.snapshot()["endpoints"]) == 2
            conn2 = await connect(new)
            cluster.apply(Reset(()))  # and leaves again, with both pools still busy
            assert cluster.active_connections() == 2
            assert len(cluster.snapshot()["endpoints"]) == 2
            await request(old, conn)  # each finishes; its pool closes and is forgotten
            await request(new, conn2)
            await eventually(lambda: cluster.snapshot()["endpoints"] == [])
            assert cluster.abort_all("drain") == 0

    run_on(loop, main())
