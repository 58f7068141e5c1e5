"""A grpcio server on 127.0.0.1 for the HTTP/2 tests: generic handlers on raw bytes (no
generated code), and gRPC's message framing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures

import grpc

from tests.harness import free_port


def grpc_frame(msg: bytes) -> bytes:
    """One gRPC message on the wire: not compressed, its length, the bytes."""
    return b"\0" + len(msg).to_bytes(4, "big") + msg


@contextlib.contextmanager
def grpc_server(seen: list[float] | None = None, creds: grpc.ServerCredentials | None = None,
                abort_first: int = 0) -> Iterator[int]:
    """A grpcio server (its port; TLS with `creds`) with the methods of service `svc`:

    - `M` (unary) echoes the request, with trailing metadata `x-trail: t`; it appends the
      deadline it was given (`time_remaining`, -1: none) to `seen`;
    - `Stream` (server streaming) answers five messages, the request with `-0` ... `-4`;
    - `Count` (client streaming) answers `n=<messages received>`, appending that count to
      `seen`;
    - `Abort` answers UNAVAILABLE "go elsewhere" at once (a Trailers-Only response);
    - and `M` and `Count` answer that way too for their first `abort_first` calls.
    """
    aborts = [abort_first]
    record = seen if seen is not None else []

    def abort_if_due(ctx: grpc.ServicerContext) -> None:
        if aborts[0] > 0:
            aborts[0] -= 1
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "go elsewhere")

    def echo(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        record.append(ctx.time_remaining() or -1.0)
        abort_if_due(ctx)
        ctx.set_trailing_metadata((("x-trail", "t"),))
        return req

    def stream(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(5):
            yield req + b"-%d" % i

    def count(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
        n = sum(1 for _ in reqs)
        record.append(float(n))
        abort_if_due(ctx)
        return b"n=%d" % n

    def abort(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "go elsewhere")
        raise AssertionError("unreachable")

    handler = grpc.method_handlers_generic_handler("svc", {
        "M": grpc.unary_unary_rpc_method_handler(echo),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Count": grpc.stream_unary_rpc_method_handler(count),
        "Abort": grpc.unary_unary_rpc_method_handler(abort),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    address = f"127.0.0.1:{free_port()}"
    if creds is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait(10)
