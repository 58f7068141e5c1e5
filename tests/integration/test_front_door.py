"""Issue 18, the request front door: what an adversarial probe sent, and what reached the origin.

A real sidecar process (both loops) in front of a recording origin: a raw-socket HTTP/1.1
server on 127.0.0.1 (and one on [::1]) that keeps every byte each connection received, reads
requests by the RFC 9112 framing (Content-Length, chunked with trailers), and answers either
after the whole request (like an application) or at the head, discarding the body after it
(like nginx's `return`). nginx from apt for the pooled-connection poisoning case. Raw sockets
as the app, plus curl for `--http2` on an http:// URL. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import LOOPS, Sidecar, nginx
from tests.integration.test_proxy import TIMEOUT, Client, LoopThread, wait_until

CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus" / "request"


# --- the recording origin ------------------------------------------------------------------------
@dataclass
class Received:
    """One request as the origin read it."""

    conn: int  # which origin connection (index into RecordingOrigin.conns)
    head: bytes
    body: bytes
    trailers: bytes  # the raw trailer section of a chunked body (b"" when none)

    @property
    def path(self) -> bytes:
        return self.head.split(b" ", 2)[1]

    def names(self) -> list[bytes]:
        return [line.split(b":", 1)[0].lower() for line in self.head.split(b"\r\n")[1:] if line]


class _Bad(Exception):
    pass


def _take(buf: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """(head, body, trailers, rest) of the first complete request in `buf`, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head, at = buf[: end + 4], end + 4
    length = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
    if re.search(rb"(?im)^transfer-encoding:[ \t]*chunked", head):
        body = b""
        while True:
            eol = buf.find(b"\r\n", at)
            if eol < 0:
                return None
            size_text = buf[at:eol].split(b";")[0].strip()
            if not re.fullmatch(rb"[0-9a-fA-F]+", size_text):
                raise _Bad(size_text)
            size = int(size_text, 16)
            at = eol + 2
            if size == 0:
                stop = buf.find(b"\r\n", at)
                trailers_end = at if stop == at else buf.find(b"\r\n\r\n", at)
                if stop < 0 or trailers_end < 0:
                    return None
                trailers = buf[at:trailers_end]
                after = trailers_end + (2 if trailers_end == at else 4)
                return head, body, trailers, buf[after:]
            if len(buf) < at + size + 2:
                return None
            body += buf[at : at + size]
            at += size + 2
    need = int(length.group(1)) if length else 0
    if len(buf) < at + need:
        return None
    return head, buf[at : at + need], b"", buf[at + need :]


