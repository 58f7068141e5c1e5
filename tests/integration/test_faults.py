"""The fault matrix of docs/reliability.md: what the app sees when the network, the upstream or
the app itself misbehaves, on 127.0.0.1, under uvloop and the default loop.

A real sidecar process (tests/harness.py) in front of a scripted raw-socket upstream that
misbehaves exactly as each row says (RST before the response, RST or FIN in the middle of the
body, an upload cut halfway, an answer before the body was read, a blackhole) and records every
request it gets, plus an aiohttp upstream for the well-behaved "others" and the large bodies.
Every test asserts the promise of its row: no idempotent request lost or passed off truncated,
the app told with a clear `x-sidecar-error` otherwise, the sidecar still serving others after
the fault, and memory bounded where a fault could make it grow. Two rows need what a plain
process cannot do alone: ephemeral-port exhaustion runs in a private network namespace whose
own port range is narrowed (`unshare -n`, the machine's setting untouched), and a DNS name that
fails then returns is served by nss_wrapper (Debian's libnss-wrapper: a real getaddrinfo reading
a hosts file the test rewrites, LD_PRELOADed into the sidecar only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.sync.client import connect as ws_connect

from tests.harness import LOOPS, Sidecar, SilentListener, ThreadedServer, free_port
from tests.integration.test_proxy import (
    MIB,
    TIMEOUT,
    Client,
    Counts,
    LoopThread,
    Response,
    assert_sidecar_error,
    echo_app,
    vm_kib,
    wait_until,
)

# Debian's multiarch path, whatever the machine (scripts/check installs libnss-wrapper).
NSS_WRAPPER = next(
    (str(p) for p in sorted(Path("/usr/lib").glob("*/libnss_wrapper.so"))),
    "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so",
)


# --- the misbehaving upstream ------------------------------------------------------------------
def rst(transport: asyncio.BaseTransport) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


class _FaultConn(asyncio.Protocol):
    """One connection of `FaultUpstream`: parses heads and Content-Length bodies, and acts on the
    request's path as soon as the head is in (`on_head`) or once the body is (`on_request`)."""

    def __init__(self, up: FaultUpstream) -> None:
        self.up = up
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.body_left = 0
        self.body_seen = 0
        self.path = b""
        self.method = b""
        self.answered_early = False
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up.open.add(self)
        self.up.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.open.discard(self)
        self.dead = True

    def eof_received(self) -> bool:
        return False  # close our side too

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.dead:
            if self.body_left:
                take = min(self.body_left, len(self.buf))
                self.body_left -= take
                self.body_seen += take
                self.buf = self.buf[take:]
                self.on_body()
                if self.body_left or self.dead:
                    return
                self.finish()
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[: end + 4], self.buf[end + 4:]
            self.method, self.path = head.split(b" ", 2)[:2]
            self.up.requests.append((self.method.decode(), self.path.decode()))
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            self.body_left = int(length.group(1)) if length else 0
            self.body_seen = 0
            self.answered_early = False
            self.on_head()
            if not self.body_left and not self.dead:
                self.finish()

    def finish(self) -> None:
        if not self.answered_early:
            self.on_request()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def ok(self, body: bytes = b"ok") -> None:
        self.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def kill(self, how: str) -> None:
        assert self.transport is not None
        self.dead = True
        if how == "rst":
            rst(self.transport)
        else:
            self.transport.close()  # flushes what was written, then FIN

    def on_head(self) -> None:
        path = self.path
        if path.startswith(b"/early-413"):
            # Refuses the upload at once, then closes the way nginx does (lingering close): FIN
            # after the answer, reading and dropping the rest for a while so the answer is not
            # destroyed by a RST that unread bytes would cause.
            self.answered_early = True
            self.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n"
                       b"Connection: close\r\n\r\nbig!")
            assert self.transport is not None
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(3.0, self.kill, "fin")
        elif path.startswith(b"/early-200"):
            # Answers before reading the body, keeps the connection and then reads the body:
            # legal, and the next request on this connection must still be framed right.
            self.answered_early = True
            self.ok(b"early")
            assert self.transport is not None
            self.transport.pause_reading()  # and the body waits: the answer surely ends first
            asyncio.get_running_loop().call_later(0.3, self.transport.resume_reading)

    def on_body(self) -> None:
        if self.path.startswith(b"/upload-rst") and self.body_seen >= 64 * 1024:
            self.up.cut_uploads += 1
            self.kill("rst")

    def on_request(self) -> None:
        path = self.path
        key = path.partition(b"?")[2]
        if path.startswith(b"/rst-before"):
            # The first request with this key is reset before any response byte.
            if key not in self.up.keys_seen:
                self.up.keys_seen.add(key)
                self.kill("rst")
                return
            self.ok()
        elif path.startswith(b"/mid-"):
            # /mid-<rst|fin>-<cl|chunked|close>: a 200 head and part of the body, then the cut.
            how, framing = path[len(b"/mid-"):].split(b"?")[0].decode().split("-")
            part = b"p" * 50_000
            if framing == "cl":
                self.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + part)
            elif framing == "chunked":
                self.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"%x\r\n%s\r\n" % (len(part), part))
            else:  # close-delimited: only a RST can tell its end from a cut
                self.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + part)
            asyncio.get_running_loop().call_later(0.05, self.kill, how)
        elif path.startswith(b"/hold"):
            self.up.held.append(self)
        else:
            self.ok()

    def release(self) -> None:
        if not self.dead:
            self.ok(b"held")


