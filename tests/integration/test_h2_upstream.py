"""HTTP/2 to the endpoints, through the real sidecar process (SPEC section 11), both loops.

The app speaks HTTP/1.1 (http.client on raw keep-alive connections); the endpoints are real
HTTP/2 servers on 127.0.0.1: nginx h2c (`listen PORT http2;`), an h2-only origin on the `h2`
library that records what it receives and which connection carried it (tests/h2origin.py),
and grpcio servers (cleartext, and TLS with a trustme certificate: grpcio requires ALPN h2).
"""

from __future__ import annotations

import http.client
import math
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.h2origin import h2_origin
from tests.harness import LOOPS, Sidecar, nginx
from tests.integration.grpc_servers import grpc_frame, grpc_server
from tests.integration.tls_servers import Pki


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def config(endpoints: list[str], protocol: str = "http2", **cluster: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "app", "protocol": "http", "cluster": "up"}],
        "clusters": [{
            "name": "up",
            "discovery": {"type": "static", "endpoints": endpoints},
            "protocol": protocol,
            **cluster,
        }],
    }


def call(port: int, method: str = "GET", path: str = "/", body: bytes | None = None,
         headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None,
         ) -> tuple[int, dict[str, str], bytes]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        c.request(method, path, body=body, headers=headers or {})
        resp = c.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        if own:
            c.close()


