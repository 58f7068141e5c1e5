"""Edge cases of HTTP/2 from the app that a user hits, found while documenting it (docs/http2.md),
end to end on 127.0.0.1 under uvloop and asyncio.

A real sidecar in front of a raw-socket HTTP/1.1 origin that records the bytes it gets and
answers chunked with a trailer (tests/integration/test_h2_app.py's `TrailerOrigin`); the app is
a raw HTTP/2 client on the `h2` library (its own checks off where the test sends what real
clients would not), curl for HTTP/1.1. Every wait is bounded.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.h2origin import h2_origin
from tests.harness import LOOPS, Sidecar, SilentListener, free_port, http_get, require_tool
from tests.integration.test_h2_app import (
    ENHANCE_YOUR_CALM,
    GRPC_OPTIONS,
    REFUSED_STREAM,
    TIMEOUT,
    FrameClient,
    H2Client,
    TrailerOrigin,
    frame,
    wait_until,
)

PROTOCOL_ERROR = 0x1


@dataclass
class Env:
    sc: Sidecar
    origin: TrailerOrigin


@pytest.fixture(scope="module", params=LOOPS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    origin = TrailerOrigin()
    config = {
        "listeners": [{"name": "app", "protocol": "http", "cluster": "origin"}],
        "clusters": [{
            "name": "origin",
            "protocol": "http1",
            "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{origin.port}"]},
        }],
    }
    try:
        with Sidecar(config, loop=request.param) as sc:
            yield Env(sc, origin)
    finally:
        origin.close()


def raw_client(port: int) -> H2Client:
    """An h2 client that sends what it is told, even what RFC 9113 forbids."""
    client = H2Client(port)
    client.conn.config.validate_outbound_headers = False
    client.conn.config.normalize_outbound_headers = False
    return client


def test_connect_over_h2_is_refused_on_its_stream_and_the_connection_goes_on(env: Env) -> None:
    """CONNECT over an HTTP/2 stream (RFC 9113 8.5: only :method and :authority) is not a
    tunnel the sidecar makes: 400 bad_request on that stream; the next stream is served."""
    client = raw_client(env.sc.port("app"))
    try:
        client.conn.send_headers(
            1, [(b":method", b"CONNECT"), (b":authority", b"example.com:443")], end_stream=False)
        client.flush()
        client.pump(lambda: client.done(1))
        assert client.status(1) == 400
        assert dict(client.heads[1])[b"x-sidecar-error"] == b"bad_request"
        sid = client.request("GET", "/after")
        client.pump(lambda: client.done(sid))
        assert client.status(sid) == 200 and client.goaway is None
    finally:
        client.close()


def test_connection_specific_field_resets_only_its_stream(env: Env) -> None:
    """`connection: close` on an HTTP/2 request (RFC 9113 8.2.2: malformed) resets that stream
    with PROTOCOL_ERROR; another stream sent in the same write is answered."""
    client = raw_client(env.sc.port("app"))
    try:
        bad = client.request("GET", "/bad", headers=[("connection", "close")])
        good = client.request("GET", "/good")
        client.pump(lambda: client.done(bad) and client.done(good))
        assert client.resets.get(bad) == PROTOCOL_ERROR
        assert client.status(good) == 200
        assert bytes(client.bodies[good]) == b"hello world"
        assert client.goaway is None
    finally:
        client.close()


def test_te_trailers_from_an_http11_app_is_hop_by_hop_and_trailers_still_arrive(env: Env) -> None:
    """An HTTP/1.1 app saying `TE: trailers` (as gRPC-over-HTTP/1.1 bridges do): the field is
    hop-by-hop, so the HTTP/1.1 origin does not get it; the origin's trailers reach the app."""
    curl = require_tool("/usr/bin/curl", "apt-get install curl")
    before = len(env.origin.requests)
    out = subprocess.run(
        [curl, "-sS", "--raw", "-i", "-H", "TE: trailers", env.sc.url("app", "/te")],
        capture_output=True, timeout=10, check=True,
    ).stdout
    assert out.startswith(b"HTTP/1.1 200")
    assert b"x-checksum: abc123" in out  # the trailer, in the last chunk
    sent = env.origin.requests[before]
    assert sent.startswith(b"GET /te HTTP/1.1\r\n")
    assert b"\nte:" not in sent.lower()