@dataclass
class FaultUpstream:
    """A scripted HTTP/1.1 upstream on the test's loop thread (see `_FaultConn`)."""

    lt: LoopThread
    host: str = "127.0.0.1"
    want_port: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    keys_seen: set[bytes] = field(default_factory=set)
    open: set[_FaultConn] = field(default_factory=set)
    held: list[_FaultConn] = field(default_factory=list)
    accepted: int = 0
    cut_uploads: int = 0

    def __post_init__(self) -> None:
        async def start() -> asyncio.AbstractServer:
            return await asyncio.get_running_loop().create_server(
                lambda: _FaultConn(self), self.host, self.want_port or free_port())

        self.server = self.lt.run(start())
        self.port = self.server.sockets[0].getsockname()[1]

    def seen(self, path_prefix: str) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[1].startswith(path_prefix)]

    def release_held(self) -> None:
        def release() -> None:
            while self.held:
                self.held.pop(0).release()

        self.lt.loop.call_soon_threadsafe(release)

    def stop(self) -> None:
        async def stop() -> None:
            self.server.close()
            for conn in list(self.open):
                if conn.transport is not None:
                    conn.transport.abort()
            await self.server.wait_closed()

        self.lt.run(stop())


# A blackhole upstream: accepts and never answers (tests/harness.py).
Blackhole = SilentListener


@dataclass
class World:
    sc: Sidecar
    faults: FaultUpstream
    hole: Blackhole
    aio: int
    counts: Counts


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FaultUpstream, Blackhole, int, Counts]]:
    counts = Counts()
    lt = LoopThread()
    faults = FaultUpstream(lt)
    hole = Blackhole()
    try:
        with ThreadedServer(echo_app(counts)) as aio:
            yield faults, hole, aio.port, counts
    finally:
        faults.stop()
        hole.close()
        lt.stop()


def config(faults: int, hole: int, aio: int) -> dict[str, Any]:
    def static(name: str, port: int, **extra: Any) -> dict[str, Any]:
        return {"name": name, "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{port}"]},
                **extra}

    clusters = [
        static("good", aio),
        # Every test here fails this cluster on purpose: no breaker or ejection in the way.
        static("faults", faults, circuit_breaker={"minimum_requests": 1_000_000},
               outlier_detection={"consecutive_failures": 1_000_000}),
        static("hole", hole, retry={"attempts": 1}),
        static("slow", aio),
        static("tunnels", aio, circuit_breaker={"max_concurrent_requests": 3}),
    ]
    routes = [{"match": {"host": c["name"]}, "cluster": c["name"]} for c in clusters]
    return {
        "listeners": [
            {"name": "egress", "protocol": "http", "routes": routes,
             "limits": {"header_timeout": "1s"}},
            # A small app-connection limit, to burst past.
            {"name": "narrow", "protocol": "http", "cluster": "slow",
             "limits": {"max_connections": 20}},
            {"name": "tunnels", "protocol": "http", "cluster": "tunnels"},
            {"name": "forward", "protocol": "http",
             "forward_proxy": {"enabled": True, "allowed_hosts": ["127.0.0.1"],
                               "connect": True}},
        ],
        "clusters": clusters,
        "drain": {"grace": "2s", "accept_period": "0s", "linger": "0s"},
    }


