"""The upstream HTTP/2 carrier (sidecar/upstream/http2.py) against real HTTP/2 peers on
127.0.0.1, both loops: nginx h2c, an h2-only origin on the `h2` library (tests/h2origin.py)
that records what it receives, and a grpcio server.

The pool and the exchange are replaced by small recorders (`Owner`, `User`) that implement
the same interfaces of sidecar/streams.py (`CarrierOwner`, `EndpointUser`): what is tested is
the carrier and its streams; the sidecar-level tests are in test_h2_upstream.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sidecar.errors import SidecarError, UpstreamRefused, UpstreamReset
from sidecar.http.headers import Headers
from sidecar.http.parser import RequestHead, ResponseHead
from sidecar.streams import CarrierOwnerBase, CarrierState, EndpointUserBase
from sidecar.upstream.http2 import H2Connection, H2Settings, H2Stream
from tests.h2origin import h2_origin
from tests.harness import LOOPS, nginx
from tests.integration.grpc_servers import grpc_frame, grpc_server


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(loop_name: str, coro: Any, timeout: float = 30) -> None:
    loop = new_loop(loop_name)
    try:
        loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


class Owner(CarrierOwnerBase):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.closed = asyncio.get_running_loop().create_future()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def carrier_closed(self, carrier: Any, was_idle: bool) -> None:
        self.events.append(("closed", was_idle))
        if not self.closed.done():
            self.closed.set_result(True)

    def stream_released(self, carrier: Any, now: float, reusable: bool) -> None:
        self.events.append(("released", reusable))

    def stream_reset(self, carrier: Any, reason: str) -> None:
        self.events.append(("reset", reason))

    def race_lost(self, carrier: Any, idle_before: float, now: float) -> None:
        pass

    def tls_error(self, exc: BaseException) -> str | None:
        return None


class User(EndpointUserBase):
    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self.interim: list[int] = []
        self.body = bytearray()
        self.trailers: Headers | None = None
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.error: SidecarError | None = None

    def on_response_head(self, head: ResponseHead) -> None:
        if head.status < 200:
            self.interim.append(head.status)
        else:
            self.head = head

    def on_response_body(self, data: bytes) -> None:
        self.body += data

    def on_response_end(self, trailers: Headers | None) -> None:
        self.trailers = trailers
        self.done.set_result(True)

    def on_upstream_error(self, exc: Any) -> None:
        self.error = exc
        self.done.set_result(False)

    def on_internal_error(self, exc: Exception) -> None:
        self.done.set_exception(exc)

    def on_upstream_pause_writing(self) -> None:
        pass

    def on_upstream_resume_writing(self) -> None:
        pass


def head(method: bytes = b"GET", target: bytes = b"/", fields: Headers | None = None,
         content_length: int | None = None) -> RequestHead:
    h = RequestHead()
    h.method = method
    h.target = target
    h.headers = list(fields or [])
    h.forward = list(fields or [])
    if content_length is not None:
        h.content_length = content_length
    return h


async def connect(port: int, settings: H2Settings | None = None) -> tuple[H2Connection, Owner]:
    loop = asyncio.get_running_loop()
    owner = Owner()
    conn = H2Connection(owner, f"127.0.0.1:{port}", loop.time(), loop.time() + 600,
                        settings or H2Settings())
    await loop.create_connection(lambda: conn, "127.0.0.1", port)
    conn.connected(loop.time())
    return conn, owner


def request(conn: H2Connection, target: bytes, method: bytes = b"GET",
            fields: Headers | None = None, body: bytes | None = None,
            deadline_ms: int = -1) -> tuple[User, H2Stream]:
    user = User()
    stream = conn.open_stream(user, method, asyncio.get_running_loop().time())
    assert isinstance(stream, H2Stream)
    h = head(method, target, fields, len(body) if body is not None else None)
    stream.send_head(h, b"svc.test", deadline_ms, [body] if body else None, True, None)
    return user, stream


async def until(cond: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_multiplexed_requests_to_nginx_h2c(loop_name: str) -> None:
    conf = """
    server {
      listen 127.0.0.1:{port} http2;
      location / { return 200 "$request_method $uri $host $http_x_sidecar_deadline_ms\\n"; }
    }
    """

    async def main(port: int) -> None:
        conn, owner = await connect(port)
        assert conn.capacity() == 100  # ours until the peer's SETTINGS say otherwise
        pairs = [request(conn, b"/p%d" % i, deadline_ms=1500) for i in range(20)]
        assert conn.stream_count() == 20
        for i, (user, stream) in enumerate(pairs):
            assert await user.done
            assert user.head is not None and user.head.status == 200
            assert bytes(user.body) == b"GET /p%d svc.test 1500\n" % i
            assert user.head.content_length == len(user.body)
            stream.release(asyncio.get_running_loop().time(), True)
        assert conn.peer_max == 128  # nginx's SETTINGS_MAX_CONCURRENT_STREAMS
        assert conn.capacity() == 100  # capped by http2.max_concurrent_streams
        assert conn.state is CarrierState.IDLE and conn.streams_opened() == 20
        assert owner.events == [("released", True)] * 20
        conn.close("test")
        await owner.closed

    with nginx(conf) as port:
        run(loop_name, main(port))


@pytest.mark.parametrize("loop_name", LOOPS)
def test_translation_and_peer_limit(loop_name: str) -> None:
    """HTTP/1.1 fields become lowercase HTTP/2 fields, Host becomes :authority, gRPC gets
    te: trailers and grpc-timeout from the deadline left; capacity follows the peer's
    SETTINGS_MAX_CONCURRENT_STREAMS."""

    async def main(port: int, origin: Any) -> None:
        conn, owner = await connect(port, H2Settings(max_concurrent_streams=10))
        user, stream = request(conn, b"/a?q=1", b"POST", [
            (b"Content-Type", b"application/grpc"), (b"X-Custom", b"V"),
            (b"grpc-timeout", b"99S")], body=b"\0\0\0\0\0", deadline_ms=2500)
        assert await user.done
        stream.release(asyncio.get_running_loop().time(), True)
        rec = origin.received[0]
        assert rec.headers[:4] == [(b":method", b"POST"), (b":scheme", b"http"),
                                   (b":authority", b"svc.test"), (b":path", b"/a?q=1")]
        fields = dict(rec.headers[4:])
        assert fields[b"content-type"] == b"application/grpc"
        assert fields[b"x-custom"] == b"V"
        assert fields[b"te"] == b"trailers"
        assert fields[b"grpc-timeout"] == b"2500000u"  # the app's 99S is replaced
        assert fields[b"x-sidecar-deadline-ms"] == b"2500"
        assert fields[b"content-length"] == b"5"
        assert bytes(rec.body) == b"\0\0\0\0\0"
        assert all(n == n.lower() for n, _ in rec.headers)
        assert conn.peer_max == 3 and conn.capacity() == 3
        holds = [request(conn, b"/hold") for _ in range(3)]
        assert conn.capacity() == 0
        await until(lambda: len(origin.received) == 4)
        origin.release_held()
        for u, s in holds:
            assert await u.done
            s.release(asyncio.get_running_loop().time(), True)
        assert conn.capacity() == 3
        conn.close("test")
        await owner.closed

    with h2_origin(max_concurrent_streams=3) as origin:
        run(loop_name, main(origin.port, origin))


@pytest.mark.parametrize("loop_name", LOOPS)
def test_goaway_refuses_streams_above_last_stream_id(loop_name: str) -> None:
    """The endpoint's GOAWAY: the stream at or below its last-stream-id finishes, the ones
    above fail as never processed (retried anywhere whatever the method), no new streams, and
    the connection closes once the last one ended."""

    async def main(port: int) -> None:
        conn, owner = await connect(port)
        pairs = [request(conn, b"/hold", b"POST", body=b"x") for _ in range(3)]
        results = [await u.done for u, _ in pairs]
        assert results == [True, False, False]
        assert bytes(pairs[0][0].body) == b"held 1"
        for u, _ in pairs[1:]:
            assert isinstance(u.error, UpstreamRefused) and u.error.never_processed
        assert conn.capacity() == 0 and not conn.is_reusable()
        pairs[0][1].release(asyncio.get_running_loop().time(), True)
        await owner.closed
        assert ("reset", "error") in owner.events

    with h2_origin(goaway_at=3) as origin:
        run(loop_name, main(origin.port))


@pytest.mark.parametrize("loop_name", LOOPS)
def test_ping_keepalive_closes_a_dead_connection(loop_name: str) -> None:
    async def main(port: int) -> None:
        conn, owner = await connect(port, H2Settings(keepalive_interval=0.2,
                                                     keepalive_timeout=0.2))
        user, _ = request(conn, b"/never")
        assert not await user.done
        assert isinstance(user.error, UpstreamReset)
        await owner.closed
        assert conn.close_reason == "timeout"

    with h2_origin(silent=True) as origin:
        run(loop_name, main(origin.port))


@pytest.mark.parametrize("loop_name", LOOPS)
def test_ping_keepalive_keeps_a_live_idle_connection(loop_name: str) -> None:
    async def main(port: int) -> None:
        conn, owner = await connect(port, H2Settings(keepalive_interval=0.1,
                                                     keepalive_timeout=0.5))
        await asyncio.sleep(0.8)  # several PINGs, all answered
        assert not conn.is_closed()
        user, stream = request(conn, b"/after")
        assert await user.done
        stream.release(asyncio.get_running_loop().time(), True)
        conn.close("test")
        await owner.closed

    with h2_origin() as origin:
        run(loop_name, main(origin.port))


@pytest.mark.parametrize("loop_name", LOOPS)
def test_paused_response_holds_the_window(loop_name: str) -> None:
    """Flow control tied to the consumer: while the exchange has the response paused, the
    endpoint can send no more than about one window (1 MiB); on resume the rest flows."""
    total = 6 << 20

    async def main(port: int, origin: Any) -> None:
        conn, owner = await connect(port)
        user, stream = request(conn, b"/big/%d" % total)
        stream.pause_response()
        await until(lambda: len(user.body) >= 1 << 20)
        await asyncio.sleep(0.3)  # the origin would go on if the windows let it
        sent = sum(origin.sent.values())
        assert sent <= (1 << 20) + 65536, sent
        assert len(user.body) == sent
        stream.resume_response()
        assert await user.done
        assert len(user.body) == total
        stream.release(asyncio.get_running_loop().time(), True)
        conn.close("test")
        await owner.closed

    with h2_origin() as origin:
        run(loop_name, main(origin.port, origin), timeout=60)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_reset_frees_the_stream_and_keeps_the_connection(loop_name: str) -> None:
    async def main(port: int, origin: Any) -> None:
        conn, owner = await connect(port)
        user, stream = request(conn, b"/hold")
        await until(lambda: len(origin.received) == 1)
        stream.reset("timeout")
        await until(lambda: origin.resets == [1])
        assert owner.events == [("reset", "timeout")]
        assert conn.state is CarrierState.IDLE and conn.is_reusable()
        assert not user.done.done()  # nothing more reaches a reset stream's user
        user2, stream2 = request(conn, b"/next")
        assert await user2.done
        stream2.release(asyncio.get_running_loop().time(), True)
        conn.close("test")
        await owner.closed

    with h2_origin() as origin:
        run(loop_name, main(origin.port, origin))


@pytest.mark.parametrize("loop_name", LOOPS)
def test_grpc_deadline_trailers_and_trailers_only(loop_name: str) -> None:
    seen: list[float] = []

    async def main(port: int) -> None:
        conn, owner = await connect(port)
        grpc_fields = [(b"content-type", b"application/grpc")]
        user, stream = request(conn, b"/svc/M", b"POST", grpc_fields, grpc_frame(b"hi"),
                               deadline_ms=3000)
        assert await user.done
        assert user.head is not None and user.head.status == 200
        assert bytes(user.body) == grpc_frame(b"hi")
        assert user.trailers is not None and dict(user.trailers)[b"grpc-status"] == b"0"
        assert dict(user.trailers)[b"x-trail"] == b"t"
        stream.release(asyncio.get_running_loop().time(), True)
        assert 2.0 < seen[0] <= 3.0  # the deadline left, as grpc-timeout
        user, stream = request(conn, b"/svc/Abort", b"POST", grpc_fields, grpc_frame(b"a"))
        assert await user.done
        assert user.head is not None and user.head.status == 200
        # Trailers-Only: the head keeps grpc-status for the retry policy, the app gets it
        # as trailers.
        assert dict(user.head.headers)[b"grpc-status"] == b"14"
        assert b"grpc-status" not in dict(user.head.forward)
        assert user.trailers is not None
        assert dict(user.trailers) == {b"grpc-status": b"14", b"grpc-message": b"go elsewhere"}
        stream.release(asyncio.get_running_loop().time(), True)
        conn.close("test")
        await owner.closed

    with grpc_server(seen) as port:
        run(loop_name, main(port))