# --- limits.max_header_bytes / max_headers -----------------------------------------------------
# Over the default 64 KiB block limit, within 4 times it; ~45 KiB on the wire once Huffman
# coded, under the 64 KiB nghttp2 accepts for one field as sent (NGHTTP2_HD_MAX_NV: a field
# over that is the connection's COMPRESSION_ERROR, whatever our limits).
OVERSIZED = [("x-big", "a" * (70 * 1024))]


def abuse(sc: Sidecar, kind: str) -> float:
    return sc.metric("sidecar_http2_abuse_total", kind=kind)


def test_oversized_header_block_is_refused_on_its_stream_only(env: Env) -> None:
    """A header block over limits.max_header_bytes: 431 header_too_large on its stream, as
    HTTP/1.1 answers it; a stream open on the same connection meanwhile is answered 200, and
    the connection goes on (before, GOAWAY ENHANCE_YOUR_CALM closed it as an HPACK bomb)."""
    before = abuse(env.sc, "hpack_bomb")
    client = raw_client(env.sc.port("app"))
    try:
        small = client.request("POST", "/small", body=b"part", end=False)  # open meanwhile
        big = client.request("GET", "/big", headers=OVERSIZED)
        client.pump(lambda: client.done(big))
        client.conn.send_data(small, b"", end_stream=True)
        client.flush()
        client.pump(lambda: client.done(small))
        assert client.goaway is None
        assert client.status(big) == 431
        assert dict(client.heads[big])[b"x-sidecar-error"] == b"header_too_large"
        assert client.status(small) == 200
        after = client.request("GET", "/after")  # and the next stream is served
        client.pump(lambda: client.done(after))
        assert client.status(after) == 200 and client.goaway is None
    finally:
        client.close()
    assert abuse(env.sc, "hpack_bomb") == before


def test_oversized_grpc_metadata_gets_the_grpc_answer(env: Env) -> None:
    """A gRPC call whose metadata is over the limit: SPEC 11's Trailers-Only answer for
    header_too_large (14 unavailable), on that stream only. (grpcio itself checks the
    advertised SETTINGS_MAX_HEADER_LIST_SIZE before sending: a raw client stands in for a
    library that does not.)"""
    client = raw_client(env.sc.port("app"))
    try:
        sid = client.request("POST", "/svc/M", headers=[
            ("content-type", "application/grpc"), ("te", "trailers"), *OVERSIZED])
        client.pump(lambda: client.done(sid))
        head = dict(client.heads[sid])
        assert head[b":status"] == b"200" and sid in client.ended
        assert head[b"grpc-status"] == b"14"
        assert head[b"x-sidecar-error"] == b"header_too_large"
        assert client.goaway is None
    finally:
        client.close()


def test_a_header_block_far_over_the_limit_is_an_hpack_bomb(env: Env) -> None:
    """Decoded size over 4 times limits.max_header_bytes in one block, though small on the
    wire (one 3900-byte field indexed once, then referenced): GOAWAY ENHANCE_YOUR_CALM and
    hpack_bomb counted."""
    before = abuse(env.sc, "hpack_bomb")
    client = raw_client(env.sc.port("app"))
    try:
        client.request("GET", "/bomb", headers=[("x-bomb", "b" * 3900)] * 80)
        client.wait_closed()
        assert client.goaway is not None and client.goaway.error_code == ENHANCE_YOUR_CALM
    finally:
        client.close()
    wait_until(lambda: abuse(env.sc, "hpack_bomb") == before + 1, what="hpack_bomb counted")


def test_oversized_header_blocks_repeated_are_an_hpack_bomb(env: Env) -> None:
    """Each block over the limit is refused alone, but a connection that keeps sending them
    is cut off as an HPACK bomb: 32 in a row, none within the limits to pay them back, are
    each answered 431; the 33rd ends the connection."""
    before = abuse(env.sc, "hpack_bomb")
    client = raw_client(env.sc.port("app"))
    rep = [("x-rep", "r" * 3900)] * 20  # 77 KiB decoded, a few bytes on the wire once indexed
    try:
        sids = [client.request("GET", "/again", headers=rep) for _ in range(32)]
        client.pump(lambda: all(client.done(sid) for sid in sids))
        assert [client.status(sid) for sid in sids] == [431] * 32
        assert client.goaway is None
        client.request("GET", "/again", headers=rep)
        client.wait_closed()
        assert client.goaway is not None and client.goaway.error_code == ENHANCE_YOUR_CALM
    finally:
        client.close()
    wait_until(lambda: abuse(env.sc, "hpack_bomb") == before + 1, what="hpack_bomb counted")