@pytest.fixture(scope="module", params=LOOPS)
def w(request: pytest.FixtureRequest,
          upstreams: tuple[FaultUpstream, Blackhole, int, Counts]) -> Iterator[World]:
    faults, hole, aio, counts = upstreams
    raise_nofile(12000)  # before the sidecar starts: it inherits the limit
    with Sidecar(config(faults.port, hole.port, aio), loop=request.param) as sc:
        yield World(sc, faults, hole, aio, counts)


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def request(port: int, path: str, host: str, method: str = "GET", body: bytes = b"",
            extra: bytes = b"") -> Response:
    with Client(port) as c:
        c.send(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra
               + (b"Content-Length: %d\r\n" % len(body) if body or method == "POST" else b"")
               + b"\r\n" + body)
        return c.response(method.encode())


def assert_serving(w: World) -> None:
    """The sidecar still serves a good cluster, on a new app connection."""
    r = request(w.sc.port("egress"), "/echo?others", "good")
    assert r.status == 200 and r.json()["path"] == "/echo?others"


# --- upstream faults ---------------------------------------------------------------------------
def test_rst_before_the_response_is_retried_for_idempotent_requests(w: World) -> None:
    """No byte of the response reached the app: GET, HEAD, PUT, DELETE and keyed POSTs go again,
    invisibly; an unkeyed POST is not replayed (the upstream may have acted on it) and gets
    502 upstream_reset."""
    port = w.sc.port("egress")
    for i, (method, extra) in enumerate([("GET", b""), ("PUT", b""), ("DELETE", b""),
                                         ("POST", b"Idempotency-Key: k\r\n")]):
        key = f"{w.sc.pid}-{i}"
        r = request(port, f"/rst-before?{key}", "faults", method, b"x" * 10, extra)
        assert (r.status, r.body) == (200, b"ok"), (method, r.status, r.body)
        assert len(w.faults.seen(f"/rst-before?{key}")) == 2, method
    key = f"{w.sc.pid}-post"
    r = request(port, f"/rst-before?{key}", "faults", "POST", b"order")
    assert_sidecar_error(r, 502, "upstream_reset", "faults")
    assert len(w.faults.seen(f"/rst-before?{key}")) == 1
    assert_serving(w)


@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("framing", ["cl", "chunked", "close"])
def test_a_cut_in_the_middle_of_the_body_is_never_passed_off_as_complete(
    w: World, how: str, framing: str
) -> None:
    """The 200 head and part of the body reached the app, then the upstream reset or closed:
    too late for a retry or an error status, so the sidecar cuts the app's connection and the
    app's HTTP client sees a truncated message (an error), never a short body that looks whole.
    A close-delimited upstream body reaches an HTTP/1.1 app chunked: the cut must not be
    followed by the last chunk."""
    path = f"/mid-{how}-{framing}"
    before = len(w.faults.seen(path))
    with Client(w.sc.port("egress")) as c:
        c.send(f"GET {path} HTTP/1.1\r\nHost: faults\r\n\r\n".encode())
        if how == "fin" and framing == "close":
            # A FIN is how a close-delimited body ends: this one is complete, by definition.
            r = c.response()
            assert r.status == 200 and r.body == b"p" * 50_000
        else:
            with pytest.raises((EOFError, ConnectionResetError)):
                c.response()
    assert len(w.faults.seen(path)) == before + 1  # never retried once bytes reached the app
    if not (how == "fin" and framing == "close"):
        with pytest.raises(requests.RequestException):  # a real client says so too
            requests.get(w.sc.url("egress", path), headers={"Host": "faults"}, timeout=TIMEOUT)
    assert_serving(w)