class _OriginConn(asyncio.Protocol):
    def __init__(self, origin: RecordingOrigin) -> None:
        self.origin = origin
        self.index = len(origin.conns)
        origin.conns.append(self)
        self.raw = bytearray()
        self.buf = b""
        self.closed = False
        self.answered_head = False  # the current request was answered at its head
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.origin.transports.add(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.origin.transports.discard(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.raw += data
        self.origin.log += data
        self.buf += data
        while self.buf:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0 and not self.answered_head and self.buf.split(b" ", 2)[1:2] and (
                self.buf.split(b" ", 2)[1].startswith(b"/early")
            ):
                # Answer at the head, then read (discard) the body by its framing: nginx's
                # `return`, and any origin that refuses a request before reading its body.
                self.answered_head = True
                self._answer(self.buf.split(b" ", 2)[1], b"")
            try:
                taken = _take(self.buf)
            except _Bad:
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()
                return
            if taken is None:
                return
            head, body, trailers, self.buf = taken
            self.origin.requests.append(Received(self.index, head, body, trailers))
            if self.answered_head:
                self.answered_head = False
            else:
                self._answer(head.split(b" ", 2)[1], body)

    def _answer(self, path: bytes, body: bytes) -> None:
        t = self.transport
        assert t is not None
        if path.startswith(b"/sleep"):
            ms = int(path.rsplit(b"=", 1)[1])
            asyncio.get_running_loop().call_later(
                ms / 1000, t.write, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nslept")
        elif path == b"/decline-close":
            t.write(b"HTTP/1.1 200 OK\r\n\r\nclose-delimited")
            t.close()
        else:
            out = b"ok %s %d" % (path, len(body))
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out))


class RecordingOrigin:
    """Records every connection's raw bytes and every request it read; see `_OriginConn`."""

    def __init__(self, lt: LoopThread, host: str = "127.0.0.1") -> None:
        self.lt = lt
        self.conns: list[_OriginConn] = []
        self.requests: list[Received] = []
        self.log = bytearray()  # every byte received, all connections, in arrival order
        self.transports: set[asyncio.Transport] = set()

        async def start() -> asyncio.AbstractServer:
            return await asyncio.get_running_loop().create_server(
                lambda: _OriginConn(self), host, 0)

        self.server = lt.run(start())
        self.port = self.server.sockets[0].getsockname()[1]

    def mark(self) -> tuple[int, int]:
        return len(self.log), len(self.requests)

    def since(self, mark: tuple[int, int]) -> list[Received]:
        return self.requests[mark[1]:]

    def raw_since(self, mark: tuple[int, int]) -> bytes:
        return bytes(self.log[mark[0]:])

    def stop(self) -> None:
        async def stop() -> None:
            self.server.close()
            for t in list(self.transports):
                t.abort()
            await self.server.wait_closed()

        self.lt.run(stop())


NGINX_CONF = """
server {
  listen 127.0.0.1:{port};
  keepalive_timeout 30s;
  location / { return 200 "nginx $request_method $uri $content_length\\n"; }
}
"""


@dataclass
class Origins:
    rec: RecordingOrigin
    rec6: RecordingOrigin | None  # None where the host has no IPv6 loopback
    nginx: int


@pytest.fixture(scope="module")
def origins() -> Iterator[Origins]:
    lt = LoopThread()
    rec = RecordingOrigin(lt)
    try:
        rec6: RecordingOrigin | None = RecordingOrigin(lt, "::1")
    except OSError:
        rec6 = None
    try:
        with nginx(NGINX_CONF) as nginx_port:
            yield Origins(rec, rec6, nginx_port)
    finally:
        rec.stop()
        if rec6 is not None:
            rec6.stop()
        lt.stop()


def config(o: Origins) -> dict[str, Any]:
    def static(name: str, port: int, **extra: Any) -> dict[str, Any]:
        return {"name": name, "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{port}"]},
                "retry": {"attempts": 1}, "timeouts": {"request": "3s"}, **extra}

    clusters = [
        static("rec", o.rec.port),
        # One upstream connection: two app connections' requests must share it.
        static("one", o.rec.port, pool={"max_connections": 1, "max_idle": 1}),
        # No idle connections: every request waits for a new one.
        static("fresh", o.rec.port, pool={"max_idle": 0}),
        static("nginx", o.nginx, pool={"max_connections": 1, "max_idle": 1}),
    ]
    routes = [{"match": {"host": c["name"]}, "cluster": c["name"]} for c in clusters]
    return {
        "listeners": [
            {"name": "egress", "protocol": "http", "routes": routes,
             "forward_proxy": {"enabled": True, "allowed_hosts": ["::1"], "connect": False}},
            {"name": "strict", "protocol": "http", "cluster": "rec",
             "limits": {"max_headers": 10}},
        ],
        "clusters": clusters,
        "drain": {"grace": "2s", "accept_period": "0s", "linger": "0s"},
    }


@pytest.fixture(scope="module", params=LOOPS)
def sc(request: pytest.FixtureRequest, origins: Origins) -> Iterator[Sidecar]:
    with Sidecar(config(origins), loop=request.param) as sidecar:
        yield sidecar


# The probe's raw requests as an app sent them. Each is also a seed of the request fuzzer's
# corpus, checked in as tests/fuzz/corpus/request/h18-<name>.bin
# (`python -m tests.integration.test_front_door` writes them).
UPGRADE_CL = (b"POST /x HTTP/1.1\r\nHost: rec\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
              b"Content-Length: 63\r\n\r\n" + b"b" * 63)
