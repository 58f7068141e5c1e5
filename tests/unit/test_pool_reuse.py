"""Narrowing the keep-alive race in the pool (issue 19, part 3), on a real event loop against real
sockets on 127.0.0.1: an idle connection whose FIN already sits in the kernel, unread by the
loop, is not handed out once the endpoint is known to close idle connections; an endpoint that
closes right after every response while advertising keep-alive stops being reused."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sidecar.http.headers import Headers
from sidecar.upstream.connection import UpstreamConnection
from sidecar.upstream.pool import EARLY_CLOSES, Pool
from tests.unit.test_pool import (
    LOOPS,
    Server,
    User,
    closed,
    connect,
    eventually,
    make_pool,
    run_on,
    send_get,
)

pytestmark = pytest.mark.parametrize("loop", sorted(LOOPS))

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawEndpoint:
    """A listening socket whose accepted connections the test drives by hand, so that it can
    close one and look at the pool before the event loop has had a chance to read the FIN."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []

    def accept(self) -> socket.socket:
        self.listener.settimeout(5)
        sock, _ = self.listener.accept()
        sock.settimeout(5)
        self.accepted.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.accepted:
            sock.close()
        self.listener.close()


class ReleasingUser(User):
    """Gives the connection back to the pool the moment its response ends, inside the read
    that completed it, as the exchange does (so an EOF behind the response finds it idle)."""

    def __init__(self, pool: Pool, conn: UpstreamConnection) -> None:
        super().__init__()
        self.pool = pool
        self.conn = conn

    def on_response_end(self, trailers: Headers | None) -> None:
        self.pool.release(self.conn)
        super().on_response_end(trailers)


async def serve(pool: Pool, conn: UpstreamConnection) -> None:
    """One GET on `conn`, released as the exchange releases it."""
    user = ReleasingUser(pool, conn)
    send_get(conn, user)
    await asyncio.wait_for(user.done, 5)


async def idle_connection(pool: Pool, endpoint: RawEndpoint) -> socket.socket:
    """Open a connection, serve one request on it by hand, leave it idle in the pool; returns
    the endpoint's side of it."""
    conn = await connect(pool)
    peer = endpoint.accept()
    user = User()
    send_get(conn, user)
    await asyncio.to_thread(peer.recv, 65536)
    peer.sendall(RESPONSE)
    await asyncio.wait_for(user.done, 5)
    pool.release(conn)
    assert pool.idle_count == 1
    return peer


def test_a_pending_fin_is_seen_before_reuse_once_the_endpoint_closes_idle_connections(
    loop: str,
) -> None:
    async def main() -> None:
        endpoint = RawEndpoint()
        try:
            pool = make_pool(endpoint.port)
            # Before anything is known of this endpoint the pool does not look (no system call
            # on the reuse path): a FIN the loop has not read yet is handed out. The race.
            peer = await idle_connection(pool, endpoint)
            peer.close()  # FIN now in our kernel; no await: the loop has not read it
            raced = pool.take_idle()
            assert raced is not None
            pool.discard(raced, "error", abort=True)

            # The loop sees an endpoint close an idle connection: from now on it looks.
            peer = await idle_connection(pool, endpoint)
            peer.close()
            await eventually(lambda: pool.idle_count == 0)
            assert pool.watch_closes

            peer = await idle_connection(pool, endpoint)
            before = closed(pool, "remote_closed")
            peer.close()
            assert pool.take_idle() is None  # the FIN was found before reuse
            assert closed(pool, "remote_closed") == before + 1

            # A healthy idle connection is still handed out.
            await idle_connection(pool, endpoint)
            assert pool.take_idle() is not None
        finally:
            endpoint.close()

    run_on(loop, main())


def test_an_endpoint_closing_after_every_response_stops_being_reused(loop: str) -> None:
    async def main() -> None:
        # Keep-alive advertised (no Connection: close), then a close after each response.
        async with Server(RESPONSE, close_after_response=True) as server:
            pool = make_pool(server.port)
            for n in range(EARLY_CLOSES):
                assert pool.no_reuse_until == 0.0, n
                conn = await connect(pool)
                await serve(pool, conn)
                await eventually(lambda: pool.idle_count == 0)  # closed right after
            assert pool.no_reuse_until > pool.now()
            server.close_after_response = False
            # During the hold, a connection is closed after its response, never parked.
            conn = await connect(pool)
            before = closed(pool, "not_reusable")
            await serve(pool, conn)
            assert pool.idle_count == 0 and closed(pool, "not_reusable") == before + 1

    run_on(loop, main())


def test_a_successful_reuse_breaks_the_row_of_early_closes(loop: str) -> None:
    async def main() -> None:
        async with Server(RESPONSE) as server:
            pool = make_pool(server.port)
            for _ in range(2):
                for _ in range(EARLY_CLOSES - 1):
                    server.close_after_response = True
                    conn = await connect(pool)
                    await serve(pool, conn)
                    await eventually(lambda: pool.idle_count == 0)
                server.close_after_response = False
                conn = await connect(pool)
                await serve(pool, conn)
                conn = await connect(pool)  # the idle one, reused
                assert conn.requests == 2  # the pool opened its second stream on it
                await serve(pool, conn)
                pool.close_idle("drain")
            assert pool.no_reuse_until == 0.0
            assert closed(pool, "remote_closed") == 2 * (EARLY_CLOSES - 1)

    run_on(loop, main())