def until(cond: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_http1_app_to_nginx_h2c(loop: str) -> None:
    conf = """
    server {
      listen 127.0.0.1:{port} http2;
      location / {
        return 200 "$server_protocol $request_method $uri $host $http_x_sidecar_deadline_ms\\n";
      }
    }
    """
    with nginx(conf) as port, Sidecar(config([f"127.0.0.1:{port}"]), loop=loop) as sc:
        app = http.client.HTTPConnection("127.0.0.1", sc.port("app"), timeout=15)
        for i in range(3):  # one app keep-alive connection, several requests
            status, headers, body = call(0, "GET", f"/p{i}", headers={"Host": "svc.test",
                                                                      "Connection": "keep-alive"},
                                         conn=app)
            assert status == 200
            assert body.startswith(f"HTTP/2.0 GET /p{i} svc.test ".encode())
            assert headers["content-length"] == str(len(body))
        app.close()
        ep = sc.clusters()["up"]["endpoints"][0]
        assert ep["protocol"] == "http2" and ep["streams"] == 0


def test_h2_only_origin_many_app_connections_share_few(loop: str) -> None:
    """16 HTTP/1.1 app connections at once, the origin allowing 4 streams per connection:
    at most ceil(16/4) HTTP/2 connections reach it, every request answered."""
    with h2_origin(max_concurrent_streams=4) as origin, \
            Sidecar(config([f"127.0.0.1:{origin.port}"]), loop=loop) as sc:
        with futures.ThreadPoolExecutor(16) as pool:
            calls = [pool.submit(call, sc.port("app"), "POST", "/hold", b"x" * 100)
                     for _ in range(16)]
            until(lambda: len(origin.received) == 16)
            assert sc.clusters()["up"]["endpoints"][0]["streams"] == 16
            assert sc.metric("sidecar_upstream_streams", cluster="up") == 16
            origin.release_held()
            results = [c.result(20) for c in calls]
        assert all(status == 200 for status, _, _ in results)
        assert origin.connections <= math.ceil(16 / 4)
        assert all(bytes(r.body) == b"x" * 100 for r in origin.received)
        fields = dict(origin.received[0].headers)
        assert fields[b":method"] == b"POST" and fields[b"content-length"] == b"100"
        assert b"host" not in fields and b"connection" not in fields


def test_beyond_max_connections_streams_wait_in_the_pending_queue(loop: str) -> None:
    """One connection allowed, 2 streams on it (the origin's limit): a third request waits in
    the pending queue and gets pool_timeout after pending_timeout; the two finish."""
    with h2_origin(max_concurrent_streams=2) as origin, Sidecar(config(
            [f"127.0.0.1:{origin.port}"],
            pool={"max_connections": 1, "pending_timeout": "500ms"}), loop=loop) as sc:
        with futures.ThreadPoolExecutor(3) as pool:
            held = [pool.submit(call, sc.port("app"), "GET", "/hold") for _ in range(2)]
            until(lambda: len(origin.received) == 2)
            status, headers, _ = call(sc.port("app"), "GET", "/third")
            assert status == 503 and headers["x-sidecar-error"] == "pool_timeout"
            origin.release_held()
            assert [h.result(20)[0] for h in held] == [200, 200]
        assert origin.connections == 1 and len(origin.received) == 2


def test_max_lifetime_retires_a_connection_its_streams_finish(loop: str) -> None:
    """Past max_lifetime a connection takes no new stream (a new one opens) while the stream
    it carries finishes; then it closes."""
    with h2_origin() as origin, Sidecar(config(
            [f"127.0.0.1:{origin.port}"], pool={"max_lifetime": "1s"}), loop=loop) as sc:
        with futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(call, sc.port("app"), "GET", "/hold")
            until(lambda: len(origin.received) == 1)
            time.sleep(1.1)  # past the (jittered, at most 1 s) lifetime
            status, _, body = call(sc.port("app"), "GET", "/after")
            assert status == 200 and body == b"origin o /after"
            assert origin.connections == 2
            assert [r.conn for r in origin.received] == [1, 2]
            assert origin.goaways == 1  # the retired connection said so to the endpoint
            origin.release_held()
            assert held.result(20)[0] == 200
        until(lambda: len(origin.live) == 1)  # the retired one closed after its stream
        assert sc.metric("sidecar_upstream_connections_closed_total",
                         reason="max_lifetime") == 1


def test_an_idle_connection_closes_after_idle_timeout(loop: str) -> None:
    with h2_origin() as origin, Sidecar(config(
            [f"127.0.0.1:{origin.port}"], pool={"idle_timeout": "500ms"}), loop=loop) as sc:
        assert call(sc.port("app"), "GET", "/once")[0] == 200
        assert len(origin.live) == 1
        until(lambda: not origin.live)  # closed by the sidecar once idle 500 ms
        assert sc.metric("sidecar_upstream_connections_closed_total",
                         reason="idle_timeout") == 1
        assert origin.goaways == 1  # said so first
        assert call(sc.port("app"), "GET", "/again")[0] == 200  # a new one, as needed
        assert origin.connections == 2


def test_goaway_streams_retried_on_another_endpoint(loop: str) -> None:
    """Endpoint A sends GOAWAY with a last-stream-id below a stream in flight: that POST was
    never processed and goes to endpoint B, body and all; the stream below finishes on A."""
    with h2_origin(name="a", goaway_at=2) as a, h2_origin(name="b", hold=False) as b, \
            Sidecar(config([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
                           load_balancer="round_robin"), loop=loop) as sc:
        with futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(call, sc.port("app"), "POST", "/hold", b"body%d" % i)
                     for i in range(4)]
            results = [c.result(20) for c in calls]
        assert [s for s, _, _ in results] == [200] * 4
        bodies = sorted(body for _, _, body in results)
        assert bodies[0] == b"held 1"
        assert [body for body in bodies[1:]] == [b"origin b /hold"] * 3
        assert len(a.received) == 2 and len(b.received) == 3
        # the refused stream's body reached B whole
        a_bodies = {bytes(r.body) for r in a.received}
        b_bodies = {bytes(r.body) for r in b.received}
        assert len(a_bodies & b_bodies) == 1  # the refused one, sent again
        assert a_bodies | b_bodies == {b"body%d" % i for i in range(4)}


def test_keepalive_ping_closes_a_dead_connection(loop: str) -> None:
    with h2_origin(silent=True) as origin, Sidecar(config(
            [f"127.0.0.1:{origin.port}"],
            http2={"keepalive_interval": "200ms", "keepalive_timeout": "200ms"},
            pool={"connect_timeout": "300ms"}, timeouts={"request": "10s"}), loop=loop) as sc:
        started = time.monotonic()
        status, headers, _ = call(sc.port("app"), "GET", "/")
        assert time.monotonic() - started < 8
        assert status == 502 and headers["x-sidecar-error"] == "connect_failed"
        # a silent endpoint never sends SETTINGS: the connect fails, counted
        assert origin.connections >= 1


def test_keepalive_ping_dead_connection_in_flight(loop: str) -> None:
    """A live connection that goes silent with a request in flight: no PING ACK within
    keepalive_timeout and it is closed; the GET is retried and answered."""
    with h2_origin(name="a") as a, h2_origin(name="b", hold=False) as b:
        cfg = config([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
                     load_balancer="round_robin",
                     http2={"keepalive_interval": "200ms", "keepalive_timeout": "300ms"})
        with Sidecar(cfg, loop=loop) as sc:
            app = http.client.HTTPConnection("127.0.0.1", sc.port("app"), timeout=15)
            assert sorted(call(0, "GET", "/warm", conn=app)[2] for _ in range(2)) == [
                b"origin a /warm", b"origin b /warm"]  # one connection to each, kept
            app.close()
            a.silent = True  # A stops answering anything on the connection it has
            results = [call(sc.port("app"), "GET", "/hold") for _ in range(2)]
            assert [s for s, _, _ in results] == [200, 200]
            assert all(body == b"origin b /hold" for _, _, body in results)
            until(lambda: sc.metric("sidecar_upstream_connections_closed_total",
                                    reason="timeout") >= 1)


def test_per_request_balancing_over_three_endpoints(loop: str) -> None:
    with h2_origin(name="a", hold=False) as a, h2_origin(name="b", hold=False) as b, \
            h2_origin(name="c", hold=False) as c, \
            Sidecar(config([f"127.0.0.1:{o.port}" for o in (a, b, c)],
                           load_balancer="round_robin"), loop=loop) as sc:
        app = http.client.HTTPConnection("127.0.0.1", sc.port("app"), timeout=15)
        for i in range(30):  # one app connection
            status, _, _ = call(0, "GET", f"/r{i}", conn=app)
            assert status == 200
        app.close()
        assert [len(o.received) for o in (a, b, c)] == [10, 10, 10]
        assert [o.connections for o in (a, b, c)] == [1, 1, 1]


GRPC_HEADERS = {"Content-Type": "application/grpc", "TE": "trailers"}


def test_tls_alpn_h2_to_grpcio(loop: str, tmp_path: Path) -> None:
    """protocol auto with TLS: ALPN offers h2 and http/1.1; grpcio (which requires h2)
    chooses h2, and the HTTP/1.1 app's gRPC call goes through."""
    pki = Pki(tmp_path / "pki")
    creds = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())])
    seen: list[float] = []
    with grpc_server(seen, creds) as port, Sidecar(config(
            [f"127.0.0.1:{port}"], "auto",
            tls={"enabled": True, "ca_file": str(pki.ca_file), "sni": "upstream.test"}),
            loop=loop) as sc:
        status, headers, body = call(sc.port("app"), "POST", "/svc/M", grpc_frame(b"hello"),
                                     GRPC_HEADERS)
        assert status == 200, (headers, body)
        assert body == grpc_frame(b"hello")
        assert headers["content-type"] == "application/grpc"
        assert sc.clusters()["up"]["endpoints"][0]["protocol"] == "http2"


