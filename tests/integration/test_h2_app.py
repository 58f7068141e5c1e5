"""HTTP/2 from the app (SPEC section 11), end to end on 127.0.0.1, under uvloop and asyncio.

A real sidecar process whose `protocol: http` listeners take HTTP/1.1 and h2c with prior
knowledge on the same port, in front of real origins: aiohttp (echo, big bodies, per-endpoint
names), nginx, a raw-socket HTTP/1.1 origin that records the bytes it gets and answers with
trailers, and a silent endpoint (accepts, never answers). Real clients: `curl
--http2-prior-knowledge`, httpx (`http2=True`, prior knowledge), grpcio, and a raw HTTP/2
client on the `h2` library for what clients would not do (never open a window, flood, reset
streams at once). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import httpx
import pytest
from aiohttp import web

from tests.h2origin import h2_origin
from tests.harness import LOOPS, Sidecar, SilentListener, ThreadedServer, http_get, nginx

TIMEOUT = 10.0
MIB = 1 << 20
RSS_LIMIT_KIB = 100 * 1024
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
REFUSED_STREAM = 0x7


def wait_until(cond: Callable[[], bool], within: float = TIMEOUT, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not met in {within}s: {what}")
        time.sleep(0.02)


def vm_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# --- origins --------------------------------------------------------------------------------------
class Origin:
    """An aiohttp origin named `name`: echo, big streamed bodies, and a count of bytes written."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        self.written = 0  # bytes of /big bodies handed to the socket so far
        app = web.Application(client_max_size=64 * MIB)
        app.router.add_route("*", "/big", self.big)
        app.router.add_route("*", "/slow", self.slow)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.server = ThreadedServer(app)

    async def echo(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.read()
        return web.json_response({
            "origin": self.name,
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
            "sha": hashlib.sha256(body).hexdigest(),
        })

    async def slow(self, request: web.Request) -> web.Response:
        import asyncio

        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text="slow-done")

    async def big(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["n"])
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        block = b"x" * (64 * 1024)
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await resp.write(piece)  # waits while the socket's buffer is full (drain)
            sent += len(piece)
            self.written = sent
        await resp.write_eof()
        return resp


