"""HTTP/2 to the endpoints: a multiplexed connection (a `Carrier`) and its streams (each an
`EndpointStream`, one try of one request), over the sans-IO engine of `sidecar.http.h2engine`.

The pool holds `H2Connection`s as carriers; `capacity()` is the peer's
SETTINGS_MAX_CONCURRENT_STREAMS (capped by `http2.max_concurrent_streams`) less the open
streams, so the pool opens a second connection only when the first is full (nghttp2 would
queue requests beyond the peer's limit rather than refuse them: the pool must not ask).

The exchange sees an `H2Stream` exactly as it sees an HTTP/1.1 connection: `send_head`,
`send_body`, `send_end` out; `on_response_head`, `on_response_body`, `on_response_end` back
through its `EndpointUser`. Translation, both ways (SPEC section 11): the request head becomes
`:method`, `:scheme`, `:authority` (the HTTP/1.1 `Host`), `:path` and the end-to-end fields
lowercased (hop-by-hop fields never reach here: the parser left them out of `forward`); the
response's `:status` and fields become a `ResponseHead` whose framing the app's leg chooses
(Content-Length when the endpoint sent one, else chunked for an HTTP/1.1 app).

gRPC: `te: trailers` is sent, and the remaining deadline as `grpc-timeout` (recomputed per
try: the exchange passes the deadline left for this try). A Trailers-Only answer (HEADERS with
END_STREAM and `grpc-status`) is given to the exchange as a head (whose `headers` keep
`grpc-status`, so the retry policy can see it) and trailers (`grpc-status`, `grpc-message`,
`grpc-status-details-bin`), which the app's leg writes as trailers.

Flow control is tied to the consumer: DATA is given back to the engine (`consume`, which
opens the windows) as soon as it is handed to the exchange, unless the exchange paused the
response (the app cannot take more): then the bytes are owed and returned on resume. A slow
app therefore holds at most about one stream window per stream in the sidecar.

Endings: GOAWAY from the endpoint retires the connection (no new streams); streams above its
last-stream-id come back from the engine as REFUSED_STREAM and fail with `UpstreamRefused`
(`never_processed`: retried anywhere whatever the method); the others finish, then the
connection closes. `retire` (max_lifetime, rotation) does the same from our side. An idle
connection is PINGed every `keepalive_interval` when nothing was read for that long; no ACK
within `keepalive_timeout` and it is aborted. A response head or trailers over the limits
advertised to the endpoint (MAX_RESPONSE_HEADER_BYTES, MAX_RESPONSE_HEADERS) fails its stream
only (`bad_upstream_response`), as a malformed head does.

Compiled with mypyc (setup.py): the classes implement `sidecar.streams`' traits directly.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Final, cast

from sidecar.errors import BadUpstreamResponse, UpstreamError, UpstreamRefused, UpstreamReset
from sidecar.flow_control import WRITE_HIGH_WATER, WRITE_LOW_WATER
from sidecar.grpc import format_timeout, is_grpc
from sidecar.http.h2engine import REFUSED_STREAM, H2ProtocolError, H2Session, H2Sink
from sidecar.http.headers import HOP_BY_HOP, Headers
from sidecar.http.parser import RequestHead, ResponseHead
from sidecar.streams import (
    CARRIER_TRANSITIONS,
    Carrier,
    CarrierOwner,
    CarrierState,
    EndpointStream,
    EndpointUser,
)
from sidecar.upstream.connection import reset as reset_transport
from sidecar.upstream.connection import set_nodelay
from sidecar.upstream.h2settings import H2Settings

# Request fields never sent in HTTP/2 (RFC 9113 section 8.2.2), besides those the parser
# already left out of `forward`: `host` becomes `:authority`.
_DROP_OUT: Final = HOP_BY_HOP | frozenset({b"host", b"grpc-timeout", b"x-sidecar-deadline-ms"})
# Response fields an HTTP/2 endpoint must not send; dropped if it does. content-length is read
# into the head and re-emitted by the app's leg from the framing it chooses.
_DROP_IN: Final = HOP_BY_HOP
# What a Trailers-Only gRPC answer carries that belongs in trailers.
_GRPC_TRAILER_FIELDS: Final = frozenset(
    {b"grpc-status", b"grpc-message", b"grpc-status-details-bin"}
)
# Request body bytes held for a stream whose window is shut, beyond which the exchange is
# asked to stop reading the app (as a socket's write buffer high-water mark).
_HELD_HIGH: Final = WRITE_HIGH_WATER
_HELD_LOW: Final = WRITE_LOW_WATER
CANCEL: Final = 0x8
NO_ERROR: Final = 0x0
# The response header limits advertised to endpoints (SETTINGS_MAX_HEADER_LIST_SIZE): a head or
# trailers over them fail that stream (bad_upstream_response); the engine's defaults.
MAX_RESPONSE_HEADER_BYTES: Final = 65536
MAX_RESPONSE_HEADERS: Final = 200


def request_fields(
    head: RequestHead, scheme: bytes, authority: bytes, deadline_ms: int
) -> tuple[Headers, bool]:
    """The HTTP/2 header list for `head` (pseudo-fields first, names lowercased), and whether
    it is gRPC. `deadline_ms` >= 0: sent as `x-sidecar-deadline-ms`, and for gRPC as
    `grpc-timeout` (replacing the app's: the deadline left now is what counts)."""
    fields: Headers = [
        (b":method", head.method),
        (b":scheme", scheme),
        (b":authority", authority),
        (b":path", head.target or b"/"),
    ]
    grpc = False
    app_timeout: bytes | None = None
    for name, value in head.forward:
        low = name.lower()
        if low in _DROP_OUT:
            if low == b"grpc-timeout":
                app_timeout = value
            continue
        if low == b"content-type" and is_grpc(value):
            grpc = True
        fields.append((low, value))
    if head.content_length is not None:
        fields.append((b"content-length", b"%d" % head.content_length))
    if grpc or _wants_trailers(head):
        fields.append((b"te", b"trailers"))
    if deadline_ms >= 0:
        if grpc:
            fields.append((b"grpc-timeout", format_timeout(deadline_ms / 1000.0)))
        fields.append((b"x-sidecar-deadline-ms", b"%d" % deadline_ms))
    elif app_timeout is not None:
        fields.append((b"grpc-timeout", app_timeout))
    return fields, grpc


def _wants_trailers(head: RequestHead) -> bool:
    for name, value in head.headers:
        if name.lower() == b"te" and b"trailers" in value.lower():
            return True
    return False


def response_head(fields: Headers, head_request: bool, end_stream: bool,
                  grpc: bool) -> tuple[ResponseHead, Headers | None]:
    """An HTTP/2 response's header list as a `ResponseHead`, and the trailers a gRPC
    Trailers-Only answer carries (None otherwise). Raises BadUpstreamResponse."""
    status = -1
    forward: Headers = []
    seen: Headers = []
    trailers: Headers | None = None
    content_length: int | None = None
    for name, value in fields:
        if name[:1] == b":":
            if name == b":status" and len(value) == 3 and value.isdigit():
                status = int(value)
            continue
        seen.append((name, value))
        if name in _DROP_IN:
            if name == b"content-length":
                if not value.isdigit() or len(value) > 18:
                    raise BadUpstreamResponse(f"bad content-length {value!r}")
                content_length = int(value)
            continue
        if grpc and end_stream and name in _GRPC_TRAILER_FIELDS:
            if trailers is None:
                trailers = []
            trailers.append((name, value))
            continue
        forward.append((name, value))
    if status < 100:
        raise BadUpstreamResponse("HTTP/2 response without a valid :status")
    head = ResponseHead()
    head.status = status
    head.headers = seen
    head.forward = forward
    if content_length is not None:
        head.content_length = content_length
    if head_request or status < 200 or status == 204 or status == 304:
        head.bodyless = True
    elif end_stream and content_length is None and trailers is None:
        head.content_length = 0  # nothing follows: say so rather than frame a chunked nothing
    if trailers is not None:
        for name, value in trailers:
            if name == b"grpc-status" and value.isdigit() and len(value) < 4:
                head.grpc_status = int(value)
    return head, trailers


_UNCONNECTED: list[H2Session] = []


def _unconnected() -> H2Session:
    """The session of every `H2Connection` not connected yet: closed, so that whatever calls
    it does nothing (or raises H2ProtocolError, for a stream), as on a closed connection."""
    if not _UNCONNECTED:
        session = H2Session(H2Sink(), True)
        session.close()
        _UNCONNECTED.append(session)
    return _UNCONNECTED[0]


class H2Stream(EndpointStream):
    """One try of one request on an `H2Connection`."""

    __slots__ = ("conn", "user", "sid", "method", "grpc", "_taken_at", "_response_begun",
                 "local_done", "remote_done", "ended", "paused", "owed", "held", "held_bytes",
                 "held_end", "held_trailers", "write_paused", "reuse_index")

    def __init__(self, conn: H2Connection, user: EndpointUser, method: bytes, now: float,
                 reuse_index: int) -> None:
        self.conn = conn
        self.user: EndpointUser | None = user
        self.sid = 0  # given at send_head (the engine needs the HEADERS right after the id)
        self.method = method
        self.grpc = False
        self._taken_at = now
        self._response_begun = False
        self.local_done = False
        self.remote_done = False
        self.ended = False  # release/reset/error: the connection forgot it
        self.paused = False  # the exchange paused the response
        self.owed = 0  # response bytes delivered while paused, not yet given back
        self.held: list[bytes] = []  # request body the windows did not take yet
        self.held_bytes = 0
        self.held_end = False
        self.held_trailers: Headers | None = None
        self.write_paused = False
        self.reuse_index = reuse_index

    def __repr__(self) -> str:
        return f"<H2Stream {self.conn.key} #{self.sid}>"

    # --- what retry classification reads -------------------------------------------------------
    def endpoint(self) -> str:
        return self.conn.key

    def reused(self) -> bool:
        return self.reuse_index > 1

    def race_lost(self, now: float) -> None:
        pass  # HTTP/2 has no keep-alive race: a closing endpoint sends GOAWAY

    def writing_paused(self) -> bool:
        return self.write_paused or self.conn.write_paused

    # --- the request ---------------------------------------------------------------------------
    def send_head(
        self, head: RequestHead, authority: bytes, deadline_ms: int,
        body: list[bytes] | None, end: bool, trailers: Headers | None,
    ) -> None:
        conn = self.conn
        fields, self.grpc = request_fields(head, conn.settings.scheme, authority, deadline_ms)
        if self.ended:
            return
        session = conn.session
        only_head = end and not body and not trailers
        try:
            sid = session.new_stream_id()
            session.send_headers(sid, fields, only_head)
        except H2ProtocolError as exc:
            conn.fail_all(UpstreamReset(f"HTTP/2: {exc}"))
            return
        self.sid = sid
        conn.opening -= 1
        conn.streams[sid] = self
        if only_head:
            self.local_done = True
        else:
            if body:
                for piece in body:
                    self._out(piece)
            if end:
                self._finish_request(trailers)
        conn.flush()

    def send_body(self, data: bytes) -> None:
        if self.ended or self.local_done:
            return
        self._out(data)
        self.conn.flush()

    def send_end(self, trailers: Headers | None) -> None:
        if self.ended or self.local_done:
            return
        self._finish_request(trailers)
        self.conn.flush()

    def _out(self, data: bytes) -> None:
        if not data:
            return
        if self.held:
            self.held.append(data)
            self.held_bytes += len(data)
        else:
            taken = self.conn.session.send_data(self.sid, data, False)
            if taken < len(data):
                rest = data[taken:]
                self.held.append(rest)
                self.held_bytes += len(rest)
        if self.held_bytes > _HELD_HIGH and not self.write_paused:
            self.write_paused = True
            user = self.user
            if user is not None:
                user.on_upstream_pause_writing()

    def _finish_request(self, trailers: Headers | None) -> None:
        self.local_done = True
        if self.held:
            self.held_end = True
            self.held_trailers = trailers
            return
        self._end_out(trailers)

    def _end_out(self, trailers: Headers | None) -> None:
        session = self.conn.session
        if trailers:
            session.send_trailers(self.sid, [(n.lower(), v) for n, v in trailers])
        else:
            session.send_data(self.sid, b"", True)

    def window_open(self) -> None:
        """The engine says the windows opened: send what is held."""
        held = self.held
        if not held or self.ended:
            return
        session = self.conn.session
        while held:
            piece = held[0]
            taken = session.send_data(self.sid, piece, False)
            self.held_bytes -= taken
            if taken < len(piece):
                held[0] = piece[taken:]
                break
            held.pop(0)
        if not held and self.held_end:
            self.held_end = False
            trailers, self.held_trailers = self.held_trailers, None
            self._end_out(trailers)
        if self.write_paused and self.held_bytes <= _HELD_LOW:
            self.write_paused = False
            user = self.user
            if user is not None and not self.conn.write_paused:
                user.on_upstream_resume_writing()

    # --- the response's flow -------------------------------------------------------------------
    def pause_response(self) -> None:
        self.paused = True

    def resume_response(self) -> None:
        if not self.paused:
            return
        self.paused = False
        owed = self.owed
        if owed and not self.ended:
            self.owed = 0
            self.conn.session.consume(self.sid, owed)
            self.conn.flush()

    # --- endings -------------------------------------------------------------------------------
    def release(self, now: float, reusable: bool) -> None:
        if self.ended:
            return
        self.user = None
        if not (self.local_done and self.remote_done):
            # An early answer: the request's rest will not be sent. End the stream.
            self.conn.session.reset(self.sid, CANCEL if self.sid else NO_ERROR)
        self.conn.stream_done(self, now)
        self.conn.owner.stream_released(self.conn, now, True)
        self.conn.flush()
        self.conn.maybe_close()

    def reset(self, reason: str) -> None:
        if self.ended:
            return
        self.user = None
        if self.sid and not (self.local_done and self.remote_done):
            self.conn.session.reset(self.sid, CANCEL)
        self.conn.stream_done(self, self.conn.owner.now())
        self.conn.owner.stream_reset(self.conn, reason)
        self.conn.flush()
        self.conn.maybe_close()

    def detach(self) -> asyncio.Transport | None:
        self.reset("error")  # HTTP/2 carries no tunnels (CONNECT is refused upstream)
        return None

    # --- from the connection -------------------------------------------------------------------
    def on_headers(self, fields: Headers, end_stream: bool) -> None:
        user = self.user
        if user is None:
            return
        self._response_begun = True
        head, trailers = response_head(fields, self.method == b"HEAD", end_stream, self.grpc)
        if head.status < 200:
            if head.status != 101:
                user.on_response_head(head)
            return
        if end_stream:
            self.remote_done = True
        user.on_response_head(head)
        if end_stream and self.user is not None:
            self.user.on_response_end(trailers)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        user = self.user
        if end_stream:
            self.remote_done = True
        if user is None:
            if data:
                self.conn.session.consume(self.sid, len(data))
            return
        if data:
            if self.paused:
                self.owed += len(data)
            else:
                self.conn.session.consume(self.sid, len(data))
            user.on_response_body(data)
        if end_stream and self.user is not None:
            self.user.on_response_end(None)

    def on_trailers(self, fields: Headers) -> None:
        self.remote_done = True
        user = self.user
        if user is not None:
            user.on_response_end([(n, v) for n, v in fields if n[:1] != b":"])

    def fail(self, exc: UpstreamError) -> None:
        """The stream failed (reset by the peer, refused, connection lost): tell the user
        once; the connection already forgot the stream."""
        user = self.user
        self.user = None
        if user is not None:
            try:
                user.on_upstream_error(exc)
            except Exception as failure:  # noqa: BLE001 (the user answers for itself)
                user.on_internal_error(failure)


class H2Connection(H2Sink, Carrier, asyncio.Protocol):
    """One HTTP/2 connection to an endpoint, carrying up to its capacity of streams."""

    def __init__(self, owner: CarrierOwner, key: str, now: float, expires_at: float,
                 settings: H2Settings) -> None:
        self.owner = owner
        self.key = key
        self.settings = settings
        self.state = CarrierState.CONNECTING
        self.transport: asyncio.Transport | None = None
        # Made at connection_made: a connect that fails allocates no nghttp2 session (nor the
        # cycle a session makes with its sink). Until then, a closed one, inert.
        self.session = _unconnected()
        self.streams: dict[int, H2Stream] = {}
        self.opening = 0  # streams handed out whose HEADERS are not sent yet
        self.created_at = now
        self.expires_at = expires_at
        self._idle_since = now
        self.opened = 0  # streams ever opened
        self.reusable = True  # False once retiring (GOAWAY either way, error)
        self.close_reason = ""
        self.write_paused = False
        self.peer_max = 100  # the peer's SETTINGS_MAX_CONCURRENT_STREAMS once known
        self.last_read = now
        self.ping_due = math.inf  # when an unanswered PING makes the connection dead
        self._in_read = False
        self._flush_due = False  # a write is scheduled for the end of this loop iteration
        self._timer: asyncio.TimerHandle | None = None
        self.on_capacity: Callable[[H2Connection], None] | None = None  # the pool's hook
        # Done once the peer's first SETTINGS arrived (or the connection closed): the pool
        # hands out streams only then, so that it knows the peer's stream limit.
        self.settings_seen: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<H2Connection {self.key} {self.state.name} streams={len(self.streams)}>"

    def _transition(self, new: CarrierState) -> None:
        if new not in CARRIER_TRANSITIONS[self.state]:
            raise RuntimeError(f"connection {self.key}: {self.state.name} -> {new.name}")
        self.state = new

    # --- Carrier ---------------------------------------------------------------------------------
    def protocol(self) -> str:
        return "http2"

    def stream_count(self) -> int:
        return len(self.streams) + self.opening

    def capacity(self) -> int:
        if not self.reusable or self.state not in (CarrierState.IDLE, CarrierState.ACTIVE):
            return 0
        cap = self.settings.max_concurrent_streams
        if self.peer_max < cap:
            cap = self.peer_max
        left = cap - len(self.streams) - self.opening
        return left if left > 0 else 0

    def open_stream(self, user: EndpointUser, method: bytes, now: float) -> EndpointStream:
        if self.state is CarrierState.IDLE:
            self._transition(CarrierState.ACTIVE)
        self.opened += 1
        self.opening += 1
        return H2Stream(self, user, method, now, self.opened)

    def usable(self, now: float, idle_timeout: float) -> bool:
        return self.capacity() > 0 and now < self.expiry(idle_timeout)

    def expiry(self, idle_timeout: float) -> float:
        if self.state is CarrierState.IDLE:
            when = self._idle_since + idle_timeout
            return self.expires_at if self.expires_at < when else when
        return self.expires_at

    def idle_for(self, now: float) -> float:
        return now - self._idle_since if self.state is CarrierState.IDLE else 0.0

    def streams_opened(self) -> int:
        return self.opened

    def peer_gone(self) -> bool:
        return False  # a closing HTTP/2 endpoint says so with GOAWAY

    def connected(self, now: float) -> None:
        if self.state is CarrierState.CONNECTING:
            self._transition(CarrierState.IDLE)
        self._idle_since = now

    def parked(self, now: float) -> None:
        pass

    def tls_session_due(self) -> asyncio.Transport | None:
        return None

    def tls_handshake(self) -> bool | None:
        """Whether its TLS session was resumed (None: not TLS)."""
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return None
        return bool(ssl_object.session_reused)

    def retire(self, reason: str) -> None:
        """No new streams: GOAWAY to the endpoint; the open ones finish, then it closes."""
        if self.state is CarrierState.CLOSED:
            return
        self.close_reason = self.close_reason or reason
        if self.reusable:
            self.reusable = False
            self.session.goaway(NO_ERROR, 0)
            self.flush()
        self.maybe_close()

    def close(self, reason: str) -> None:
        if self.state is CarrierState.CLOSED:
            return
        self.close_reason = self.close_reason or reason
        self.reusable = False
        if self.transport is not None:
            if not self.session.goaway_received:
                self.session.goaway(NO_ERROR, 0)
            self._flush_now()  # what is framed goes before the FIN
            self.transport.close()
        else:
            self._closed(None)

    def abort(self, reason: str) -> None:
        if self.state is CarrierState.CLOSED:
            return
        self.close_reason = self.close_reason or reason
        self.reusable = False
        if self.transport is not None:
            reset_transport(self.transport)
        else:
            self._closed(None)

    # --- streams ---------------------------------------------------------------------------------
    def stream_done(self, stream: H2Stream, now: float) -> None:
        """`stream` ended (released or reset): forget it."""
        if stream.ended:
            return
        stream.ended = True
        if stream.sid:
            self.streams.pop(stream.sid, None)
        else:
            self.opening -= 1
        if not self.streams and not self.opening and self.state is CarrierState.ACTIVE:
            self._transition(CarrierState.IDLE)
            self._idle_since = now

    def maybe_close(self) -> None:
        """A retiring connection closes once its last stream is done."""
        if (not self.reusable and not self.streams and not self.opening
                and self.state in (CarrierState.IDLE, CarrierState.ACTIVE)):
            self.close(self.close_reason or "not_reusable")

    def fail_all(self, exc: UpstreamError) -> None:
        """The connection failed: every stream fails, the connection is aborted."""
        streams = list(self.streams.values())
        self.streams.clear()
        self.reusable = False
        for stream in streams:
            stream.ended = True
        self.abort("error")
        for stream in streams:
            stream.fail(exc)

    def flush(self) -> None:
        """Write what the engine has framed, once per loop iteration: every stream that sent
        something meanwhile (the requests of 64 app connections read in one iteration) goes
        out in one write, not one each (a syscall per request was a quarter of the sidecar's
        CPU under h2load). During a read, at the read's end."""
        if self._in_read or self._flush_due or self.transport is None:
            return
        self._flush_due = True
        asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            out = self.session.data_to_send()
        except H2ProtocolError as exc:
            self.fail_all(UpstreamReset(f"HTTP/2: {exc}"))
            return
        if out:
            transport.write(out)

    # --- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        set_nodelay(transport)
        self.settings_seen = asyncio.get_running_loop().create_future()
        self.session = H2Session(self, True, max_concurrent_streams=100,
                                 initial_window=self.settings.initial_window,
                                 max_header_bytes=MAX_RESPONSE_HEADER_BYTES,
                                 max_headers=MAX_RESPONSE_HEADERS)
        self.session.initiate()
        self._flush_now()
        self.last_read = self.owner.now()
        self._arm(self.settings.keepalive_interval)

    def data_received(self, data: bytes) -> None:
        self.last_read = self.owner.now()
        self._in_read = True
        try:
            self.session.receive(data)
        except H2ProtocolError as exc:
            self._in_read = False
            out = self.session.data_to_send()
            if out and self.transport is not None:
                self.transport.write(out)
            self.fail_all(UpstreamReset(f"HTTP/2 protocol error from the endpoint: {exc}"))
            return
        finally:
            self._in_read = False
        self._flush_now()

    def eof_received(self) -> bool:
        self.reusable = False
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed(exc)

    def _closed(self, exc: Exception | None) -> None:
        if self.state is CarrierState.CLOSED:
            return
        was_idle = self.state is CarrierState.IDLE
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transition(CarrierState.CLOSED)
        seen = self.settings_seen
        if seen is not None and not seen.done():
            seen.set_result(None)
        if not self.close_reason:
            self.close_reason = "remote_closed"
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.ended = True
        detail = f"connection lost: {exc}" if exc else "upstream closed the connection"
        for stream in streams:
            stream.fail(UpstreamReset(detail))
        # Free nghttp2's memory now and break the session <-> connection cycle.
        self.session.close()
        self.owner.carrier_closed(self, was_idle)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            user = stream.user
            if user is not None:
                user.on_upstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            user = stream.user
            if user is not None and not stream.write_paused:
                user.on_upstream_resume_writing()

    # --- keepalive -------------------------------------------------------------------------------
    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.state is CarrierState.CLOSED:
            return
        now = self.owner.now()
        settings = self.settings
        if self.ping_due != math.inf:
            if now >= self.ping_due:
                self.close_reason = self.close_reason or "timeout"  # no PING ACK: dead
                self.fail_all(UpstreamReset("HTTP/2 PING not answered: connection dead"))
                return
            self._arm(self.ping_due - now)
            return
        quiet = now - self.last_read
        if quiet >= settings.keepalive_interval:
            self.session.ping()
            self.flush()
            self.ping_due = now + settings.keepalive_timeout
            self._arm(settings.keepalive_timeout)
        else:
            self._arm(settings.keepalive_interval - quiet)

    # --- H2Sink ----------------------------------------------------------------------------------
    def on_h2_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                      end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        try:
            stream.on_headers(headers, end_stream)
        except BadUpstreamResponse as exc:
            self._bad_response(stream, exc)
            return
        except Exception as exc:  # noqa: BLE001 (a bug under the user's callbacks)
            self._user_failed(stream, exc)
            return

    def on_h2_too_large(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                        end_stream: bool, trailers: bool) -> None:
        """A response head or trailers over the limits we advertised: that stream fails
        (bad_upstream_response), the connection's other streams go on."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            what = "trailers" if trailers else "head"
            self._bad_response(stream, BadUpstreamResponse(
                f"HTTP/2 response {what} over {MAX_RESPONSE_HEADER_BYTES} bytes or "
                f"{MAX_RESPONSE_HEADERS} fields"))

    def _bad_response(self, stream: H2Stream, exc: BadUpstreamResponse) -> None:
        """The endpoint's answer on this stream cannot be read: reset it (PROTOCOL_ERROR) and
        fail the try."""
        self.streams.pop(stream.sid, None)
        stream.ended = True
        self.session.reset(stream.sid, 0x1)
        stream.fail(exc)
        self._after_stream_end(stream)

    def on_h2_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            if data:
                self.session.consume(stream_id, len(data))
            return
        try:
            stream.on_data(data, end_stream)
        except Exception as exc:  # noqa: BLE001
            self._user_failed(stream, exc)

    def on_h2_trailers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        try:
            stream.on_trailers(headers)
        except Exception as exc:  # noqa: BLE001
            self._user_failed(stream, exc)

    def _after_stream_end(self, stream: H2Stream) -> None:
        owner = self.owner
        owner.stream_reset(self, "error")
        if not self.streams and not self.opening and self.state is CarrierState.ACTIVE:
            self._transition(CarrierState.IDLE)
            self._idle_since = owner.now()
        self.maybe_close()

    def _user_failed(self, stream: H2Stream, exc: Exception) -> None:
        user = stream.user
        stream.user = None
        if not stream.ended:
            stream.ended = True
            self.streams.pop(stream.sid, None)
            self.session.reset(stream.sid, CANCEL)
            self._after_stream_end(stream)
        if user is not None:
            user.on_internal_error(exc)

    def on_h2_reset(self, stream_id: int, error_code: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.remote_done:
            # The response was whole; the endpoint stops our upload (RFC 9113 section 8.1):
            # the stream ends as usual when the exchange releases it.
            stream.local_done = True
            stream.held.clear()
            stream.held_bytes = 0
            return
        del self.streams[stream_id]
        stream.ended = True
        if error_code == REFUSED_STREAM:
            exc: UpstreamError = UpstreamRefused(
                f"{self.key}: HTTP/2 stream refused (never processed)")
        else:
            exc = UpstreamReset(f"{self.key}: HTTP/2 stream reset by the endpoint "
                                f"(code {error_code})")
        self._after_stream_end(stream)
        stream.fail(exc)

    def on_h2_window_open(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.window_open()
            return
        for stream in list(self.streams.values()):
            if stream.held:
                stream.window_open()

    def on_h2_goaway(self, last_stream_id: int, error_code: int) -> None:
        # Streams above last_stream_id come back as REFUSED_STREAM from the engine; the rest
        # finish. No new stream from here on.
        self.reusable = False
        self.close_reason = self.close_reason or "remote_closed"  # its GOAWAY
        self.maybe_close()
        if self.on_capacity is not None:
            self.on_capacity(self)

    def on_h2_ping_ack(self) -> None:
        self.ping_due = math.inf
        self._arm(self.settings.keepalive_interval)

    def on_h2_settings(self, peer_max_concurrent_streams: int) -> None:
        grew = peer_max_concurrent_streams > self.peer_max
        self.peer_max = peer_max_concurrent_streams
        seen = self.settings_seen
        if seen is not None and not seen.done():
            seen.set_result(None)
        if grew and self.on_capacity is not None:
            self.on_capacity(self)

    def on_h2_abuse(self, kind: str) -> None:
        pass  # an endpoint flooding us: the engine raises, data_received fails the streams