def test_a_cut_close_delimited_body_to_an_http10_app_ends_with_a_reset(w: World) -> None:
    """An HTTP/1.0 app reads a close-delimited body to EOF: a FIN from the sidecar after the
    upstream's RST would make the short body look complete. The sidecar resets instead."""
    with Client(w.sc.port("egress")) as c:
        c.send(b"GET /mid-rst-close HTTP/1.0\r\nHost: faults\r\n\r\n")
        head = c.head()
        assert head.status == 200 and head.header("content-length") is None
        with pytest.raises(ConnectionResetError):
            c.read_to_eof()
    assert_serving(w)


def test_a_blackhole_upstream_is_504_and_its_connections_are_closed(w: World) -> None:
    """An upstream that accepts and never answers: the request's deadline gives 504
    upstream_timeout (a connection that never answered is not reused: it is closed), and the
    sidecar serves others meanwhile."""
    port = w.sc.port("egress")
    results: list[Response] = []

    def call() -> None:
        results.append(request(port, "/never", "hole", extra=b"x-sidecar-timeout-ms: 1500\r\n"))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    assert_serving(w)  # while five requests hang on the blackhole
    for t in threads:
        t.join(TIMEOUT)
    assert len(results) == 5
    for r in results:
        assert_sidecar_error(r, 504, "upstream_timeout", "hole")
    wait_until(lambda: w.hole.still_open() == 0)
    assert_serving(w)


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_an_upstream_closing_in_the_middle_of_an_upload(w: World, method: str) -> None:
    """The upstream resets after 64 KiB of a 4 MiB upload: the app gets 502 upstream_reset
    (no response byte had reached it), and a body too large to replay (over
    retry.max_body_bytes) is not sent again, whatever the method."""
    port = w.sc.port("egress")
    body = b"u" * (4 * MIB)
    before = w.faults.cut_uploads
    path = f"/upload-rst?{method}-{w.sc.pid}"
    with Client(port) as c:
        c.send(f"{method} {path} HTTP/1.1\r\nHost: faults\r\n"
               f"Content-Length: {len(body)}\r\n\r\n".encode())

        def upload() -> None:
            with contextlib.suppress(OSError):
                c.sock.sendall(body)

        sender = threading.Thread(target=upload)
        sender.start()
        r = c.response()
        sender.join(TIMEOUT)
    assert_sidecar_error(r, 502, "upstream_reset", "faults")
    assert w.faults.cut_uploads == before + 1
    assert len(w.faults.seen(path)) == 1
    assert_serving(w)


def test_an_upstream_refusing_an_upload_before_reading_it(w: World) -> None:
    """413 and a lingering close before the 4 MiB body was read: the app gets the 413 intact."""
    body = b"b" * (4 * MIB)
    with Client(w.sc.port("egress")) as c:
        c.send(b"POST /early-413 HTTP/1.1\r\nHost: faults\r\nContent-Length: %d\r\n\r\n"
               % len(body))

        def upload() -> None:
            with contextlib.suppress(OSError):
                c.sock.sendall(body)

        sender = threading.Thread(target=upload)
        sender.start()
        r = c.response()
        sender.join(TIMEOUT)
    assert (r.status, r.body) == (413, b"big!")
    assert_serving(w)


def test_an_upstream_answering_before_reading_the_body_keeps_the_framing(w: World) -> None:
    """A 200 before the body was read, then the upstream reads the body: the app gets the 200,
    and the next requests on the same app connection (and whatever connection the pool hands
    out) are answered by their own responses. The sidecar may end the app's connection after
    such an answer (the rest of the upload is not worth reading), but then it says so with
    `Connection: close`, so the app's client never sends another request into a closing
    socket."""
    body = b"e" * (8 * MIB)
    with Client(w.sc.port("egress")) as c:
        c.send(b"POST /early-200 HTTP/1.1\r\nHost: faults\r\nContent-Length: %d\r\n\r\n"
               % len(body))
        sender = threading.Thread(target=c.sock.sendall, args=(body,))
        sender.start()
        r = c.response()
        sender.join(TIMEOUT)
        assert (r.status, r.body) == (200, b"early")
        closing = r.header("connection") == "close"
        for i in range(3):
            if closing:
                assert c.closed_by_peer()
                break
            c.send(b"GET /after-early?%d HTTP/1.1\r\nHost: faults\r\n\r\n" % i)
            assert c.response().body == b"ok"
    for i in range(3):  # through the pool: one of them may be the early answer's connection
        assert request(w.sc.port("egress"), f"/after-early?p{i}", "faults").body == b"ok"
    heads = [p for _, p in w.faults.requests if not p.startswith(("/early", "/after-early"))]
    assert not any("eeee" in p for p in heads)  # no body byte ever read as a request head
    assert_serving(w)