def test_curl_gets_the_same_431_over_http2_as_over_http11() -> None:
    """A real client: curl's request head over a listener's limits.max_header_bytes (16 KiB
    here: curl's own libnghttp2 sends no header block over 64 KiB) gets the answer HTTP/1.1
    gets, 431 header_too_large, over HTTP/2 too (before: curl exit 56, the connection cut)."""
    curl = require_tool("/usr/bin/curl", "apt-get install curl")
    origin = TrailerOrigin()
    config = {
        "listeners": [{"name": "app", "protocol": "http", "cluster": "origin",
                       "limits": {"max_header_bytes": "16KiB"}}],
        "clusters": [{"name": "origin", "protocol": "http1",
                      "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{origin.port}"]}}],
    }
    try:
        with Sidecar(config) as sc:
            for version in ("--http2-prior-knowledge", "--http1.1"):
                out = subprocess.run(
                    [curl, "-sS", version, "-H", "x-big: " + "a" * (30 * 1024), "-w",
                     "\n%{http_version} %{http_code}", sc.url("app", "/big")],
                    capture_output=True, timeout=10, check=True,
                ).stdout
                body, _, status = out.rpartition(b"\n")
                assert status == (b"2 431" if version.startswith("--http2") else b"1.1 431")
                assert b'"error":"header_too_large"' in body
    finally:
        origin.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_an_oversized_response_head_fails_its_stream_only(loop: str) -> None:
    """An endpoint's response head over the limits the sidecar advertised to it (64 KiB): that
    stream fails (502 bad_upstream_response), a stream beside it on the same endpoint
    connection is answered, and the connection serves the next one (before, the engine took
    the head for an HPACK bomb and closed the connection under every stream on it)."""
    with h2_origin(hold=False) as origin, Sidecar({
        "listeners": [{"name": "app", "protocol": "http", "cluster": "up"}],
        "clusters": [{"name": "up", "protocol": "http2", "retry": {"attempts": 1},
                      "discovery": {"type": "static",
                                    "endpoints": [f"127.0.0.1:{origin.port}"]}}],
    }, loop=loop) as sc:
        client = H2Client(sc.port("app"))
        try:
            big = client.request("GET", "/fields/70")
            small = client.request("GET", "/small")
            client.pump(lambda: client.done(big) and client.done(small))
            assert client.status(big) == 502
            assert dict(client.heads[big])[b"x-sidecar-error"] == b"bad_upstream_response"
            assert client.status(small) == 200
            after = client.request("GET", "/after")
            client.pump(lambda: client.done(after))
            assert client.status(after) == 200
            assert origin.connections == 1
        finally:
            client.close()


# --- gRPC: the sidecar's error after the answer began ---------------------------------------------
class StreamingServer:
    """A grpcio server whose server-streaming `svc/Watch` sends `n` messages (query in the
    request: b"<n>") and then waits (until `stop`), as a watch stream does."""

    def __init__(self) -> None:
        self.stop = threading.Event()

        def watch(req: bytes, ctx: Any) -> Iterator[bytes]:
            for i in range(int(req or b"1")):
                yield b"message %d" % i
            self.stop.wait(TIMEOUT)

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("svc", {
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
        }),))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{free_port()}")
        self.server.start()

    def close(self) -> None:
        self.stop.set()
        self.server.stop(0).wait(TIMEOUT)