class TrailerOrigin:
    """A raw HTTP/1.1 origin: records the bytes of each request, answers chunked with a
    trailer field (what an HTTP/2 app must see as trailers)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if not sep:
                    continue
                chunked = b"transfer-encoding: chunked" in head.lower()
                if chunked and (b"\r\n0\r\n" not in b"\r\n" + rest
                                or not rest.endswith(b"\r\n\r\n")):
                    continue  # until the last chunk and its trailer section
                self.requests.append(buf)
                buf = b""
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n"
                    b"Content-Type: text/plain\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\n\r\n"
                )

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


# --- a raw HTTP/2 client (the h2 library) ------------------------------------------------------
class H2Client:
    """An h2c client with prior knowledge on a blocking socket, driven by hand: it opens its
    windows only when told (`ack`), so it can be a slow reader, and it can misbehave."""

    def __init__(self, port: int, window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.flush()
        self.heads: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.eof = False
        self.received = 0
        self.unacked: list[tuple[int, int]] = []
        self.max_streams = 0

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, method: str, path: str, authority: str = "up",
                headers: list[tuple[str, str]] | None = None, body: bytes | None = None,
                end: bool = True) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", "http"), (":authority", authority),
                  (":path", path), *(headers or [])]
        self.conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in fields],
                               end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def pump(self, until: Callable[[], bool], within: float = TIMEOUT, ack: bool = True) -> None:
        deadline = time.monotonic() + within
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("h2 client: condition not met in time")
            if self.eof:
                raise AssertionError("h2 client: connection closed")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError:
                self.eof = True
                continue
            if not data:
                self.eof = True
                continue
            self.feed(data, ack)

    def feed(self, data: bytes, ack: bool) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                self.heads[ev.stream_id] = list(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                self.received += len(ev.data)
                n = ev.flow_controlled_length
                if ack:
                    self.conn.acknowledge_received_data(n, ev.stream_id)
                else:
                    self.unacked.append((ev.stream_id, n))
            elif isinstance(ev, h2.events.TrailersReceived):
                self.trailers[ev.stream_id] = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.resets[ev.stream_id] = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                s = ev.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                if s is not None:
                    self.max_streams = s.new_value
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.flush()

    def ack_all(self) -> None:
        for sid, n in self.unacked:
            with contextlib.suppress(h2.exceptions.StreamClosedError, KeyError):
                self.conn.acknowledge_received_data(n, sid)
        self.unacked.clear()
        self.flush()

    def status(self, sid: int) -> int:
        return int(dict(self.heads[sid])[b":status"])

    def done(self, sid: int) -> bool:
        return sid in self.ended or sid in self.resets

    def wait_closed(self, within: float = TIMEOUT) -> None:
        deadline = time.monotonic() + within
        while not self.eof and time.monotonic() < deadline:
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                self.eof = True
                break
            if not data:
                self.eof = True
                break
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.feed(data, True)
        assert self.eof, "the sidecar did not close the connection"

    def close(self) -> None:
        self.sock.close()


def raw_h2(port: int, frames: bytes) -> tuple[bytes, bool]:
    """Send the preface, an empty SETTINGS and `frames` in one write; read until the sidecar
    closes (bounded). Returns what it sent and whether it closed."""
    with socket.create_connection(("127.0.0.1", port), TIMEOUT) as s:
        s.sendall(PREFACE + frame(4, 0, 0, b"") + frames)
        got = b""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            s.settimeout(0.5)
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return got, True
            if not data:
                return got, True
            got += data
        return got, False


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(
        ">I", sid) + payload


def goaway_code(data: bytes) -> int | None:
    i = 0
    while i + 9 <= len(data):
        n = int.from_bytes(data[i:i + 3], "big")
        if data[i + 3] == 7:
            return int.from_bytes(data[i + 13:i + 17], "big")
        i += 9 + n
    return None


class FrameClient:
    """HTTP/2 at the frame level, for what the `h2` library will not do: it ends its
    connection at the first GOAWAY, while RFC 9113 6.8 has the streams below the GOAWAY's
    last-stream-id go on (the drain's graceful GOAWAY)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        self.sock.sendall(PREFACE + frame(4, 0, 0, b""))
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.buf = b""
        self.next_sid = 1
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaway: tuple[int, int] | None = None  # (last stream id, error code)
        self.eof = False

    def request(self, path: str) -> int:
        sid = self.next_sid
        self.next_sid += 2
        block = self.enc.encode([(":method", "GET"), (":scheme", "http"),
                                 (":authority", "up"), (":path", path)])
        self.sock.sendall(frame(1, 0x5, sid, block))  # END_STREAM | END_HEADERS
        return sid

    def pump(self, until: Callable[[], bool], within: float = TIMEOUT) -> None:
        deadline = time.monotonic() + within
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("frame client: condition not met in time")
            if self.eof:
                raise AssertionError("frame client: connection closed")
            self.sock.settimeout(0.3)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                self.eof = True
                continue
            self.buf += data
            self._frames()

    def _frames(self) -> None:
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                return
            kind, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = self.buf[9:9 + n]
            self.buf = self.buf[9 + n:]
            if kind == 1:
                self.heads[sid] = {k if isinstance(k, bytes) else k.encode():
                                   v if isinstance(v, bytes) else v.encode()
                                   for k, v in self.dec.decode(payload, raw=True)}
            elif kind == 0:
                self.bodies[sid] = self.bodies.get(sid, b"") + payload
            elif kind == 3:
                self.resets[sid] = int.from_bytes(payload[:4], "big")
            elif kind == 4 and not flags & 1:
                self.sock.sendall(frame(4, 1, 0, b""))  # SETTINGS ACK
            elif kind == 7:
                self.goaway = (int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                               int.from_bytes(payload[4:8], "big"))
            if kind in (0, 1) and flags & 1:
                self.ended.add(sid)

    def close(self) -> None:
        self.sock.close()


REQUEST_BLOCK = hpack.Encoder().encode(
    [(":method", "GET"), (":scheme", "http"), (":authority", "up"), (":path", "/")])


# --- the sidecar under test -----------------------------------------------------------------------
class Env:
    def __init__(self, sc: Sidecar, origins: dict[str, Origin], trailer: TrailerOrigin,
                 nginx_port: int) -> None:
        self.sc = sc
        self.origins = origins
        self.trailer = trailer
        self.nginx_port = nginx_port

    def abuse(self, kind: str) -> float:
        return self.sc.metric("sidecar_http2_abuse_total", kind=kind)


def cluster(name: str, *ports: int, **extra: Any) -> dict[str, Any]:
    """A static cluster; `protocol: http1` unless given (the origins here speak HTTP/1.1, and
    `auto` in cleartext would keep an HTTP/2 app's protocol: SPEC section 11)."""
    return {"name": name,
            "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{p}" for p in ports]},
            "protocol": "http1", **extra}