def test_http2_cluster_refuses_an_endpoint_that_does_not_choose_h2(loop: str,
                                                                    tmp_path: Path) -> None:
    """protocol http2 with TLS: ALPN h2 is required; an endpoint that speaks only HTTP/1.1
    is a failure to connect, said so, and never gets HTTP/2 bytes."""
    from tests.integration.test_upstream_alpn import AlpnUpstream
    from tests.integration.tls_servers import server_context

    pki = Pki(tmp_path / "pki")
    with AlpnUpstream(server_context(pki.server), ["http/1.1"]) as upstream, Sidecar(config(
            [f"127.0.0.1:{upstream.port}"], "http2",
            tls={"enabled": True, "ca_file": str(pki.ca_file), "sni": "upstream.test"}),
            loop=loop) as sc:
        status, headers, body = call(sc.port("app"), "GET", "/")
        assert status == 502 and headers["x-sidecar-error"] == "connect_failed"
        assert b"ALPN" in body and b"not h2" in body
        assert upstream.heads == [b""] * len(upstream.heads)  # nothing sent after the handshake


def test_http1_cluster_refuses_grpc(loop: str) -> None:
    with h2_origin() as origin, Sidecar(config([f"127.0.0.1:{origin.port}"], "http1"),
                                        loop=loop) as sc:
        status, headers, _ = call(sc.port("app"), "POST", "/svc/M", grpc_frame(b"x"), GRPC_HEADERS)
        assert status == 502 and headers["x-sidecar-error"] == "protocol_mismatch"
        assert origin.connections == 0


