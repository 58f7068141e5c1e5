"""An HTTP/2-only test origin on the `h2` library (python-hyper), in a thread with its own event
loop, on 127.0.0.1. It records what it receives (header lists as sent on the wire, decoded by
`h2`, bodies, which connection carried each stream) and answers by path:

- `/hold` (unless `hold=False`): held until `release_held()` (or until `goaway_at` held
  streams arrived: then GOAWAY with last-stream-id the lowest held stream's, which is
  answered; the others were refused);
- `/big/N`: N bytes, sent as fast as the client's windows allow (`sent[stream]` counts them);
- `/grpc/unavailable`: a gRPC Trailers-Only answer, grpc-status 14;
- `/fields/N`: 200 with N extra response fields of 1000 bytes each (a head over a limit);
- anything else: 200, `origin NAME PATH`, content-length set.

`max_concurrent_streams` is advertised in SETTINGS. `silent=True`: accepts connections and
answers nothing at all (a dead endpoint for keepalive tests).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

from tests.harness import free_port


@dataclass
class Received:
    conn: int
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False


class _Conn(asyncio.Protocol):
    def __init__(self, origin: H2Origin) -> None:
        self.origin = origin
        self.index = 0
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Received] = {}
        self.held: list[int] = []
        self.big: dict[int, int] = {}  # stream -> bytes still to send

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        origin = self.origin
        with origin.lock:
            origin.connections += 1
            self.index = origin.connections
            origin.live.append(self)
        if origin.silent:
            return
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: origin.max_concurrent_streams})
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        with self.origin.lock:
            if self in self.origin.live:
                self.origin.live.remove(self)

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def data_received(self, data: bytes) -> None:
        origin = self.origin
        if origin.silent:
            return
        try:
            events = self.h2.receive_data(data)
        except Exception:  # noqa: BLE001 (a test origin: drop the connection)
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                rec = Received(self.index, ev.stream_id, list(ev.headers))
                self.streams[ev.stream_id] = rec
                with origin.lock:
                    origin.received.append(rec)
                if ev.stream_ended:
                    self.request_done(rec)
            elif isinstance(ev, h2.events.DataReceived):
                rec2 = self.streams.get(ev.stream_id)
                if rec2 is not None:
                    rec2.body += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_ended and rec2 is not None:
                    self.request_done(rec2)
            elif isinstance(ev, h2.events.StreamEnded):
                rec3 = self.streams.get(ev.stream_id)
                if rec3 is not None and not rec3.ended:
                    self.request_done(rec3)
            elif isinstance(ev, h2.events.WindowUpdated):
                self.push_big()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                # The client's GOAWAY: the `h2` library then refuses to send anything, where
                # RFC 9113 (and every real server) lets the open streams finish. Keep serving.
                self.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
                with origin.lock:
                    origin.goaways += 1
            elif isinstance(ev, h2.events.StreamReset):
                self.big.pop(ev.stream_id, None)
                with origin.lock:
                    origin.resets.append(ev.stream_id)
        self.flush()

    def request_done(self, rec: Received) -> None:
        rec.ended = True
        path = dict(rec.headers).get(b":path", b"/")
        sid = rec.stream_id
        origin = self.origin
        if path == b"/hold" and origin.hold:
            self.held.append(sid)
            if origin.goaway_at and len(self.held) >= origin.goaway_at:
                # The lowest stream id, not the first to end: a request's body may end after
                # a later stream's whole request did (the sidecar opens a stream at the head).
                first = min(self.held)
                # GOAWAY first, framed by hand (h2 sends nothing more after its own), then
                # the answer to the stream it lets finish.
                self.flush()
                goaway = (b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"
                          + first.to_bytes(4, "big") + b"\x00\x00\x00\x00")
                if self.transport is not None:
                    self.transport.write(goaway)
                self.answer(first, b"held %d" % first)
                self.held = []
            return
        if path.startswith(b"/big/"):
            n = int(path[5:])
            self.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % n)])
            self.big[sid] = n
            self.push_big()
            return
        if path == b"/grpc/unavailable":
            self.h2.send_headers(sid, [(b":status", b"200"),
                                       (b"content-type", b"application/grpc"),
                                       (b"grpc-status", b"14"),
                                       (b"grpc-message", b"go elsewhere")], end_stream=True)
            return
        if path.startswith(b"/fields/"):
            fields = [(b"x-f-%d" % i, b"f" * 1000) for i in range(int(path[8:]))]
            self.h2.send_headers(sid, [(b":status", b"200"), *fields], end_stream=True)
            return
        self.answer(sid, b"origin %s %s" % (origin.name.encode(), path))

    def answer(self, sid: int, body: bytes) -> None:
        self.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % len(body)),
                                   (b"content-type", b"text/plain")])
        self.h2.send_data(sid, body, end_stream=True)

    def push_big(self) -> None:
        for sid, left in list(self.big.items()):
            while left > 0:
                window = min(self.h2.local_flow_control_window(sid),
                             self.h2.max_outbound_frame_size)
                if window <= 0:
                    break
                n = min(window, left)
                self.h2.send_data(sid, b"b" * n, end_stream=(n == left))
                left -= n
                with self.origin.lock:
                    self.origin.sent[sid] = self.origin.sent.get(sid, 0) + n
            if left:
                self.big[sid] = left
            else:
                del self.big[sid]

    def release_held(self) -> None:
        for sid in self.held:
            self.answer(sid, b"held %d" % sid)
        self.held = []
        self.flush()


class H2Origin:
    def __init__(self, name: str = "o", max_concurrent_streams: int = 100, goaway_at: int = 0,
                 silent: bool = False, hold: bool = True) -> None:
        self.name = name
        self.hold = hold
        self.max_concurrent_streams = max_concurrent_streams
        self.goaway_at = goaway_at
        self.silent = silent
        self.lock = threading.Lock()
        self.connections = 0
        self.live: list[_Conn] = []
        self.received: list[Received] = []
        self.resets: list[int] = []
        self.goaways = 0  # GOAWAY frames received from clients
        self.sent: dict[int, int] = {}
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._server = await self.loop.create_server(lambda: _Conn(self), "127.0.0.1",
                                                         self.port)
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def start(self) -> H2Origin:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("h2 origin did not start")
        return self

    def call(self, fn: Any) -> None:
        """Run `fn()` on the origin's loop and wait for it."""
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        if not done.wait(10):
            raise RuntimeError("h2 origin loop stuck")

    def release_held(self) -> None:
        self.call(lambda: [c.release_held() for c in list(self.live)])

    def stop(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for c in list(self.live):
                if c.transport is not None:
                    c.transport.abort()

        fut = asyncio.run_coroutine_threadsafe(stop(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextmanager
def h2_origin(**kwargs: Any) -> Iterator[H2Origin]:
    origin = H2Origin(**kwargs).start()
    try:
        yield origin
    finally:
        origin.stop()
