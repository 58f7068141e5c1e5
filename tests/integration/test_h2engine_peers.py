"""sidecar/http/h2engine.py against real HTTP/2 peers on 127.0.0.1, on both loops.

Server role: a small asyncio.Protocol on the engine (`EngineConn`, the shape the sidecar's own
protocols take) answered by `curl --http2-prior-knowledge`, `h2load` and grpcio clients (unary,
server streaming, a Trailers-Only abort). Client role: the same Protocol talking to nginx h2c
(`listen PORT http2;`) and to a grpcio server.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import pytest

from sidecar.http.h2engine import H2ProtocolError, H2Session, H2Sink
from tests.harness import LOOPS, free_port, nginx, require_tool
from tests.integration.grpc_servers import grpc_frame, grpc_server

GRPC_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
Headers = list[tuple[bytes, bytes]]


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def grpc_messages(data: bytes) -> list[bytes]:
    out = []
    i = 0
    while i + 5 <= len(data):
        n = struct.unpack(">I", data[i + 1:i + 5])[0]
        out.append(data[i + 5:i + 5 + n])
        i += 5 + n
    return out


class Stream:
    def __init__(self) -> None:
        self.headers: list[Headers] = []
        self.body = bytearray()
        self.trailers: Headers | None = None
        self.reset: int | None = None
        self.done: asyncio.Future[None] | None = None


class EngineConn(asyncio.Protocol, H2Sink):
    """One HTTP/2 connection on the engine: writes data_to_send() once per read batch."""

    def __init__(self, client: bool, handler: Callable[[EngineConn, int, Stream], None] | None
                 = None, registry: set[EngineConn] | None = None) -> None:
        self.client = client
        self.registry = registry
        self.handler = handler
        self.session = H2Session(self, client)
        self.streams: dict[int, Stream] = {}
        self.pending: dict[int, tuple[bytearray, Headers | None]] = {}  # waiting for a window
        self.transport: asyncio.Transport | None = None
        self.abuse: list[str] = []
        self.closed = asyncio.get_event_loop().create_future()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.registry is not None:
            self.registry.add(self)
        self.session.initiate()
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.session.receive(data)
        except H2ProtocolError:
            self.flush()
            assert self.transport is not None
            self.transport.close()
            return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.registry is not None:
            self.registry.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)
        for st in self.streams.values():
            if st.done is not None and not st.done.done():
                st.done.set_exception(ConnectionError("connection lost"))

    def flush(self) -> None:
        out = self.session.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    # sending with flow control
    def send_body(self, sid: int, data: bytes, trailers: Headers | None, end: bool) -> None:
        buf = bytearray(data)
        self.pending[sid] = (buf, trailers if trailers is not None else ([] if end else None))
        self._push(sid)

    def _push(self, sid: int) -> None:
        buf, trailers = self.pending[sid]
        last = trailers == []
        n = self.session.send_data(sid, bytes(buf), last)
        del buf[:n]
        if not buf:
            del self.pending[sid]
            if trailers:
                self.session.send_trailers(sid, trailers)

    # H2Sink
    def _st(self, sid: int) -> Stream:
        st = self.streams.get(sid)
        if st is None:
            st = self.streams[sid] = Stream()
        return st

    def _end(self, sid: int) -> None:
        st = self._st(sid)
        if self.client:
            if st.done is not None and not st.done.done():
                st.done.set_result(None)
        elif self.handler is not None:
            self.handler(self, sid, st)

    def on_h2_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self._st(stream_id).headers.append(headers)
        if end_stream:
            self._end(stream_id)

    def on_h2_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self._st(stream_id).body += data
        if data:
            self.session.consume(stream_id, len(data))
        if end_stream:
            self._end(stream_id)

    def on_h2_trailers(self, stream_id: int, headers: Headers) -> None:
        self._st(stream_id).trailers = headers
        self._end(stream_id)

    def on_h2_reset(self, stream_id: int, error_code: int) -> None:
        st = self._st(stream_id)
        st.reset = error_code
        self.pending.pop(stream_id, None)
        if st.done is not None and not st.done.done():
            st.done.set_exception(ConnectionResetError(f"stream reset {error_code}"))

    def on_h2_window_open(self, stream_id: int) -> None:
        for sid in [stream_id] if stream_id else list(self.pending):
            if sid in self.pending:
                self._push(sid)

    def on_h2_abuse(self, kind: str) -> None:
        self.abuse.append(kind)

    # client role
    async def request(self, headers: Headers, body: bytes = b"", trailers: Headers | None = None,
                      wait: float = 10.0) -> Stream:
        sid = self.session.new_stream_id()
        st = self._st(sid)
        st.done = asyncio.get_running_loop().create_future()
        no_body = not body and trailers is None
        self.session.send_headers(sid, headers, no_body)
        if not no_body:
            self.send_body(sid, body, trailers, True)
        self.flush()
        await asyncio.wait_for(st.done, wait)
        return st


def answer(conn: EngineConn, sid: int, st: Stream) -> None:
    """The test server: gRPC echo, server streaming and abort, or a small text page."""
    head = dict(st.headers[0])
    path = head[b":path"]
    s = conn.session
    grpc_head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    if path == b"/svc/M":
        s.send_headers(sid, grpc_head, False)
        conn.send_body(sid, bytes(st.body), [(b"grpc-status", b"0")], True)
    elif path == b"/svc/Stream":
        (msg,) = grpc_messages(bytes(st.body))
        s.send_headers(sid, grpc_head, False)
        out = b"".join(grpc_frame(msg + b"-%d" % i) for i in range(5))
        conn.send_body(sid, out, [(b"grpc-status", b"0")], True)
    elif path == b"/svc/Abort":  # Trailers-Only
        s.send_headers(sid, grpc_head + [(b"grpc-status", b"3"), (b"grpc-message", b"bad")],
                       True)
    elif path == b"/big":
        s.send_headers(sid, [(b":status", b"200")], False)
        conn.send_body(sid, b"b" * (3 << 20), None, True)
    else:
        body = b"hello " + head[b":method"] + b" " + bytes(st.body) + b"\n"
        s.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % len(body))],
                       False)
        conn.send_body(sid, body, None, True)


@contextlib.contextmanager
def engine_server(loop_name: str) -> Iterator[int]:
    """The engine as a server on its own loop in a thread; stopped and joined on exit."""
    port = free_port()
    loop = new_loop(loop_name)
    ready = threading.Event()
    holder: dict[str, Any] = {}
    conns: set[EngineConn] = set()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            holder["server"] = await loop.create_server(
                lambda: EngineConn(False, answer, conns), "127.0.0.1", port)
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10), "engine server did not start"
    try:
        yield port
    finally:
        async def stop() -> None:
            holder["server"].close()
            for conn in list(conns):
                if conn.transport is not None:
                    conn.transport.close()
            for _ in range(100):  # bounded: until every connection_lost ran
                if not conns:
                    break
                await asyncio.sleep(0.01)
            await holder["server"].wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_server_answers_curl(loop_name: str) -> None:
    curl = require_tool("/usr/bin/curl", "apt-get install curl")
    with engine_server(loop_name) as port:
        out = subprocess.run(
            [curl, "-sS", "--http2-prior-knowledge", "--max-time", "10",
             "-w", "|%{http_version} %{http_code}", f"http://127.0.0.1:{port}/x",
             "--data-binary", "abc"],
            capture_output=True, timeout=20, check=True).stdout
        assert out == b"hello POST abc\n|2 200"
        big = subprocess.run(
            [curl, "-sS", "--http2-prior-knowledge", "--max-time", "20",
             f"http://127.0.0.1:{port}/big"], capture_output=True, timeout=30, check=True).stdout
        assert big == b"b" * (3 << 20)  # three windows and more: flow control both ways


@pytest.mark.parametrize("loop_name", LOOPS)
def test_server_under_h2load(loop_name: str) -> None:
    h2load = require_tool("/usr/bin/h2load", "apt-get install nghttp2-client")
    with engine_server(loop_name) as port:
        out = subprocess.run(
            [h2load, "-n", "1000", "-c", "4", "-m", "8", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, timeout=60, check=True).stdout
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored", out)
    assert m, out
    assert m.group(4) == "1000" and m.group(5) == "0" and m.group(6) == "0", out
    assert "status codes: 1000 2xx" in out, out


@pytest.mark.parametrize("loop_name", LOOPS)
def test_server_answers_grpcio(loop_name: str) -> None:
    with engine_server(loop_name) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
        unary = ch.unary_unary("/svc/M")
        for i in range(20):
            assert unary(b"hello %d" % i, timeout=10) == b"hello %d" % i
        big = bytes(range(256)) * 8192  # 2 MiB: beyond one window each way
        assert unary(big, timeout=20) == big
        assert list(ch.unary_stream("/svc/Stream")(b"m", timeout=10)) == [
            b"m-%d" % i for i in range(5)]
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/svc/Abort")(b"x", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "bad"


async def _connect(port: int) -> EngineConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: EngineConn(True), "127.0.0.1", port)
    return proto


@pytest.mark.parametrize("loop_name", LOOPS)
def test_client_against_nginx_h2c(loop_name: str) -> None:
    conf = """
    server {
      listen 127.0.0.1:{port} http2;
      location / { return 200 "from nginx $request_method $uri\\n"; }
      location /big { alias /tmp/sidecar-h2engine-big; }
    }
    """
    with open("/tmp/sidecar-h2engine-big", "wb") as f:
        f.write(b"n" * (3 << 20))

    async def main(port: int) -> None:
        conn = await _connect(port)
        head = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1")]
        sts = await asyncio.gather(*[
            conn.request(head + [(b":path", b"/p%d" % i)]) for i in range(20)])
        for i, st in enumerate(sts):
            assert st.headers[0][0] == (b":status", b"200")
            assert bytes(st.body) == b"from nginx GET /p%d\n" % i
        big = await conn.request(head + [(b":path", b"/big")], wait=30)
        assert len(big.body) == 3 << 20  # 3 MiB through 1 MiB windows opened by consume()
        assert conn.session.open_streams == 0
        assert conn.session.peer_max_concurrent_streams == 128  # nginx's default
        conn.session.goaway(0)
        conn.flush()
        assert conn.transport is not None
        conn.transport.close()

    loop = new_loop(loop_name)
    try:
        with nginx(conf) as port:
            loop.run_until_complete(asyncio.wait_for(main(port), 60))
    finally:
        loop.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_client_against_grpcio_server(loop_name: str) -> None:
    async def main(port: int) -> None:
        conn = await _connect(port)

        def head(path: bytes) -> Headers:
            return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
                    (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"), (b"grpc-timeout", b"10S")]

        st = await conn.request(head(b"/svc/M"), grpc_frame(b"ping"))
        assert dict(st.headers[0])[b":status"] == b"200"
        assert grpc_messages(bytes(st.body)) == [b"ping"]
        assert st.trailers is not None
        trailers = dict(st.trailers)
        assert trailers[b"grpc-status"] == b"0" and trailers[b"x-trail"] == b"t"
        big = bytes(range(256)) * 8192
        st = await conn.request(head(b"/svc/M"), grpc_frame(big), wait=30)
        assert grpc_messages(bytes(st.body)) == [big]
        st = await conn.request(head(b"/svc/Stream"), grpc_frame(b"s"))
        assert grpc_messages(bytes(st.body)) == [b"s-%d" % i for i in range(5)]
        st = await conn.request(head(b"/svc/Abort"), grpc_frame(b"a"))
        assert st.trailers is None and len(st.headers) == 1  # Trailers-Only
        only = dict(st.headers[0])
        assert only[b"grpc-status"] == b"14" and only[b"grpc-message"] == b"go elsewhere"
        assert conn.session.open_streams == 0
        assert conn.transport is not None
        conn.transport.close()

    loop = new_loop(loop_name)
    try:
        with grpc_server() as port:
            loop.run_until_complete(asyncio.wait_for(main(port), 60))
    finally:
        loop.close()