@pytest.mark.parametrize("loop", LOOPS)
def test_grpc_stream_past_its_deadline_ends_with_deadline_exceeded_trailers(loop: str) -> None:
    """A server-streaming call whose deadline (the cluster's timeouts.request here) passes after
    messages reached the app: the sidecar cannot answer Trailers-Only any more, but it ends the
    stream at a message boundary with trailers `grpc-status: 4` and `x-sidecar-error:
    upstream_timeout` (SPEC 11's mapping), so the app's library says DEADLINE_EXCEEDED with the
    messages it got, not INTERNAL ("RST_STREAM with error code 2") as before."""
    server = StreamingServer()
    config = {
        "listeners": [{"name": "grpc", "protocol": "http", "cluster": "orders"}],
        "clusters": [{
            "name": "orders",
            "protocol": "http2",
            "timeouts": {"request": "500ms"},
            "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{server.port}"]},
        }],
    }
    try:
        with Sidecar(config, loop=loop) as sc, grpc.insecure_channel(
                f"127.0.0.1:{sc.port('grpc')}", options=GRPC_OPTIONS) as channel:
            call = channel.unary_stream("/svc/Watch")(b"3", timeout=TIMEOUT)
            got: list[bytes] = []
            with pytest.raises(grpc.RpcError) as raised:
                for message in call:
                    got.append(message)
            err = raised.value
            assert got == [b"message 0", b"message 1", b"message 2"]
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
            assert dict(err.trailing_metadata() or ())["x-sidecar-error"] == "upstream_timeout"
            # Counted as the sidecar's gRPC answer, like a Trailers-Only one.
            status, metrics = http_get(sc.admin + "/metrics")
            assert status == 200
            assert (b'sidecar_grpc_responses_total{cluster="orders",status="deadline_exceeded"}'
                    b" 1.0") in metrics
    finally:
        server.close()


# --- gRPC statuses as the endpoint's failures (SPEC 5 and 11) ------------------------------------
class StatusServer:
    """A grpcio server whose unary `svc/Fail` answers the status named in the request
    (Trailers-Only, as `abort` does), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

        def fail(req: bytes, ctx: Any) -> bytes:
            with self.lock:
                self.calls += 1
            ctx.abort(getattr(grpc.StatusCode, req.decode()), "as asked")
            raise AssertionError

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("svc", {
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        }),))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{free_port()}")
        self.server.start()

    def close(self) -> None:
        self.server.stop(0).wait(TIMEOUT)


@pytest.mark.parametrize("loop", LOOPS)
def test_grpc_failure_statuses_eject_an_endpoint_and_others_do_not(loop: str) -> None:
    """Outlier detection counts `unavailable` (and unknown, internal, deadline_exceeded) as the
    endpoint's failures, as a 5xx, though the HTTP status is 200; `invalid_argument` is the
    caller's problem and ejects nobody. grpc_on is off so every answer reaches the app."""
    servers = [StatusServer(), StatusServer()]
    config = {
        "listeners": [{"name": "grpc", "protocol": "http", "cluster": "orders"}],
        "clusters": [{
            "name": "orders",
            "protocol": "http2",
            "load_balancer": "round_robin",
            "retry": {"attempts": 1, "grpc_on": []},
            "outlier_detection": {"consecutive_failures": 2, "max_ejection_percent": 50},
            "discovery": {"type": "static",
                          "endpoints": [f"127.0.0.1:{s.port}" for s in servers]},
        }],
    }

    def ejected(sc: Sidecar) -> list[bool]:
        return [bool(ep["ejected"]) for ep in sc.clusters()["orders"]["endpoints"]]

    try:
        with Sidecar(config, loop=loop) as sc, grpc.insecure_channel(
                f"127.0.0.1:{sc.port('grpc')}", options=GRPC_OPTIONS) as channel:
            call = channel.unary_unary("/svc/Fail")
            for _ in range(6):
                with pytest.raises(grpc.RpcError) as raised:
                    call(b"INVALID_ARGUMENT", timeout=TIMEOUT)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ejected(sc) == [False, False]
            for _ in range(6):
                with pytest.raises(grpc.RpcError) as raised:
                    call(b"UNAVAILABLE", timeout=TIMEOUT)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert sorted(ejected(sc)) == [False, True]
    finally:
        for s in servers:
            s.close()