UPGRADE_CHUNKED = (b"POST /x HTTP/1.1\r\nHost: rec\r\nConnection: Upgrade\r\n"
                   b"Upgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
TRAILERS = (b"POST /tr HTTP/1.1\r\nHost: fresh\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n")
REFUSED = {
    "cl-over-int64": (400, b"POST /big HTTP/1.1\r\nHost: rec\r\n"
                           b"Content-Length: 18446744073709551615\r\n\r\nabc"),
    "cl-int64-plus-one": (400, b"POST /big HTTP/1.1\r\nHost: rec\r\n"
                               b"Content-Length: 9223372036854775808\r\n\r\nabc"),
    "empty-host": (400, b"GET /e HTTP/1.1\r\nHost: \r\n\r\n"),
    "host-superscript-port": (400, b"GET /p HTTP/1.1\r\nHost: rec:\xb2\r\n\r\n"),
    "201-fields": (431, b"GET /many HTTP/1.1\r\nHost: rec\r\n"
                        + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n"),
    "10000-tiny-fields": (431, b"GET /many HTTP/1.1\r\nHost: rec\r\n"
                               + b"a: \r\n" * 10000 + b"\r\n"),
}
H2C = (b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
       b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n")
SEEDS: dict[str, bytes] = {
    "upgrade-cl-body": UPGRADE_CL,
    "upgrade-chunked-body": UPGRADE_CHUNKED,
    "upgrade-cl-body-early": UPGRADE_CL.replace(b"/x", b"/early-a").replace(b"Host: rec",
                                                                            b"Host: one"),
    "upgrade-h2c-get": b"GET /h2c HTTP/1.1\r\nHost: rec\r\n" + H2C + b"\r\n",
    "upgrade-h2c-post-body": (b"POST /h2c HTTP/1.1\r\nHost: rec\r\n" + H2C
                              + b"Content-Length: 5\r\n\r\nxxxxx"),
    "upgrade-http10": b"GET /ten HTTP/1.0\r\nHost: rec\r\nConnection: Upgrade, keep-alive\r\n"
                      b"Upgrade: websocket\r\n\r\n",
    "chunked-trailer": TRAILERS,
    "timeout-underscore": b"GET /sleep?ms=300 HTTP/1.1\r\nHost: rec\r\n"
                          b"x-sidecar-timeout-ms: 1_0\r\n\r\n",
    "underscore-te": b"POST /u HTTP/1.1\r\nHost: rec\r\nContent-Length: 5\r\n"
                     b"Transfer_Encoding: chunked\r\nContent_Length: 0\r\nHost_Name: kept\r\n"
                     b"api_key: secret\r\n\r\nhello",
    "ipv6-absolute": b"GET http://[::1]:8080/v6?q=1 HTTP/1.1\r\nHost: ignored\r\n\r\n",
    "chunked-bad-mid-stream": b"POST /partial HTTP/1.1\r\nHost: rec\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
                              b"zz\r\nsecond\r\n0\r\n\r\n",
    **{name: wire for name, (_, wire) in REFUSED.items()},
}


def exchange(port: int, data: bytes, responses: int = 1) -> list[Any]:
    with Client(port) as c:
        c.send(data)
        return [c.response() for _ in range(responses)]


def settle(origin: RecordingOrigin, mark: tuple[int, int], n: int) -> list[Received]:
    wait_until(lambda: len(origin.since(mark)) >= n)
    return origin.since(mark)


# --- finding 1: an Upgrade request with a body ---------------------------------------------------
@pytest.mark.parametrize(("name", "body"), [
    ("upgrade-cl-body", b"b" * 63), ("upgrade-chunked-body", b"hello world"),
])
def test_upgrade_with_a_body_is_forwarded_whole_without_upgrade(
    sc: Sidecar, origins: Origins, name: str, body: bytes
) -> None:
    wire = SEEDS[name]
    mark = origins.rec.mark()
    next_request = b"GET /after HTTP/1.1\r\nHost: rec\r\n\r\n"
    first, second = exchange(sc.port("egress"), wire + next_request, 2)
    assert first.status == 200 and first.body == b"ok /x %d" % len(body)
    assert second.status == 200 and second.body == b"ok /after 0"  # the app side read on
    got = settle(origins.rec, mark, 2)
    assert got[0].body == body and got[1].path == b"/after"
    assert b"upgrade" not in got[0].names() and b"connection" not in got[0].names()


def test_upgrade_with_a_body_does_not_poison_a_pooled_connection(
    sc: Sidecar, origins: Origins
) -> None:
    """A on app connection 1 (Upgrade + body), B on app connection 2, one upstream connection
    (max_connections 1) to an origin that answers at the head and discards the body: B must
    arrive intact, not eaten as A's body."""
    mark = origins.rec.mark()
    a = SEEDS["upgrade-cl-body-early"]
    [ra] = exchange(sc.port("egress"), a)
    assert ra.status == 200 and ra.body == b"ok /early-a 0"  # answered at its head
    [rb] = exchange(sc.port("egress"), b"GET /b HTTP/1.1\r\nHost: one\r\n\r\n")
    assert rb.status == 200 and rb.body == b"ok /b 0"
    got = settle(origins.rec, mark, 2)
    assert [r.path for r in got] == [b"/early-a", b"/b"]
    assert got[0].body == b"b" * 63 and got[0].conn == got[1].conn  # shared, and intact


def test_upgrade_with_a_body_to_nginx_keeps_the_pool_clean(sc: Sidecar) -> None:
    a = (b"POST /a HTTP/1.1\r\nHost: nginx\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
         b"Content-Length: 63\r\n\r\n" + b"n" * 63)
    [ra] = exchange(sc.port("egress"), a)
    assert ra.status == 200 and ra.body == b"nginx POST /a 63\n"
    for i in range(3):  # other app connections, the same pooled nginx connection
        [rb] = exchange(sc.port("egress"), b"GET /b%d HTTP/1.1\r\nHost: nginx\r\n\r\n" % i)
        assert rb.status == 200 and rb.body == b"nginx GET /b%d \n" % i


def test_curl_http2_upload_to_an_http_url_is_forwarded_without_h2c(
    sc: Sidecar, origins: Origins
) -> None:
    """`curl --http2 -d ...` on http:// sends POST + `Upgrade: h2c` + `HTTP2-Settings` + body."""
    mark = origins.rec.mark()
    out = subprocess.run(
        ["curl", "-sS", "--http2", "--max-time", str(TIMEOUT), "-H", "Host: rec",
         "--data-binary", "x" * 100, f"http://127.0.0.1:{sc.port('egress')}/curl"],
        capture_output=True, timeout=TIMEOUT + 5, check=False, env={"PATH": "/usr/bin:/bin"})
    assert out.stdout == b"ok /curl 100", out
    [got] = settle(origins.rec, mark, 1)
    assert not {b"upgrade", b"http2-settings", b"connection"} & set(got.names()), got.head
    assert got.body == b"x" * 100


def test_h2c_and_http10_upgrades_are_ordinary_requests(sc: Sidecar, origins: Origins) -> None:
    mark = origins.rec.mark()
    h2c = SEEDS["upgrade-h2c-get"]
    r1, r2 = exchange(sc.port("egress"), h2c + b"GET /next HTTP/1.1\r\nHost: rec\r\n\r\n", 2)
    assert (r1.status, r1.body, r2.body) == (200, b"ok /h2c 0", b"ok /next 0")
    assert r1.header("connection") is None  # the app's connection stays open
    http10 = SEEDS["upgrade-http10"]
    r3, r4 = exchange(sc.port("egress"), http10 + b"GET /ten2 HTTP/1.0\r\nHost: rec\r\n\r\n", 2)
    assert (r3.body, r4.body) == (b"ok /ten 0", b"ok /ten2 0")
    got = settle(origins.rec, mark, 4)
    for r in got:
        assert b"upgrade" not in r.names() and b"http2-settings" not in r.names(), r.head
        assert r.head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1")


def test_declined_upgrade_returns_a_framed_upstream_connection_to_the_pool(
    sc: Sidecar, origins: Origins
) -> None:
    """A bodyless upgrade answered 200 with a length: both messages were framed, so the next
    request (another app connection) reuses the upstream connection. The app's own
    connection closes: its parser already handed the bytes after the head to a tunnel."""
    mark = origins.rec.mark()
    with Client(sc.port("egress")) as c:
        c.send(b"GET /decline HTTP/1.1\r\nHost: one\r\nConnection: Upgrade\r\n"
               b"Upgrade: websocket\r\n\r\n")
        r = c.response()
        assert r.status == 200 and r.header("connection") == "close" and c.closed_by_peer()
    [r2] = exchange(sc.port("egress"), b"GET /again HTTP/1.1\r\nHost: one\r\n\r\n")
    assert r2.body == b"ok /again 0"
    got = settle(origins.rec, mark, 2)
    assert got[0].conn == got[1].conn and b"upgrade" in got[0].names()
    # Declined with a close-delimited body: that connection is never reused.
    with Client(sc.port("egress")) as c:
        c.send(b"GET /decline-close HTTP/1.1\r\nHost: one\r\nConnection: Upgrade\r\n"
               b"Upgrade: websocket\r\n\r\n")
        assert c.response().body == b"close-delimited"
    [r3] = exchange(sc.port("egress"), b"GET /third HTTP/1.1\r\nHost: one\r\n\r\n")
    assert r3.body == b"ok /third 0"
    got = settle(origins.rec, mark, 4)
    assert got[3].conn != got[2].conn


# --- finding 2: request trailers on a new connection ---------------------------------------------
@pytest.mark.parametrize("cluster", ["fresh", "one"])
def test_request_trailers_are_forwarded_on_new_and_pooled_connections(
    sc: Sidecar, origins: Origins, cluster: str
) -> None:
    if cluster == "one":  # warm the pool: the request finds an idle connection at its head
        exchange(sc.port("egress"), b"GET /warm HTTP/1.1\r\nHost: one\r\n\r\n")
    mark = origins.rec.mark()
    wire = TRAILERS.replace(b"fresh", cluster.encode())
    [r] = exchange(sc.port("egress"), wire)
    assert r.status == 200 and r.body == b"ok /tr 3"
    [got] = settle(origins.rec, mark, 1)
    assert got.trailers == b"X-Trailer: t"


# --- findings 5, 6, 9: what gets 400 or 431, and closes ------------------------------------------
@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_requests_get_their_status_close_and_reach_nothing(
    sc: Sidecar, origins: Origins, name: str
) -> None:
    status, wire = REFUSED[name]
    mark = origins.rec.mark()
    with Client(sc.port("egress")) as c:
        c.send(wire + b"GET /never HTTP/1.1\r\nHost: rec\r\n\r\n")
        r = c.response()
        assert r.status == status, r.body
        assert r.header("connection") == "close" and c.closed_by_peer()
    # A request sent after it on a new connection reaches the origin; nothing of this one did.
    exchange(sc.port("egress"), b"GET /marker HTTP/1.1\r\nHost: rec\r\n\r\n")
    got = settle(origins.rec, mark, 1)
    assert [g.path for g in got] == [b"/marker"]
    assert b"/big" not in origins.rec.raw_since(mark)


def test_max_headers_allows_exactly_the_limit_and_is_per_listener(sc: Sidecar) -> None:
    def head(fields: int) -> bytes:  # Host counts as a field
        return (b"GET /limit HTTP/1.1\r\nHost: rec\r\n"
                + b"".join(b"X-%d: v\r\n" % i for i in range(fields - 1)) + b"\r\n")

    assert exchange(sc.port("egress"), head(200))[0].body == b"ok /limit 0"
    assert exchange(sc.port("strict"), head(10))[0].body == b"ok /limit 0"
    assert exchange(sc.port("strict"), head(11))[0].status == 431


def test_timeout_header_with_an_underscore_is_not_a_number(sc: Sidecar) -> None:
    """`1_0` is not 10 ms (Python's int() would say it is): the header is ignored, and the
    300 ms answer arrives within the cluster's 3 s request timeout."""
    wire = SEEDS["timeout-underscore"]
    [r] = exchange(sc.port("egress"), wire)
    assert r.status == 200 and r.body == b"slept"
    [r] = exchange(sc.port("egress"), wire.replace(b"1_0", b"10"))
    assert r.status == 504  # a plain number still is one


# --- finding 6: header names with underscores ----------------------------------------------------
def test_underscore_lookalikes_of_framing_fields_never_reach_the_origin(
    sc: Sidecar, origins: Origins
) -> None:
    """An origin that maps `_` to `-` (CGI, WSGI) must never see a second framing field."""
    mark = origins.rec.mark()
    wire = SEEDS["underscore-te"]
    [r] = exchange(sc.port("egress"), wire)
    assert r.body == b"ok /u 5"
    [got] = settle(origins.rec, mark, 1)
    mapped = [n.replace(b"_", b"-") for n in got.names()]
    assert mapped.count(b"content-length") == 1 and b"transfer-encoding" not in mapped
    assert b"api_key" in got.names() and b"host_name" in got.names()


# --- finding 7: IPv6 absolute-form targets ------------------------------------------------------
def test_ipv6_absolute_form_routes_to_an_origin_on_ipv6_loopback(
    sc: Sidecar, origins: Origins
) -> None:
    rec6 = origins.rec6
    if rec6 is None:
        pytest.skip("this host has no IPv6 loopback (::1 cannot be bound)")
    mark = rec6.mark()
    wire = SEEDS["ipv6-absolute"].replace(b":8080", b":%d" % rec6.port)
    [r] = exchange(sc.port("egress"), wire)
    assert r.status == 200 and r.body == b"ok /v6?q=1 0", r.body
    [got] = settle(rec6, mark, 1)
    assert got.head.startswith(b"GET /v6?q=1 HTTP/1.1\r\n")
    assert b"\r\nHost: [::1]:%d\r\n" % rec6.port in got.head
    # A refusal names the host in brackets.
    [r] = exchange(sc.port("egress"), b"GET http://[::2]:8080/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 403 and r.json()["detail"].startswith("[::2]:8080 ")


# --- also: a chunked body that goes bad mid-stream ------------------------------------------------
def test_chunked_body_going_bad_mid_stream_resets_the_upstream_connection(
    sc: Sidecar, origins: Origins
) -> None:
    """Part of the body reaches the origin before the bad chunk arrives (documented in
    docs/http.md); the app gets 400, and the upstream connection is closed, never reused."""
    mark = origins.rec.mark()
    with Client(sc.port("egress")) as c:
        wire = SEEDS["chunked-bad-mid-stream"]
        cut = wire.index(b"zz")
        c.send(wire[:cut])
        wait_until(lambda: b"first" in origins.rec.raw_since(mark))
        c.send(wire[cut:])
        r = c.response()
        assert r.status == 400 and r.header("connection") == "close" and c.closed_by_peer()
    conn = next(cn for cn in origins.rec.conns if cn.raw.endswith(b"5\r\nfirst\r\n"))
    wait_until(lambda: conn.closed)
    assert b"second" not in origins.rec.raw_since(mark)
    [r] = exchange(sc.port("egress"), b"GET /later HTTP/1.1\r\nHost: rec\r\n\r\n")
    assert r.body == b"ok /later 0"


# --- the fuzz corpus seeds are this file's cases -------------------------------------------------
def test_the_fuzz_corpus_holds_every_case() -> None:
    """Each raw request of this file is a seed file of the request fuzzer, byte for byte
    (`python -m tests.integration.test_front_door` writes them)."""
    for name, data in SEEDS.items():
        path = CORPUS / f"h18-{name}.bin"
        assert path.exists() and path.read_bytes() == data, path


if __name__ == "__main__":
    CORPUS.mkdir(parents=True, exist_ok=True)
    for _name, _data in SEEDS.items():
        (CORPUS / f"h18-{_name}.bin").write_bytes(_data)
