"""CPU cost per gRPC-like unary request of each HTTP/2 engine candidate, per side, in memory.

    python bench/h2_engine.py                 # every candidate, 20,000 requests each
    python bench/h2_engine.py -n 5000 --only nghttp2

A client session and a server session talk through byte strings (no sockets, no event loop):
the client sends N unary requests (`:method POST`, `:scheme http`, `:path /svc/M`,
`:authority`, `content-type: application/grpc`, `te: trailers`, `grpc-timeout`, a
user-agent, 100 bytes of DATA), the server answers each with headers, 100 bytes of DATA and
trailers `grpc-status: 0`. Requests go in batches of `--batch` streams (as a multiplexed
channel sends them), so per-read overheads are shared as on a real connection. The CPU time
(process_time) each side spends inside its engine calls is divided by N.

Candidates: (a) `h2` as shipped, (b) `h2` with header validation and normalization off,
(c) libnghttp2 through cffi: sidecar/http/h2engine.py, the engine the product uses, in the mode
this tree imports ("api": the binding setup.py compiles; "abi": the fallback that loads
libnghttp2.so.14 at run time), and (d) "nghttp2-abi": the same engine in ABI mode, in a
subprocess with SIDECAR_PURE=1 (the tree's sources only).
Reference: Envoy moves ~14,800 h2c requests/s per core, ~68 us per request for both legs,
~34 us per side including the kernel.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

BODY = b"x" * 100
REQ_HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/svc/M"),
    (b":authority", b"127.0.0.1:9002"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"999m"),
    (b"user-agent", b"grpc-python/1.85.0 grpc-c/50.0.0 (linux; chttp2)"),
]
RESP_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0")]
CLIENT, SERVER = 0, 1
T = TypeVar("T")


def drive(
    n: int,
    batch: int,
    open_client: Callable[[], bytes],
    open_server: Callable[[bytes], bytes],
    client_send: Callable[[int], bytes],
    server_answer: Callable[[bytes], bytes],
    client_read: Callable[[bytes], tuple[int, bytes]],
) -> tuple[float, float]:
    """One engine's client and server sessions, talking through byte strings: the prefaces,
    then `n` requests in batches of `batch`. Each callable is one side's work in its engine
    and returns what that side has to send: `open_client` (its preface and SETTINGS),
    `open_server` (reads the client's, sends its own), `client_send` (k requests),
    `server_answer` (reads requests, answers those complete), `client_read` (reads answers:
    how many streams ended, and what it sends back). (client, server) CPU us per request."""
    cpu = [0.0, 0.0]  # process_time spent by the client, by the server

    def timed(side: int, work: Callable[..., T], *args: Any) -> T:
        t0 = time.process_time()
        out = work(*args)
        cpu[side] += time.process_time() - t0
        return out

    to_server = timed(CLIENT, open_client)
    to_client = timed(SERVER, open_server, to_server)
    _, to_server = timed(CLIENT, client_read, to_client)
    done = 0
    while done < n:
        k = min(batch, n - done)
        to_server += timed(CLIENT, client_send, k)
        to_client = timed(SERVER, server_answer, to_server)
        ended, to_server = timed(CLIENT, client_read, to_client)
        assert ended == k, (ended, k)
        done += k
    return cpu[CLIENT] / n * 1e6, cpu[SERVER] / n * 1e6


def run_h2(n: int, batch: int, validate: bool) -> tuple[float, float]:
    import h2.config
    import h2.connection
    import h2.events

    def config(client: bool) -> h2.config.H2Configuration:
        if validate:
            return h2.config.H2Configuration(client_side=client, header_encoding=None)
        return h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )

    # The connections are made on the clock (in the openings), as the sessions below are.
    made: dict[bool, h2.connection.H2Connection] = {}

    def open_client() -> bytes:
        c = made[True] = h2.connection.H2Connection(config(True))
        c.initiate_connection()
        c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        return c.data_to_send()

    def open_server(to_server: bytes) -> bytes:
        s = made[False] = h2.connection.H2Connection(config(False))
        s.initiate_connection()
        s.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        s.receive_data(to_server)
        return s.data_to_send()

    def client_send(k: int) -> bytes:
        c = made[True]
        for _ in range(k):
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, REQ_HEADERS)
            c.send_data(sid, BODY, end_stream=True)
        return c.data_to_send()

    def server_answer(to_server: bytes) -> bytes:
        s = made[False]
        for ev in s.receive_data(to_server):
            if isinstance(ev, h2.events.DataReceived):
                s.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                sid = ev.stream_id
                s.send_headers(sid, RESP_HEADERS)
                s.send_data(sid, BODY)
                s.send_headers(sid, TRAILERS, end_stream=True)
        return s.data_to_send()

    def client_read(to_client: bytes) -> tuple[int, bytes]:
        c = made[True]
        ended = 0
        for ev in c.receive_data(to_client):
            if isinstance(ev, h2.events.DataReceived):
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended += 1
        return ended, c.data_to_send()

    return drive(n, batch, open_client, open_server, client_send, server_answer, client_read)


def run_engine(n: int, batch: int) -> tuple[float, float]:
    from sidecar.http.h2engine import H2Session, H2Sink

    class Client(H2Sink):
        def __init__(self) -> None:
            self.session: H2Session | None = None
            self.ended = 0

        def on_h2_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
            assert self.session is not None
            if data:
                self.session.consume(stream_id, len(data))

        def on_h2_trailers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
            self.ended += 1

    class Server(H2Sink):
        def __init__(self) -> None:
            self.session: H2Session | None = None

        def on_h2_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
            s = self.session
            assert s is not None
            if data:
                s.consume(stream_id, len(data))
            if end_stream:
                s.send_headers(stream_id, RESP_HEADERS, False)
                s.send_data(stream_id, BODY, False)
                s.send_trailers(stream_id, TRAILERS)

    cs, ss = Client(), Server()
    made: dict[bool, H2Session] = {}  # the sessions, made on the clock (in the openings)

    def open_client() -> bytes:
        c = made[True] = cs.session = H2Session(cs, True)
        c.initiate()
        return c.data_to_send()

    def open_server(to_server: bytes) -> bytes:
        s = made[False] = ss.session = H2Session(ss, False)
        s.initiate()
        s.receive(to_server)
        return s.data_to_send()

    def client_send(k: int) -> bytes:
        c = made[True]
        for _ in range(k):
            sid = c.new_stream_id()
            c.send_headers(sid, REQ_HEADERS, False)
            c.send_data(sid, BODY, True)
        return c.data_to_send()

    def server_answer(to_server: bytes) -> bytes:
        s = made[False]
        s.receive(to_server)
        return s.data_to_send()

    def client_read(to_client: bytes) -> tuple[int, bytes]:
        c = made[True]
        before = cs.ended
        c.receive(to_client)
        return cs.ended - before, c.data_to_send()

    return drive(n, batch, open_client, open_server, client_send, server_answer, client_read)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default="h2,h2-novalidate,nghttp2,nghttp2-abi")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    def abi() -> tuple[float, float]:
        out = subprocess.run(
            [sys.executable, __file__, "-n", str(args.n), "--batch", str(args.batch), "--only",
             "nghttp2", "--raw"], env={**os.environ, "SIDECAR_PURE": "1"},
            capture_output=True, text=True, check=True, timeout=600).stdout.split()
        return float(out[0]), float(out[1])

    cands: dict[str, Callable[[], tuple[float, float]]] = {
        "h2": lambda: run_h2(args.n, args.batch, True),
        "h2-novalidate": lambda: run_h2(args.n, args.batch, False),
        "nghttp2": lambda: run_engine(args.n, args.batch),
        "nghttp2-abi": abi,
    }
    if args.raw:
        cl, sv = cands[args.only]()
        print(cl, sv)
        return
    from sidecar.http import _nghttp2

    print(f"{'engine':<20}{'client us/req':>14}{'server us/req':>14}{'both':>10}")
    for name in args.only.split(","):
        cl, sv = cands[name]()
        label = f"nghttp2 ({_nghttp2.MODE})" if name == "nghttp2" else name
        print(f"{label:<20}{cl:>14.1f}{sv:>14.1f}{cl + sv:>10.1f}")


if __name__ == "__main__":
    main()
