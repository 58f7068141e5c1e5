"""Issue 15, memory under HTTP/2 load: a closed connection's HTTP/2 session (the nghttp2 session
in C, its HPACK tables, streams and buffers, and its Python side) is freed when the connection
closes, by reference counting, not when the cyclic collector happens to run.

The sidecar runs in-process (its `App`, on each loop) so that the objects left behind can be
counted (`gc.get_objects`) with the cyclic collector switched off for the test. Everything else
is real: h2c app connections from a raw client on the `h2` library over real sockets on
127.0.0.1, and a real HTTP/2 origin (tests/h2origin.py) behind a `protocol: http2` cluster.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import h2.config
import h2.connection
import h2.events
import pytest

from sidecar.app import App
from sidecar.downstream.http2 import H2AppConnection
from sidecar.http.h2engine import H2Session
from sidecar.upstream.http2 import H2Connection
from tests.h2origin import H2Origin, h2_origin
from tests.harness import LOOPS, app_in_process, run_loop
from tests.k8s.support import wait_until

TIMEOUT = 10.0
CONNECTIONS = 12


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()  # what earlier tests left
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def sessions(role: str) -> list[H2Session]:
    """The H2Session objects of `role` ('server': app side, 'client': endpoint side) that
    exist, garbage included (nothing collects it here), except the shared placeholder of
    endpoint connections not connected yet (closed, one per process)."""
    from sidecar.upstream import http2

    placeholder = {id(s) for s in getattr(http2, "_UNCONNECTED", [])}
    return [o for o in gc.get_objects()
            if type(o) is H2Session and f"<H2Session {role} " in repr(o)
            and id(o) not in placeholder]


def objects(cls: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is cls)


async def settle() -> None:
    """A few loop rounds: the transports' own teardown after connection_lost."""
    for _ in range(5):
        await asyncio.sleep(0.01)


async def h2_get(port: int, path: str) -> tuple[int, bytes]:
    """One request on a new h2c connection (prior knowledge), then the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"),
                            (":path", path)], end_stream=True)
    writer.write(conn.data_to_send())
    status = 0
    body = bytearray()
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            assert data, "the sidecar closed the connection before the answer ended"
            ended = False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            writer.write(conn.data_to_send())
            if ended:
                return status, bytes(body)
    finally:
        writer.close()
        await writer.wait_closed()


def run(test: Callable[[App, H2Origin, int], Awaitable[None]], loop: str) -> None:
    with h2_origin(hold=False) as origin:
        async def main() -> None:
            cluster = {"protocol": "http2", "discovery": {
                "type": "static", "endpoints": [f"127.0.0.1:{origin.port}"]}}
            async with app_in_process(cluster) as (app, port):
                await asyncio.wait_for(test(app, origin, port), 3 * TIMEOUT)

        run_loop(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_closed_connections_leave_no_http2_session_behind(loop: str) -> None:
    """N app connections, one request each through an HTTP/2 endpoint connection, closed by
    the app: no app-side session (nor its connection) is left, with no cyclic collection.
    Then the endpoint closes its connections: no endpoint-side session is left either."""

    async def test(app: App, origin: H2Origin, port: int) -> None:
        stats = app.contexts["l"].stats
        with no_cyclic_gc():
            before = len(sessions("server"))
            for i in range(CONNECTIONS):
                status, body = await h2_get(port, f"/n{i}")
                assert (status, body) == (200, f"origin o /n{i}".encode())
            await wait_until(lambda: stats.downstream_connections == 0, within=TIMEOUT,
                             what="app connections closed")
            await settle()
            assert len(sessions("server")) == before == 0
            assert objects(H2AppConnection) == 0
            assert sessions("client"), "the endpoint connection is open, its session alive"

            # The endpoint closes its side: the sidecar's endpoint connections end.
            origin.call(lambda: [c.transport.close() for c in list(origin.live)
                                 if c.transport is not None])
            cluster = app.clusters.get("up")
            assert cluster is not None
            await wait_until(lambda: not any(p._mux for p in cluster.pools.values()),
                             within=TIMEOUT, what="endpoint connections closed")
            await settle()
            assert sessions("client") == []
            assert objects(H2Connection) == 0

    run(test, loop)