# --- tunnels ----------------------------------------------------------------------------------
def test_finished_websockets_give_their_breaker_slot_back(w: World) -> None:
    """Found by bench/soak.py: a tunnel (Upgrade or CONNECT) never told the breaker its request
    was over, so each one held a `max_concurrent_requests` slot for good, and once as many
    tunnels had come and gone the cluster answered every request 503 circuit_open. Here the
    cap is 3: ten WebSocket sessions one after another must all open."""
    for i in range(10):
        with ws_connect(f"ws://127.0.0.1:{w.sc.port('tunnels')}/ws", open_timeout=TIMEOUT,
                        close_timeout=2) as ws:
            assert ws.recv(timeout=TIMEOUT) == "hello", i
    r = request(w.sc.port("tunnels"), "/echo?after-ws", "x")
    assert r.status == 200 and r.json()["path"] == "/echo?after-ws"


def test_finished_connect_tunnels_give_their_breaker_slot_back(w: World) -> None:
    """The same for CONNECT through the forward proxy, whose dynamic clusters have the default
    cap of 1000: 1,050 tunnels one after another, then a request, all served."""
    port = w.sc.port("forward")
    for i in range(1050):
        with Client(port) as c:
            c.send(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                   % (w.aio, w.aio))
            line = c.line()
            assert line == b"HTTP/1.1 200 Connection Established", (i, line, c.buf)
    r = request(port, f"http://127.0.0.1:{w.aio}/echo?after-connect", "x")
    assert r.status == 200 and r.json()["path"] == "/echo?after-connect"


# --- the app misbehaves ------------------------------------------------------------------------
def test_slowloris_heads_get_408_while_others_are_served(w: World) -> None:
    """Fifty app connections trickle a head a few bytes at a time (header_timeout 1s): each
    gets 408 header_timeout and is closed; a good request meanwhile is served at once."""
    port = w.sc.port("egress")
    slow = [Client(port) for _ in range(50)]
    try:
        for c in slow:
            c.send(b"GET /echo HTTP/1.1\r\nHost: good\r\n")
        for _ in range(4):  # 0.8 s of trickling, then silence (no RST racing the 408)
            for c in slow:
                c.send(b"X")
            assert_serving(w)
            time.sleep(0.2)
        for c in slow:
            r = c.response()
            assert r.status == 408 and r.header("x-sidecar-error") == "header_timeout"
            assert c.closed_by_peer()
    finally:
        for c in slow:
            c.close()
    assert_serving(w)


def test_a_stalled_reader_of_a_large_response_holds_memory_bounded(w: World) -> None:
    """The app asks for 64 MiB and stops reading: the sidecar stops reading the upstream
    (backpressure) instead of buffering the body, serves others meanwhile, and lets the
    upstream connection go when the app gives up."""
    base = vm_kib(w.sc.pid, "VmRSS")
    peak = base
    with Client(w.sc.port("egress"), rcvbuf=64 * 1024) as c:
        c.send(b"GET /big?n=%d HTTP/1.1\r\nHost: good\r\n\r\n" % (64 * MIB))
        assert c.head().status == 200
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # the app reads nothing
            peak = max(peak, vm_kib(w.sc.pid, "VmRSS"))
            assert_serving(w)
            time.sleep(0.1)
    # The kernel holds a few MiB in the socket buffers; without backpressure the sidecar would
    # hold most of the 64 MiB.
    assert peak - base < 16 * 1024, f"sidecar RSS grew by {peak - base} KiB"
    wait_until(lambda: all(ep["active"] == 0 for ep in w.sc.clusters()["good"]["endpoints"]))
    assert_serving(w)


