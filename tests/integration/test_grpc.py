"""gRPC end to end: grpcio channel -> the sidecar's h2c listener -> grpcio servers (SPEC
section 11), both loops. Generic handlers on raw bytes (no generated code); every channel has
grpcio's own retries and proxy lookup off, so the retries seen are the sidecar's.

What test_h2_app.py's end-to-end test already covers (unary with trailing metadata, server
streaming, a Trailers-Only INVALID_ARGUMENT passed through, a deadline, one channel spread
over three servers) is not repeated; here: client streaming and bidi, request metadata both
ways, 1-4 MiB messages, UNAVAILABLE retried on another endpoint while INVALID_ARGUMENT is
not, a TLS endpoint that requires ALPN h2, `protocol: auto` keeping an h2 app's protocol in
cleartext, and `protocol: http1` refusing gRPC with a gRPC status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.harness import LOOPS, Sidecar, free_port, http_get
from tests.integration.tls_servers import Pki

OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Server:
    """A grpcio server with a handful of raw-bytes methods; `calls` counts calls by method."""

    def __init__(self, name: str, creds: grpc.ServerCredentials | None = None,
                 unavailable: bool = False) -> None:
        self.name = name
        self.calls: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.unavailable = unavailable

        def count(method: str, ctx: grpc.ServicerContext) -> None:
            with self.lock:
                self.calls[method] = self.calls.get(method, 0) + 1
                self.metadata.append(dict(ctx.invocation_metadata()))

        def echo(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            count("Echo", ctx)
            if self.unavailable:
                ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{name} is busy")
            ctx.send_initial_metadata((("x-served-by", name),))
            ctx.set_trailing_metadata((("x-trailer", name),))
            return req

        def bad(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            count("Bad", ctx)
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "no")
            raise AssertionError

        def total(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
            count("Total", ctx)
            return b"%d" % sum(len(r) for r in reqs)

        def chat(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
            count("Chat", ctx)
            for r in reqs:
                yield r.upper()

        def who(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            count("Who", ctx)
            return name.encode()

        self.server = grpc.server(futures.ThreadPoolExecutor(8), options=[
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20)])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("svc", {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Bad": grpc.unary_unary_rpc_method_handler(bad),
            "Total": grpc.stream_unary_rpc_method_handler(total),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Who": grpc.unary_unary_rpc_method_handler(who),
        }),))
        address = f"127.0.0.1:{free_port()}"
        self.port = (self.server.add_secure_port(address, creds) if creds is not None
                     else self.server.add_insecure_port(address))
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait(10)


@contextmanager
def servers(*specs: dict[str, Any]) -> Iterator[list[Server]]:
    made: list[Server] = []
    try:
        for i, spec in enumerate(specs):
            made.append(Server(spec.pop("name", f"s{i}"), **spec))
        yield made
    finally:
        for s in made:
            s.stop()


def config(ports: list[int], protocol: str = "http2", **cluster: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "grpc", "protocol": "http", "cluster": "orders"}],
        "clusters": [{
            "name": "orders",
            "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{p}" for p in ports]},
            "protocol": protocol,
            **cluster,
        }],
    }


def channel(sc: Sidecar) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{sc.port('grpc')}", options=[
        *OPTIONS, ("grpc.max_receive_message_length", 8 << 20),
        ("grpc.max_send_message_length", 8 << 20)])


def test_streaming_metadata_and_large_messages(loop: str) -> None:
    with servers({}) as [srv], Sidecar(config([srv.port]), loop=loop) as sc, \
            channel(sc) as ch:
        # request metadata in, initial and trailing metadata out
        value, call = ch.unary_unary("/svc/Echo").with_call(
            b"hi", metadata=(("x-app", "a1"),), timeout=5)
        assert value == b"hi"
        assert dict(call.initial_metadata())["x-served-by"] == "s0"
        assert dict(call.trailing_metadata())["x-trailer"] == "s0"
        assert srv.metadata[-1]["x-app"] == "a1"
        # client streaming
        total = ch.stream_unary("/svc/Total")(iter([b"a" * 10, b"b" * 20, b"c" * 30]),
                                               timeout=5)
        assert total == b"60"
        # bidi, in lockstep
        replies = list(ch.stream_stream("/svc/Chat")(iter([b"one", b"two", b"three"]),
                                                     timeout=5))
        assert replies == [b"ONE", b"TWO", b"THREE"]
        # 1 and 4 MiB messages both ways (several windows each)
        for size in (1 << 20, 4 << 20):
            big = bytes(range(256)) * (size // 256)
            assert ch.unary_unary("/svc/Echo")(big, timeout=20) == big


def test_unavailable_goes_to_another_endpoint_invalid_argument_does_not(loop: str) -> None:
    with servers({"name": "busy", "unavailable": True}, {"name": "ok"}) as [busy, ok], \
            Sidecar(config([busy.port, ok.port], load_balancer="round_robin"),
                    loop=loop) as sc, channel(sc) as ch:
        for i in range(6):
            assert ch.unary_unary("/svc/Echo")(b"%d" % i, timeout=5) == b"%d" % i
        assert busy.calls["Echo"] >= 1  # some went there first, answered Trailers-Only
        assert ok.calls["Echo"] == 6
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/svc/Bad")(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert info.value.details() == "no"  # type: ignore[attr-defined]
        assert busy.calls.get("Bad", 0) + ok.calls.get("Bad", 0) == 1  # not retried
        assert sc.metric("sidecar_grpc_responses_total", cluster="orders",
                         status="invalid_argument") == 1


def test_tls_endpoint_negotiates_h2(loop: str, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    creds = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())])
    with servers({"creds": creds}) as [srv], Sidecar(config(
            [srv.port], "auto",
            tls={"enabled": True, "ca_file": str(pki.ca_file), "sni": "upstream.test"}),
            loop=loop) as sc, channel(sc) as ch:
        assert ch.unary_unary("/svc/Echo")(b"tls", timeout=5) == b"tls"
        assert sc.clusters()["orders"]["endpoints"][0]["protocol"] == "http2"


def test_auto_in_cleartext_keeps_the_apps_http2(loop: str) -> None:
    with servers({}) as [srv], Sidecar(config([srv.port], "auto"), loop=loop) as sc, \
            channel(sc) as ch:
        assert ch.unary_unary("/svc/Echo")(b"auto", timeout=5) == b"auto"
        ep = sc.clusters()["orders"]["endpoints"][0]
        assert ep["protocol"] == "http2"


def test_http1_cluster_answers_grpc_with_internal_protocol_mismatch(loop: str) -> None:
    with servers({}) as [srv], Sidecar(config([srv.port], "http1"), loop=loop) as sc, \
            channel(sc) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/svc/Echo")(b"x", timeout=5)
        err: Any = info.value
        assert err.code() == grpc.StatusCode.INTERNAL
        assert dict(err.trailing_metadata())["x-sidecar-error"] == "protocol_mismatch"
        assert srv.calls == {}


def test_one_channel_follows_a_new_endpoint_at_once(loop: str) -> None:
    """Balancing per request: an endpoint added by a reload gets its share of one long-lived
    channel's calls right away, not when connections happen to be re-established."""
    with servers({"name": "a"}, {"name": "b"}) as [a, b]:
        cfg = config([a.port], load_balancer="round_robin")
        with Sidecar(cfg, loop=loop) as sc, channel(sc) as ch:
            who = ch.unary_unary("/svc/Who")
            assert {who(b"", timeout=5) for _ in range(4)} == {b"a"}
            grown = {**sc.config,
                     "clusters": config([a.port, b.port], load_balancer="round_robin")["clusters"]}
            sc.write_config(grown)
            assert http_get(f"{sc.admin}/reload", method="POST")[0] == 200
            deadline = time.monotonic() + 10
            while len(sc.clusters()["orders"]["endpoints"]) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            seen = [who(b"", timeout=5) for _ in range(10)]
            assert seen.count(b"b") >= 4, seen