def test_grpc_timeout_carries_the_deadline_left(loop: str) -> None:
    seen: list[float] = []
    with grpc_server(seen) as port, Sidecar(config([f"127.0.0.1:{port}"]), loop=loop) as sc:
        status, headers, body = call(sc.port("app"), "POST", "/svc/M", grpc_frame(b"t"),
                                     {**GRPC_HEADERS, "x-sidecar-timeout-ms": "3000"})
        assert status == 200 and body == grpc_frame(b"t")
        assert 2.0 < seen[0] <= 3.0
        assert sc.metric("sidecar_grpc_responses_total", cluster="up", status="ok") == 1


def test_grpc_on_retries_trailers_only_unavailable(loop: str) -> None:
    """One of two endpoints answers UNAVAILABLE as Trailers-Only: retried (grpc_on's
    default), the other answers."""
    seen_a: list[float] = []
    seen_b: list[float] = []
    with grpc_server(seen_a, abort_first=100) as pa, grpc_server(seen_b) as pb, Sidecar(config(
            [f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"], load_balancer="round_robin"),
            loop=loop) as sc:
        for i in range(4):
            status, headers, body = call(sc.port("app"), "POST", "/svc/M", grpc_frame(b"%d" % i),
                                         GRPC_HEADERS)
            assert status == 200 and body == grpc_frame(b"%d" % i), (headers, body)
        assert len(seen_b) == 4 and len(seen_a) >= 1
        # only the answers the app got are counted; the retried UNAVAILABLEs are not
        assert sc.metric("sidecar_grpc_responses_total", cluster="up", status="ok") == 4
        assert sc.metric("sidecar_grpc_responses_total", cluster="up",
                         status="unavailable") == 0


def test_grpc_on_spares_a_streaming_call_that_sent_a_message(loop: str) -> None:
    """SPEC 11: a streaming call is not sent again once a message of it went upstream whole
    (the endpoint may have processed it), even on a grpc_on status; a single-message call is.
    Endpoint A always answers UNAVAILABLE (Trailers-Only), B counts the messages it got."""
    seen_a: list[float] = []
    seen_b: list[float] = []
    with grpc_server(seen_a, abort_first=100) as pa, grpc_server(seen_b) as pb, Sidecar(config(
            [f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"], load_balancer="round_robin"),
            loop=loop) as sc:
        app = http.client.HTTPConnection("127.0.0.1", sc.port("app"), timeout=15)
        hit_a = {1: 0, 2: 0}
        for messages in (2, 2, 2, 1, 1, 1):  # round robin: some of each reach A
            a_before, b_before = len(seen_a), len(seen_b)
            status, _, body = call(0, "POST", "/svc/Count", grpc_frame(b"a") * messages,
                                   GRPC_HEADERS, app)
            assert status == 200
            if len(seen_a) > a_before:
                hit_a[messages] += 1
                if messages == 2:  # not sent again: the app has A's UNAVAILABLE (trailers)
                    assert body == b"" and len(seen_b) == b_before
                else:  # sent again, to B
                    assert body == grpc_frame(b"n=1") and seen_b[b_before:] == [1.0]
            else:
                assert body == grpc_frame(b"n=%d" % messages)
        app.close()
        assert hit_a[1] >= 1 and hit_a[2] >= 1


def test_slow_app_holds_the_endpoint_to_about_a_window(loop: str) -> None:
    """Flow control tied to the app: an HTTP/1.1 app that stops reading a 64 MiB answer
    stops the endpoint after about one stream window plus what the sockets buffer, not after
    the whole body; then it reads all of it."""
    total = 64 << 20
    with h2_origin() as origin, Sidecar(config([f"127.0.0.1:{origin.port}"]),
                                        loop=loop) as sc:
        import socket

        with socket.create_connection(("127.0.0.1", sc.port("app")), 10) as app:
            app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            app.sendall(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % total)
            until(lambda: sum(origin.sent.values()) > 0)
            previous = -1
            while previous != sum(origin.sent.values()):  # until the endpoint is held back
                previous = sum(origin.sent.values())
                time.sleep(0.3)
            held_at = previous
            # 1 MiB window + the sidecar's write high-water mark + the kernel's buffers on
            # both sockets (loopback autotuning: a few MiB), far below the body.
            assert held_at < 16 << 20, held_at
            got = 0
            app.settimeout(20)
            while got < total:
                chunk = app.recv(1 << 20)
                assert chunk
                got += len(chunk)
            assert got >= total