def test_5000_idle_keepalive_connections(w: World) -> None:
    """5,000 app connections, each after one request, idle: all kept (idle_timeout 5m), memory
    per connection small, others served; closed by the app, all of them are let go."""
    n = 5000
    port = w.sc.port("egress")
    gauge = {"listener": "egress"}
    before = w.sc.metric("sidecar_downstream_connections", **gauge)
    base = vm_kib(w.sc.pid, "VmRSS")
    conns: list[Client] = []
    try:
        for _ in range(n // 250):  # in waves: within the upstream pool's max_pending
            wave = [Client(port) for _ in range(250)]
            conns += wave
            for c in wave:
                c.send(b"GET /echo HTTP/1.1\r\nHost: good\r\n\r\n")
            for c in wave:
                assert c.response().status == 200
        wait_until(lambda: w.sc.metric("sidecar_downstream_connections", **gauge)
                   >= before + n)
        grown = vm_kib(w.sc.pid, "VmRSS") - base
        assert_serving(w)
        # Measured here: under 4 KiB per idle connection (pure Python, both loops); the bound
        # leaves five times that.
        assert grown < n * 20, f"{n} idle connections cost {grown} KiB"
        for c in conns[:3]:  # the first ones are still usable
            c.send(b"GET /echo?again HTTP/1.1\r\nHost: good\r\n\r\n")
            assert c.response().json()["path"] == "/echo?again"
    finally:
        for c in conns:
            c.close()
    wait_until(lambda: w.sc.metric("sidecar_downstream_connections", **gauge) <= before)
    assert_serving(w)


def test_a_burst_past_max_connections_waits_in_the_backlog(w: World) -> None:
    """100 app connections at once on a listener limited to 20: the ones past the limit wait
    in the kernel's backlog and are served in turn, none refused or reset, and the sidecar
    never holds more than 20."""
    port = w.sc.port("narrow")
    results: list[Response | BaseException] = []
    peak = 0.0

    def call(i: int) -> None:
        try:
            results.append(request(port, f"/slow?s=0.3&i={i}", "x"))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        peak = max(peak, w.sc.metric("sidecar_downstream_connections", listener="narrow"))
        time.sleep(0.05)
    for t in threads:
        t.join(TIMEOUT)
    assert len(results) == 100
    bad = [r for r in results if not isinstance(r, Response) or (r.status, r.body)
           != (200, b"late")]
    assert bad == []
    assert 0 < peak <= 20
    assert_serving(w)


# --- the process's own limits ----------------------------------------------------------------
def _local_resources_code_exists() -> bool:
    import sidecar.errors

    return any(getattr(c, "code", None) == "local_resources_exhausted"
               for c in vars(sidecar.errors).values() if isinstance(c, type))


class BoundClient(Client):
    """A `Client` whose local port is picked by the test, below the ephemeral range: the app's
    own connections must not use up the 20 ports the scenario leaves to the sidecar."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        try:
            self.sock.settimeout(TIMEOUT)
            self.sock.bind(("127.0.0.1", free_port()))
            self.sock.connect(("127.0.0.1", port))
        except OSError:
            self.sock.close()
            raise
        self.buf = b""


def bound_request(port: int, path: str, host: str) -> Response:
    with BoundClient(port) as c:
        c.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return c.response()


def ports_scenario(loop: str) -> dict[str, Any]:
    """Run inside a private network namespace whose ephemeral range has 20 ports: 25 requests
    held by the upstream at once need 25 connections to one destination; the last ones find
    no local port (EADDRNOTAVAIL). Returns what the app saw, as JSON-able data."""
    lt = LoopThread()
    faults = FaultUpstream(lt)
    counts = Counts()
    out: dict[str, Any] = {}
    try:
        with ThreadedServer(echo_app(counts)) as aio, Sidecar({
            "listeners": [{"name": "egress", "protocol": "http", "routes": [
                {"match": {"host": "ports"}, "cluster": "ports"},
                {"match": {"host": "good"}, "cluster": "good"}]}],
            "clusters": [
                {"name": "ports", "discovery": {"type": "static",
                                                "endpoints": [f"127.0.0.1:{faults.port}"]},
                 "circuit_breaker": {"minimum_requests": 5, "failure_rate_threshold": 0.2}},
                {"name": "good", "discovery": {"type": "static",
                                               "endpoints": [f"127.0.0.1:{aio.port}"]}}],
            "drain": {"grace": "1s", "accept_period": "0s", "linger": "0s"},
        }, loop=loop) as sc:
            port = sc.port("egress")
            held: list[Response | str] = []

            def hold(i: int) -> None:
                try:
                    held.append(bound_request(port, f"/hold?{i}", "ports"))
                except Exception as exc:
                    held.append(repr(exc))

            threads = [threading.Thread(target=hold, args=(i,)) for i in range(25)]
            for t in threads:
                t.start()
            wait_until(lambda: len(faults.held) + len(held) >= 25)
            refused = [r for r in held if isinstance(r, Response)]
            out["refused"] = [(r.status, r.header("x-sidecar-error")) for r in refused]
            out["held"] = len(faults.held)
            out["others"] = bound_request(port, "/echo", "good").status
            out["breaker_during"] = sc.clusters()["ports"]["breaker"]
            faults.release_held()
            for t in threads:
                t.join(TIMEOUT)
            out["released"] = sorted({r.body.decode() if isinstance(r, Response) else r
                                      for r in held[len(refused):]})
            out["after"] = [bound_request(port, f"/after?{i}", "ports").status for i in range(5)]
            out["breaker_after"] = sc.clusters()["ports"]["breaker"]
    finally:
        faults.stop()
        lt.stop()
    return out


@pytest.mark.xfail(not _local_resources_code_exists(), strict=True,
                   reason="issue 13 bug 1 (branch r13bugs): EADDRNOTAVAIL is not yet answered "
                          "503 local_resources_exhausted, and counts against the breaker")
@pytest.mark.parametrize("loop", LOOPS)
def test_ephemeral_port_exhaustion_is_local_resources_exhausted(loop: str) -> None:
    """The sidecar has no setting that binds upstream sockets to a port range, and the
    machine's range is not ours to change: the scenario runs in a private network namespace
    (unshare -n, as root) whose own ip_local_port_range is narrowed to 20 ports. Connections
    past it fail with EADDRNOTAVAIL: SPEC section 5 answers 503 local_resources_exhausted,
    trips no breaker, keeps other destinations served, and service resumes when ports free."""
    for tool in ("unshare", "ip"):
        assert shutil.which(tool), f"{tool} is needed (util-linux, iproute2)"
    script = ("ip link set lo up && echo '41000 41019' > /proc/sys/net/ipv4/ip_local_port_range"
              f" && exec {sys.executable} -m tests.integration.test_faults ports {loop}")
    done = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True,
                          timeout=90, check=False, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["held"] <= 20 and out["refused"], out
    assert {tuple(r) for r in out["refused"]} == {(503, "local_resources_exhausted")}, out
    assert out["others"] == 200
    assert out["breaker_during"] == "closed" and out["breaker_after"] == "closed", out
    assert out["released"] == ["held"] and out["after"] == [200] * 5, out


def write_hosts(path: Path, lines: list[str]) -> None:
    """nss_wrapper reloads its hosts file when it changes; a new inode makes sure it sees it.
    It has no comments: a line it cannot parse makes every lookup fail differently."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_dns_name_failing_then_returning(loop: str, tmp_path: Path) -> None:
    """A DNS cluster whose name stops resolving keeps its last endpoints (requests go on), and
    follows the name when it returns with a new address. A forward-proxy destination whose
    name does not resolve is 502 connect_failed, and is served once it resolves again.
    Resolution is real getaddrinfo through nss_wrapper's hosts file, in the sidecar only."""
    assert os.path.exists(NSS_WRAPPER), "libnss-wrapper is needed (apt-get install libnss-wrapper)"
    hosts = tmp_path / "hosts"
    filler = "127.0.0.9 unrelated.faults.test"  # the file never becomes empty
    write_hosts(hosts, ["127.0.0.1 up.faults.test", filler])
    lt = LoopThread()
    a = FaultUpstream(lt)
    b = FaultUpstream(lt, host="127.0.0.2", want_port=a.port)
    env = {"LD_PRELOAD": NSS_WRAPPER, "NSS_WRAPPER_HOSTS": str(hosts)}
    try:
        with Sidecar({
            "listeners": [{"name": "egress", "protocol": "http",
                           "routes": [{"match": {"host": "named"}, "cluster": "named"}],
                           "forward_proxy": {"enabled": True,
                                             "allowed_hosts": ["*.faults.test"]}}],
            "clusters": [{"name": "named", "discovery": {
                "type": "dns", "host": "up.faults.test", "port": a.port, "refresh": "200ms"}}],
            "drain": {"grace": "1s", "accept_period": "0s", "linger": "0s"},
        }, loop=loop, env=env) as sc:
            port = sc.port("egress")
            assert request(port, "/one", "named").body == b"ok"
            assert a.seen("/one")
            def errors() -> float:
                return sc.metric("sidecar_discovery_errors_total", cluster="named")

            before = errors()
            write_hosts(hosts, [filler])
            wait_until(lambda: errors() > before)
            for i in range(3):  # the name is gone: the last endpoints serve
                assert request(port, f"/gone?{i}", "named").body == b"ok"
            assert len(a.seen("/gone")) == 3
            fwd = f"http://fwd.faults.test:{a.port}/fwd"
            r = request(port, fwd, "fwd.faults.test")
            assert_sidecar_error(r, 502, "connect_failed", f"fwd.faults.test:{a.port}")
            write_hosts(hosts, ["127.0.0.2 up.faults.test", "127.0.0.1 fwd.faults.test",
                                filler])
            wait_until(lambda: request(port, "/back", "named").body == b"ok"
                       and bool(b.seen("/back")))
            wait_until(lambda: request(port, fwd, "fwd.faults.test").status == 200)
            assert a.seen("/fwd")
    finally:
        a.stop()
        b.stop()
        lt.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_the_kubernetes_api_dropping_the_watch(loop: str, tmp_path: Path) -> None:
    """The sidecar itself, discovering through a fake API server (tests/k8s): while the watch
    is dropped and the API server unreachable, the last endpoints keep serving; a change made
    meanwhile (the endpoint replaced by another) is followed once the API server is back."""
    from tests.integration.test_lifecycle import ThreadedApiServer
    from tests.k8s.fake_apiserver import endpoint, endpoint_slice

    api = ThreadedApiServer(tmp_path / "apiserver")
    lt = LoopThread()
    a = FaultUpstream(lt)
    b = FaultUpstream(lt, host="127.0.0.2", want_port=a.port)

    def on_api(fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(call(), api._loop).result(TIMEOUT)

    def put(ip: str) -> None:
        on_api(lambda: api.server.put_slice("default", endpoint_slice(
            "pay-1", "pay", [endpoint(ip)], ports=[("http", a.port)])))

    try:
        put("127.0.0.1")
        kubeconfig = api.server.write_kubeconfig()
        with Sidecar({
            "listeners": [{"name": "egress", "protocol": "http", "cluster": "pay"}],
            "clusters": [{"name": "pay", "discovery": {
                "type": "kubernetes", "service": "pay", "namespace": "default", "port": "http"}}],
            "drain": {"grace": "1s", "accept_period": "0s", "linger": "0s"},
        }, loop=loop, env={"KUBECONFIG": str(kubeconfig)}) as sc:
            port = sc.port("egress")
            wait_until(lambda: request(port, "/first", "pay").body == b"ok")
            on_api(api.server.drop_watches)
            on_api(api.server.go_down)
            put("127.0.0.2")  # made while nobody can see it
            for i in range(5):
                assert request(port, f"/down?{i}", "pay").body == b"ok"
            assert len(a.seen("/down")) == 5
            on_api(api.server.come_back)
            wait_until(lambda: request(port, "/back", "pay").body == b"ok"
                       and bool(b.seen("/back")))
            before = len(a.requests)
            for i in range(3):
                assert request(port, f"/after?{i}", "pay").body == b"ok"
            assert len(a.requests) == before and len(b.seen("/after")) == 3
    finally:
        a.stop()
        b.stop()
        lt.stop()
        api.stop()


if __name__ == "__main__":
    # `python -m tests.integration.test_faults ports LOOP`: the port-exhaustion scenario, run by
    # its test inside a private network namespace; prints one JSON line.
    if sys.argv[1:2] == ["ports"]:
        print(json.dumps(ports_scenario(sys.argv[2])))