@pytest.fixture(scope="module", params=LOOPS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    origins = {n: Origin(n) for n in ("a", "b", "c")}
    trailer = TrailerOrigin()
    silent = SilentListener()
    stack = contextlib.ExitStack()
    try:
        for o in origins.values():
            stack.enter_context(o.server)
        nginx_port = stack.enter_context(nginx(
            'server { listen 127.0.0.1:{port}; location / { return 200 "nginx-ok\\n"; } }'))
        a = origins["a"].server.port
        config = {
            "listeners": [
                {"name": "fixed", "protocol": "http", "cluster": "echo"},
                {"name": "routed", "protocol": "http", "routes": [
                    {"match": {"host": "three"}, "cluster": "three"},
                    {"match": {"host": "nginx"}, "cluster": "nginx"},
                    {"match": {"host": "trailers"}, "cluster": "trailers"},
                    {"match": {"host": "silent"}, "cluster": "silent"},
                    {"match": {"host": "silent1"}, "cluster": "silent1"},
                    {"match": {"host": "tight"}, "cluster": "tight"},
                    {"match": {"host": "up"}, "cluster": "echo"},
                ]},
                {"name": "stall", "protocol": "http", "cluster": "echo",
                 "limits": {"idle_timeout": "1s"}},
            ],
            "clusters": [
                cluster("echo", a),
                cluster("three", *(o.server.port for o in origins.values()),
                        load_balancer="round_robin"),
                cluster("nginx", nginx_port),
                cluster("trailers", trailer.port),
                # Blackholes for gRPC deadlines: http2, since gRPC to an http1 cluster is
                # refused (protocol_mismatch).
                cluster("silent", silent.port, retry={"attempts": 1}, protocol="http2"),
                cluster("tight", silent.port, retry={"attempts": 1}, protocol="http2",
                        timeouts={"request": "300ms"}),
                cluster("silent1", silent.port, retry={"attempts": 1}),
            ],
        }
        sc = stack.enter_context(Sidecar(config, loop=request.param))
        yield Env(sc, origins, trailer, nginx_port)
    finally:
        stack.close()
        trailer.close()
        silent.close()


# --- the same port, both protocols ----------------------------------------------------------------
def test_curl_prior_knowledge_and_http11_on_the_same_port(env: Env) -> None:
    url = env.sc.url("fixed", "/x?y=1")
    for args, version in ((["--http2-prior-knowledge"], "2"), ([], "1.1")):
        r = subprocess.run(["curl", "-sS", "--noproxy", "*", "-o", "-", "-w",
                            "\n%{http_version} %{http_code}", *args, url],
                           capture_output=True, timeout=TIMEOUT, check=True)
        body, _, tail = r.stdout.rpartition(b"\n")
        assert tail.decode() == f"{version} 200", r.stderr
        got = json.loads(body)
        assert got["path"] == "/x?y=1" and got["method"] == "GET"
    # A POST body through HTTP/2, checked at the origin.
    payload = bytes(range(256)) * 1000
    r = subprocess.run(["curl", "-sS", "--noproxy", "*", "--http2-prior-knowledge",
                        "--data-binary", "@-", url], input=payload, capture_output=True,
                       timeout=TIMEOUT, check=True)
    got = json.loads(r.stdout)
    assert got["body_len"] == len(payload)
    assert got["sha"] == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("loop", LOOPS)
def test_one_access_line_per_request_whichever_protocol(env: Env, loop: str) -> None:
    """HTTP/1.1 and HTTP/2 requests are logged by the same writer (Exchange.log_access): the
    same fields, and `protocol` says which the app spoke."""
    config = {
        "access_log": True,
        "listeners": [{"name": "fixed", "protocol": "http", "cluster": "echo"}],
        "clusters": [cluster("echo", env.origins["a"].server.port)],
    }
    seen = {}
    with Sidecar(config, loop=loop) as sc:
        for args, protocol in ((["--http2-prior-knowledge"], "h2"), ([], "http/1.1")):
            path = f"/access-{protocol.replace('/', '')}"
            subprocess.run(["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", *args,
                            sc.url("fixed", path)], capture_output=True, timeout=TIMEOUT,
                           check=True)

            def lines(path: str = path) -> list[dict[str, Any]]:
                return [json.loads(line) for line in sc.logs().splitlines()
                        if '"access"' in line and path in line]

            wait_until(lambda: bool(lines()), what=f"the access line of {path}")
            seen[protocol] = lines()[0]
    fields = {"listener", "protocol", "method", "authority", "path", "status", "cluster",
              "endpoint", "attempts", "duration_ms", "error"}
    for protocol, line in seen.items():
        assert fields <= set(line), line
        assert line["protocol"] == protocol and line["status"] == 200, line
        assert line["listener"] == "fixed" and line["cluster"] == "echo" and line["attempts"] == 1
        assert line["method"] == "GET" and line["error"] is None and line["duration_ms"] >= 0


def test_httpx_h2_many_requests_on_one_connection(env: Env) -> None:
    with httpx.Client(http1=False, http2=True, trust_env=False, timeout=TIMEOUT) as client:
        for i in range(20):
            r = client.post(env.sc.url("routed", f"/n/{i}"), content=b"z" * i,
                            headers={"host": "up", "x-custom": "v"})
            assert r.http_version == "HTTP/2"
            assert r.status_code == 200
            got = r.json()
            assert got["path"] == f"/n/{i}" and got["body_len"] == i
            names = {k.lower(): v for k, v in got["headers"]}
            assert names["x-custom"] == "v" and names["host"] == "up"
    assert env.sc.metric("sidecar_requests_total", listener="routed", cluster="echo",
                         code_class="2xx") >= 20


def test_nginx_origin_over_h2(env: Env) -> None:
    r = subprocess.run(["curl", "-sS", "--noproxy", "*", "--http2-prior-knowledge", "-H",
                        "host: nginx", env.sc.url("routed", "/")],
                       capture_output=True, timeout=TIMEOUT, check=True)
    assert r.stdout == b"nginx-ok\n"


def test_sidecar_errors_are_section_5_answers_for_plain_h2(env: Env) -> None:
    with httpx.Client(http1=False, http2=True, trust_env=False, timeout=TIMEOUT) as client:
        r = client.get(env.sc.url("routed", "/"), headers={"host": "nowhere"})
    assert r.status_code == 404
    assert r.headers["x-sidecar-error"] == "no_route"
    assert r.json()["error"] == "no_route"


def test_trailers_both_ways(env: Env) -> None:
    c = H2Client(env.sc.port("routed"))
    try:
        sid = c.request("POST", "/t", authority="trailers", body=b"abc", end=False)
        c.conn.send_headers(sid, [(b"x-req-trailer", b"r1")], end_stream=True)
        c.flush()
        c.pump(lambda: c.done(sid))
        assert c.status(sid) == 200
        assert bytes(c.bodies[sid]) == b"hello world"
        assert (b"x-checksum", b"abc123") in c.trailers[sid]
    finally:
        c.close()
    raw = env.trailer.requests[-1]
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()  # no content-length from the app
    assert body == b"3\r\nabc\r\n0\r\nx-req-trailer: r1\r\n\r\n"


def test_max_concurrent_streams_is_advertised(env: Env) -> None:
    c = H2Client(env.sc.port("fixed"))
    try:
        c.pump(lambda: c.max_streams > 0)
        assert c.max_streams == 1000
    finally:
        c.close()


# --- flow control ---------------------------------------------------------------------------------
def test_slow_h2_reader_keeps_the_sidecar_bounded(env: Env) -> None:
    """A 64 MiB answer to an app that opens no window: the sidecar sends one window and stops
    reading the origin, so what the origin managed to write stays far below the body (the
    rest of it waits in the origin, not in the sidecar), and the sidecar's memory with it."""
    origin = env.origins["a"]
    size = 64 * MIB
    origin.written = 0
    c = H2Client(env.sc.port("fixed"), window=65535)
    try:
        sid = c.request("GET", f"/big?n={size}")
        c.pump(lambda: c.received >= 65535, ack=False)
        # Bounded poll: until the origin's writes stop moving (backpressure reached it).
        last = -1
        deadline = time.monotonic() + TIMEOUT
        while origin.written != last and time.monotonic() < deadline:
            last = origin.written
            time.sleep(0.3)
        assert origin.written == last, "the origin never stopped writing"
        assert c.received == 65535  # exactly the window, nothing more
        # What left the origin and is not with the app: the sidecar's buffers plus the two
        # sockets' kernel buffers on loopback (a few MiB), never the body.
        assert origin.written - c.received < 16 * MIB, origin.written
        assert vm_kib(env.sc.pid, "VmRSS") < RSS_LIMIT_KIB
        # Now read it all, opening windows as we go.
        c.ack_all()
        c.pump(lambda: c.done(sid), within=60)
        assert sid in c.ended and len(c.bodies[sid]) == size
    finally:
        c.close()
    assert vm_kib(env.sc.pid, "VmHWM") < RSS_LIMIT_KIB


def test_zero_window_stall_resets_the_stream(env: Env) -> None:
    before = env.abuse("zero_window_stall")
    c = H2Client(env.sc.port("stall"), window=1024)
    try:
        sid = c.request("GET", f"/big?n={4 * MIB}")
        c.pump(lambda: sid in c.resets, within=5, ack=False)  # idle_timeout is 1 s here
        assert c.resets[sid] == h2.errors.ErrorCodes.CANCEL
        # The connection goes on: another stream on it is served.
        sid2 = c.request("GET", "/after")
        c.pump(lambda: c.done(sid2))
        assert c.status(sid2) == 200
    finally:
        c.close()
    wait_until(lambda: env.abuse("zero_window_stall") == before + 1, what="stall counted")


def test_large_h2_upload_arrives_whole(env: Env) -> None:
    """16 MiB through the windows the sidecar opens as the origin reads (many pauses)."""
    payload = bytes(range(256)) * (16 * MIB // 256)
    with httpx.Client(http1=False, http2=True, trust_env=False, timeout=30) as client:
        r = client.post(env.sc.url("fixed", "/up"), content=iter(
            [payload[i:i + 100_000] for i in range(0, len(payload), 100_000)]))
    assert r.http_version == "HTTP/2" and r.status_code == 200
    got = r.json()
    assert got["body_len"] == len(payload)
    assert got["sha"] == hashlib.sha256(payload).hexdigest()


def test_idle_h2_connection_gets_goaway_then_closes(env: Env) -> None:
    """`limits.idle_timeout` (1 s on this listener) with no stream open: GOAWAY, then close."""
    c = H2Client(env.sc.port("stall"))
    try:
        sid = c.request("GET", "/once")
        c.pump(lambda: c.done(sid))
        c.wait_closed(within=5)
        assert c.goaway is not None and c.goaway.error_code == 0
        assert c.goaway.last_stream_id == sid
    finally:
        c.close()


def test_upload_faster_than_the_endpoint_reads_is_bounded(env: Env) -> None:
    """Request direction: the app's windows are given back only as the endpoint side takes
    the bytes, so a client pushing a body to a cluster that never reads is held to a window
    (the silent endpoint accepts and reads nothing)."""
    c = H2Client(env.sc.port("routed"))
    try:
        sid = c.request("POST", "/up", authority="silent1", body=None, end=False)
        block = b"u" * 16384
        sent = 0
        deadline = time.monotonic() + TIMEOUT
        # Send while the windows let us; h2 refuses beyond them (FlowControlError).
        while time.monotonic() < deadline and sent < 64 * MIB:
            room = min(c.conn.local_flow_control_window(sid), len(block))
            if room <= 0:
                c.sock.settimeout(0.3)
                try:
                    data = c.sock.recv(65536)
                except TimeoutError:
                    if c.conn.local_flow_control_window(sid) <= 0:
                        break  # no window came back within 0.3 s: held
                    continue
                c.feed(data, True)
                continue
            c.conn.send_data(sid, block[:room])
            c.flush()
            sent += room
        assert sent < 16 * MIB, sent
        assert vm_kib(env.sc.pid, "VmRSS") < RSS_LIMIT_KIB
        c.conn.reset_stream(sid)
        c.flush()
    finally:
        c.close()


# --- balancing per request ------------------------------------------------------------------------
def test_one_h2_connection_spreads_over_three_endpoints(env: Env) -> None:
    before = {n: o.hits for n, o in env.origins.items()}
    seen: dict[str, int] = {}
    with httpx.Client(http1=False, http2=True, trust_env=False, timeout=TIMEOUT) as client:
        for _ in range(30):
            r = client.get(env.sc.url("routed", "/who"), headers={"host": "three"})
            assert r.status_code == 200
            name = r.json()["origin"]
            seen[name] = seen.get(name, 0) + 1
    assert set(seen) == {"a", "b", "c"}, seen
    assert all(n >= 5 for n in seen.values()), seen
    assert sum(o.hits - before[n] for n, o in env.origins.items()) == 30


# --- gRPC on the app side -------------------------------------------------------------------------
def grpc_call(port: int, method: str, timeout: float,
              metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
        call = ch.unary_unary(method)
        with pytest.raises(grpc.RpcError) as info:
            call(b"ping", timeout=timeout, metadata=metadata)
    return info.value


@pytest.mark.parametrize("loop", LOOPS)
def test_new_forward_proxy_destinations_wait_for_their_discovery(loop: str) -> None:
    """h2c through the forward proxy: each new host:port becomes a dynamic cluster whose
    discovery has not answered when its first request arrives. Those streams wait on one app
    connection (Exchange.await_discovery), are started by the discovery callback and
    answered; later ones to a known destination go at once. The destinations are HTTP/2-only
    origins (a cleartext `auto` cluster keeps an h2 app's protocol)."""
    with h2_origin(name="a") as a, h2_origin(name="b") as b, Sidecar({
        "listeners": [{"name": "egress", "protocol": "http", "forward_proxy": {
            "enabled": True, "allowed_hosts": ["127.0.0.1"]}}],
    }, loop=loop) as sc:
        c = H2Client(sc.port("egress"))
        try:
            plan = [(a, "/first"), (b, "/first"), (a, "/second")]
            sids = [c.request("GET", path, authority=f"127.0.0.1:{o.port}") for o, path in plan]
            c.pump(lambda: all(c.done(s) for s in sids))
            for sid, (origin, path) in zip(sids, plan, strict=True):
                assert c.status(sid) == 200, (sid, c.resets)
                assert bytes(c.bodies[sid]) == f"origin {origin.name} {path}".encode()
            later = c.request("GET", "/later", authority=f"127.0.0.1:{b.port}")
            c.pump(lambda: c.done(later))
            assert bytes(c.bodies[later]) == b"origin b /later"
        finally:
            c.close()
        assert sc.metric("sidecar_forward_proxy_destination_events_total", event="created") == 2


def test_grpc_no_route_is_unimplemented_trailers_only(env: Env) -> None:
    err = grpc_call(env.sc.port("routed"), "/svc/M", 5.0)
    # grpcio sends :authority 127.0.0.1:port: no route for it.
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    trailing = dict(err.trailing_metadata())  # type: ignore[attr-defined]
    assert trailing["x-sidecar-error"] == "no_route"


def test_grpc_deadline_is_the_smallest(env: Env) -> None:
    port = env.sc.port("routed")
    # x-sidecar-timeout-ms below grpc-timeout: the sidecar answers DEADLINE_EXCEEDED itself.
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            *GRPC_OPTIONS, ("grpc.default_authority", "silent")]) as ch:
        call = ch.unary_unary("/svc/M")
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            call(b"ping", timeout=5.0, metadata=(("x-sidecar-timeout-ms", "300"),))
        took = time.monotonic() - t0
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert dict(info.value.trailing_metadata())[  # type: ignore[attr-defined]
            "x-sidecar-error"] == "upstream_timeout"
        assert took < 4.0
    # The cluster's timeouts.request (300 ms) below grpc-timeout (5 s): the same.
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            *GRPC_OPTIONS, ("grpc.default_authority", "tight")]) as ch:
        call = ch.unary_unary("/svc/M")
        with pytest.raises(grpc.RpcError) as info:
            call(b"ping", timeout=5.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert dict(info.value.trailing_metadata())[  # type: ignore[attr-defined]
            "x-sidecar-error"] == "upstream_timeout"
    # grpc-timeout (300 ms) below the cluster's 15 s: the sidecar answers at the app's
    # deadline. (A raw client: grpcio would cancel the call at that same moment itself.)
    c = H2Client(port)
    try:
        t0 = time.monotonic()
        sid = c.request("POST", "/svc/M", authority="silent", body=b"\x00\x00\x00\x00\x00",
                        headers=[("content-type", "application/grpc"), ("te", "trailers"),
                                 ("grpc-timeout", "300m")])
        c.pump(lambda: c.done(sid), within=5)
        took = time.monotonic() - t0
        head = dict(c.heads[sid])
        assert head[b":status"] == b"200" and sid in c.ended and sid not in c.bodies
        assert head[b"grpc-status"] == b"4" and head[b"x-sidecar-error"] == b"upstream_timeout"
        assert took < 4.0
    finally:
        c.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_grpc_end_to_end_through_the_sidecar(loop: str) -> None:
    """grpcio channel -> the sidecar's h2c listener -> three grpcio servers (protocol http2):
    unary with trailing metadata, server streaming, a Trailers-Only abort passed through
    whole, a deadline, and the calls of one channel spread over the three servers."""
    from concurrent import futures

    def server(name: str) -> tuple[grpc.Server, int]:
        def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            ctx.set_trailing_metadata((("x-trailer", "t1"),))
            return b"pong:" + req

        def who(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            return name.encode()

        def stream(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
            for i in range(5):
                yield b"m%d" % i

        def abort(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thing")
            raise AssertionError

        def slow(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            time.sleep(2.0)
            return b"late"

        srv = grpc.server(futures.ThreadPoolExecutor(4))
        srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("svc", {
            "U": grpc.unary_unary_rpc_method_handler(unary),
            "W": grpc.unary_unary_rpc_method_handler(who),
            "S": grpc.unary_stream_rpc_method_handler(stream),
            "A": grpc.unary_unary_rpc_method_handler(abort),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
        }),))
        port = srv.add_insecure_port("127.0.0.1:0")
        srv.start()
        return srv, port

    servers = [server(n) for n in ("g1", "g2", "g3")]
    try:
        cfg = {"listeners": [{"name": "g", "protocol": "http", "cluster": "orders"}],
               "clusters": [cluster("orders", *(p for _, p in servers), protocol="http2",
                                    load_balancer="round_robin")]}
        with Sidecar(cfg, loop=loop) as sc, grpc.insecure_channel(
                f"127.0.0.1:{sc.port('g')}", options=GRPC_OPTIONS) as ch:
            value, call = ch.unary_unary("/svc/U").with_call(b"x", timeout=5)
            assert value == b"pong:x"
            assert dict(call.trailing_metadata())["x-trailer"] == "t1"
            assert list(ch.unary_stream("/svc/S")(b"", timeout=5)) == [
                b"m%d" % i for i in range(5)]
            with pytest.raises(grpc.RpcError) as info:
                ch.unary_unary("/svc/A")(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as info:
                ch.unary_unary("/svc/Slow")(b"", timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            seen: dict[bytes, int] = {}
            who = ch.unary_unary("/svc/W")
            for _ in range(30):
                name = who(b"", timeout=5)
                seen[name] = seen.get(name, 0) + 1
            assert set(seen) == {b"g1", b"g2", b"g3"} and min(seen.values()) >= 5, seen
            # The endpoint's Trailers-Only answer reaches the app as one HEADERS frame with
            # END_STREAM (no DATA, no separate trailers), which gRPC reads as "no message".
            c = H2Client(sc.port("g"))
            try:
                sid = c.request("POST", "/svc/A", authority="orders", body=b"\x00" * 5,
                                headers=[("content-type", "application/grpc"),
                                         ("te", "trailers")])
                c.pump(lambda: c.done(sid))
                head = dict(c.heads[sid])
                assert head[b":status"] == b"200" and head[b"grpc-status"] == b"3"
                assert sid in c.ended and sid not in c.trailers and sid not in c.bodies
            finally:
                c.close()
    finally:
        for srv, _ in servers:
            srv.stop(0)


# --- abuse ----------------------------------------------------------------------------------------
def served(env: Env) -> bool:
    """Another app still gets answers."""
    return http_get(env.sc.url("fixed", "/ok"))[0] == 200


def test_rapid_reset_is_cut_off_and_others_are_served(env: Env) -> None:
    before = env.abuse("rapid_reset")
    c = H2Client(env.sc.port("fixed"))
    try:
        for _ in range(400):  # opened and reset at once, all in one write
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                      (b":authority", b"up"), (b":path", b"/r")])
            c.conn.reset_stream(sid)
        with contextlib.suppress(OSError):
            c.flush()
        c.wait_closed()
        assert c.goaway is not None and c.goaway.error_code == ENHANCE_YOUR_CALM
    finally:
        c.close()
    assert served(env)
    wait_until(lambda: env.abuse("rapid_reset") == before + 1, what="rapid reset counted")


def test_continuation_flood_is_cut_off(env: Env) -> None:
    before = env.abuse("continuation_flood")
    block = REQUEST_BLOCK
    frames = frame(1, 0, 1, block)  # HEADERS without END_HEADERS
    filler = hpack.Encoder().encode([("x-f", "v" * 100)])
    frames += b"".join(frame(9, 0, 1, filler) for _ in range(50))
    got, closed = raw_h2(env.sc.port("fixed"), frames)
    assert closed and goaway_code(got) == ENHANCE_YOUR_CALM
    assert served(env)
    wait_until(lambda: env.abuse("continuation_flood") == before + 1, what="counted")


def test_hpack_bomb_is_cut_off(env: Env) -> None:
    before = env.abuse("hpack_bomb")
    enc = hpack.Encoder()
    # One 4000-byte field into the dynamic table, then referenced by one byte each time:
    # ~1 KiB on the wire, ~800 KiB decoded.
    block = enc.encode([(":method", "GET"), (":scheme", "http"), (":authority", "up"),
                        (":path", "/"), ("x-bomb", "b" * 4000)])
    block += b"\xbe" * 200  # indexed field 62: the newest dynamic table entry
    got, closed = raw_h2(env.sc.port("fixed"), frame(1, 0x5, 1, block))
    assert closed and goaway_code(got) == ENHANCE_YOUR_CALM
    assert served(env)
    wait_until(lambda: env.abuse("hpack_bomb") == before + 1, what="counted")


@pytest.mark.parametrize(("kind", "one"), [
    ("settings_flood", frame(4, 0, 0, b"")),
    ("ping_flood", frame(6, 0, 0, b"12345678")),
])
def test_control_frame_floods_are_cut_off(env: Env, kind: str, one: bytes) -> None:
    before = env.abuse(kind)
    got, closed = raw_h2(env.sc.port("fixed"), one * 5000)
    assert closed and goaway_code(got) == ENHANCE_YOUR_CALM
    assert served(env)
    wait_until(lambda: env.abuse(kind) == before + 1, what=f"{kind} counted")


def test_a_prefix_of_the_preface_then_http11_is_http11(env: Env) -> None:
    """`P...` that turns out not to be the preface (a PUT) is HTTP/1.1."""
    with socket.create_connection(("127.0.0.1", env.sc.port("fixed")), TIMEOUT) as s:
        s.sendall(b"P")
        time.sleep(0.05)  # a separate read: the sniffer holds the byte
        s.sendall(b"UT /p HTTP/1.1\r\nHost: up\r\nContent-Length: 2\r\n\r\nhi")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")


# --- drain ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_drain_finishes_open_streams_and_refuses_new_ones(loop: str) -> None:
    origin = Origin("d")
    with origin.server:
        cfg = {"listeners": [{"name": "fixed", "protocol": "http", "cluster": "up"}],
               "clusters": [cluster("up", origin.server.port)],
               "drain": {"accept_period": "300ms", "grace": "10s",
                         "exit_on_zero_connections": False},
               "access_log": True}
        with Sidecar(cfg, loop=loop) as sc:
            a = FrameClient(sc.port("fixed"))
            try:
                slow = a.request("/slow?s=1.5")
                wait_until(lambda: sc.metric("sidecar_inflight_requests") >= 1, what="in flight")
                status, _ = http_get(f"{sc.admin}/drain?exit=false", method="POST")
                assert status in (200, 202)
                # After accept_period: GOAWAY on the open connection, its stream finishes.
                a.pump(lambda: a.goaway is not None, within=5)
                assert a.goaway == (slow, 0)
                a.pump(lambda: slow in a.ended, within=5)
                assert a.heads[slow][b":status"] == b"200"
                assert a.bodies[slow] == b"slow-done"
                # A new connection's stream is refused, never processed.
                hits = origin.hits
                b = FrameClient(sc.port("fixed"))
                try:
                    sid = b.request("/late")
                    b.pump(lambda: sid in b.resets and b.goaway is not None, within=5)
                    assert b.resets[sid] == REFUSED_STREAM
                    assert b.goaway is not None and b.goaway[0] < sid
                finally:
                    b.close()
                assert origin.hits == hits
                # The drained connection closes once its stream is over.
                a.pump(lambda: a.eof, within=5)
            finally:
                a.close()
            # The stream's access log line, like an HTTP/1.1 request's.
            lines = [json.loads(line) for line in sc.logs().splitlines()
                     if '"access"' in line and "/slow" in line]
            assert lines and lines[0]["protocol"] == "h2" and lines[0]["status"] == 200
            assert lines[0]["cluster"] == "up" and lines[0]["listener"] == "fixed"