# --- limits.max_concurrent_streams ---------------------------------------------------------------
class LimitClient(FrameClient):
    """A frame-level client (the `h2` library neither opens a stream beyond the peer's limit
    nor reports a reset of a stream it did not open) that also reads the sidecar's
    SETTINGS_MAX_CONCURRENT_STREAMS; it acknowledges SETTINGS as it reads them."""

    max_streams = 0

    def _frames(self) -> None:
        buf = self.buf
        i = 0
        while i + 9 <= len(buf):
            n = int.from_bytes(buf[i:i + 3], "big")
            if i + 9 + n > len(buf):
                break
            if buf[i + 3] == 4 and not buf[i + 4] & 1:
                for e in range(i + 9, i + 9 + n, 6):
                    if int.from_bytes(buf[e:e + 2], "big") == 3:
                        self.max_streams = int.from_bytes(buf[e + 2:e + 6], "big")
            i += 9 + n
        super()._frames()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stream_beyond_the_limit_is_refused_and_the_others_go_on(loop: str) -> None:
    """A stream beyond the acknowledged SETTINGS_MAX_CONCURRENT_STREAMS (2 here) is reset with
    REFUSED_STREAM (RFC 9113 5.1.2: a stream error; before, nghttp2 ended the connection with
    GOAWAY PROTOCOL_ERROR) and never routed; the others go on, and once one of them ends a new
    stream is taken again."""
    silent = SilentListener()
    config = {
        "listeners": [{"name": "app", "protocol": "http", "cluster": "silent",
                       "limits": {"max_concurrent_streams": 2}}],
        "clusters": [{"name": "silent", "protocol": "http1",
                      "discovery": {"type": "static",
                                    "endpoints": [f"127.0.0.1:{silent.port}"]}}],
    }
    try:
        with Sidecar(config, loop=loop) as sc:
            client = LimitClient(sc.port("app"))
            try:
                client.pump(lambda: client.max_streams == 2)  # read, and acknowledged
                assert [client.request("/") for _ in range(3)] == [1, 3, 5]
                client.pump(lambda: 5 in client.resets or client.goaway is not None)
                assert client.goaway is None
                assert client.resets == {5: REFUSED_STREAM}
                # Stream 5 never reached the router: two requests in flight, not three.
                assert sc.metric("sidecar_inflight_requests", listener="app") == 2
                # The app cancels stream 1: room for one more (7), not two (9 is refused).
                client.sock.sendall(frame(3, 0, 1, (0x8).to_bytes(4, "big")))
                assert [client.request("/") for _ in range(2)] == [7, 9]
                client.pump(lambda: 9 in client.resets or client.goaway is not None)
                assert client.goaway is None
                assert client.resets == {5: REFUSED_STREAM, 9: REFUSED_STREAM}
                assert sc.metric("sidecar_inflight_requests", listener="app") == 2
                assert sc.metric("sidecar_http2_abuse_total") == 0
            finally:
                client.close()
    finally:
        silent.close()


# --- flow control across two HTTP/2 legs ----------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_slow_h2_app_holds_an_h2_endpoint_to_about_a_window(loop: str) -> None:
    """The server-streaming case (h2 app, h2 endpoint) the other flow-control tests leave out
    (an HTTP/1.1 app in front of an h2 endpoint; an h2 app in front of an HTTP/1.1 origin): an
    app that never opens its window past the first 64 KiB holds the endpoint after about one
    stream window (1 MiB) plus socket buffers, not after the 64 MiB body; once it reads, all
    of it arrives."""
    total = 64 << 20
    with h2_origin() as origin, Sidecar({
        "listeners": [{"name": "app", "protocol": "http", "cluster": "up"}],
        "clusters": [{"name": "up", "protocol": "http2",
                      "discovery": {"type": "static",
                                    "endpoints": [f"127.0.0.1:{origin.port}"]}}],
    }, loop=loop) as sc:
        client = H2Client(sc.port("app"))
        try:
            sid = client.request("GET", f"/big/{total}")
            client.pump(lambda: client.received > 0, ack=False)
            deadline = time.monotonic() + TIMEOUT
            previous = -1
            while previous != sum(origin.sent.values()):  # until the endpoint is held back
                assert time.monotonic() < deadline, "the endpoint was never held back"
                previous = sum(origin.sent.values())
                time.sleep(0.3)
            assert previous < 8 << 20, previous
            assert client.received <= 64 * 1024  # the app's window: nothing more was pushed
            client.ack_all()
            client.pump(lambda: client.done(sid), within=60)
            assert client.received == total and sid in client.ended
        finally:
            client.close()
