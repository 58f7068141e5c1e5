"""The app-facing HTTP/2 leg (h2c with prior knowledge, SPEC section 11 "From the app").

`H2AppConnection` is the `asyncio.Protocol` of one app connection whose first bytes were the
HTTP/2 preface (downstream/sniff.py decides); it owns an `H2Session` (http/h2engine.py) and
moves bytes and timers only. Each request stream is an `H2AppStream`, the `AppStream` of one
`Exchange`: the same exchange, router, policies, errors, metrics and access log as an
HTTP/1.1 request (downstream/protocol.py), `:authority` playing the part of `Host`.

Flow control is tied to the consumer, both ways:
- the app's request body: each DATA chunk goes to the exchange at once, and its bytes are
  given back to the app's windows (`consume`) only while the exchange has not paused the
  request (`pause_request`: no endpoint stream yet, or the endpoint's write side is full).
  So an app uploading faster than the endpoint reads holds at most about one stream window
  (and the connection window) in the sidecar.
- the response: `send_data` takes what the app's windows allow; the rest waits here and the
  exchange is told to stop reading the endpoint (`app_write_paused`) until the app opens its
  window again (`on_h2_window_open`) or the socket drains (`resume_writing`). A stream that
  cannot send anything for `limits.idle_timeout` is reset (a zero-window stall, counted).

Writes are corked: frames queued while one read of the app's is processed leave in one
`transport.write` at its end; frames queued from anywhere else (endpoint reads, timers, pool
callbacks) leave in one write at the end of the loop round (`flush_soon`), so the answers of
every endpoint read in one round share a write.

A response head is held until its first body byte, its end, or that flush, so that a bodyless
answer whose end follows at once (a gRPC Trailers-Only answer from an endpoint) leaves as one
HEADERS frame with END_STREAM, which tells the app's gRPC library that no message came.

gRPC (content-type `application/grpc...`): `grpc-timeout` sets the request deadline (the
smallest of it, `x-sidecar-timeout-ms` and the cluster's `timeouts.request`; the endpoint side
sends what is left as `grpc-timeout`, so the app's own field is not forwarded), and the
sidecar's own errors are Trailers-Only answers (sidecar/grpc.py).

Drain (SPEC sections 6 and 11): while the drain admits requests, streams are served as usual;
a stream the drain refuses is reset with REFUSED_STREAM (never processed: the app's client may
send it elsewhere) and the connection gets GOAWAY, as it does from `close_if_idle`; open
streams finish, then the connection closes.

Limits: a stream beyond `limits.max_concurrent_streams` is refused by the engine
(REFUSED_STREAM) before it reaches here; a head over `limits.max_header_bytes` or
`max_headers` arrives as `on_h2_too_large` and is answered 431 `header_too_large` on its
stream (a gRPC call: SPEC 11's Trailers-Only answer), never routed.

Abuse: the engine detects rapid reset, CONTINUATION floods, HPACK bombs, SETTINGS and PING
floods (`on_h2_abuse`, GOAWAY ENHANCE_YOUR_CALM queued); each is counted per listener, the
GOAWAY written and the connection closed.

Counters the drain reads, as in protocol.py: the listener's in-flight count changes only in
`H2AppStream._begin` (+1) and `_exchange_over` (-1), its connection count only in
`connection_made` and `connection_lost`.

Compiled with mypyc (setup.py): the classes implement `sidecar.streams`' traits directly; the
engine's callbacks (compiled too) reach them through `H2Sink`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Final, cast

from sidecar.clock import MONOTONIC, Clock
from sidecar.downstream.context import ListenerContext
from sidecar.downstream.exchange import Exchange, Phase
from sidecar.errors import HeadTooLarge, ProtocolError, SidecarError
from sidecar.flow_control import WRITE_HIGH_WATER, WRITE_LOW_WATER
from sidecar.grpc import error_headers, is_grpc, parse_timeout
from sidecar.http.h2engine import H2ProtocolError, H2Session, H2Sink
from sidecar.http.headers import Headers
from sidecar.http.parser import RequestHead, ResponseHead
from sidecar.log import Throttled
from sidecar.rescue import error_body, internal_error
from sidecar.streams import AppExchange, AppStream, Cancellable
from sidecar.upstream.connection import reset, set_nodelay

_ABUSE_LOG: Final = Throttled(logging.getLogger("sidecar.http2"), interval=10.0)

NO_ERROR: Final = 0x0
INTERNAL_ERROR: Final = 0x2
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8

# Request fields the sidecar reads itself, by kind; 0 (any other name): forwarded unchanged.
# nghttp2 already refused connection-specific fields (RFC 9113 8.2.2), upper-case names and
# a `te` other than `trailers`; what is dropped here is what HTTP/1.1's parser drops too.
_DROP: Final = 1
_HOST: Final = 2
_CONTENT_LENGTH: Final = 3
_COOKIE: Final = 4
_IDEMPOTENCY_KEY: Final = 5
_TIMEOUT_MS: Final = 6
_RETRY_ATTEMPTS: Final = 7
_GRPC_TIMEOUT: Final = 8
_CONTENT_TYPE: Final = 9
_KINDS: Final[dict[bytes, int]] = {
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH,
    b"cookie": _COOKIE,
    b"idempotency-key": _IDEMPOTENCY_KEY,
    b"x-sidecar-timeout-ms": _TIMEOUT_MS,
    b"x-sidecar-retry-attempts": _RETRY_ATTEMPTS,
    b"x-sidecar-deadline-ms": _DROP,
    b"grpc-timeout": _GRPC_TIMEOUT,
    b"content-type": _CONTENT_TYPE,
    b"te": _DROP,
    b"connection": _DROP,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"transfer-encoding": _DROP,
    b"upgrade": _DROP,
    b"proxy-authorization": _DROP,
    b"proxy-authenticate": _DROP,
    b"http2-settings": _DROP,
}
# Response fields never sent to an HTTP/2 app (connection-specific, RFC 9113 8.2.2).
_RESPONSE_DROP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
    b"content-length", b"te",
})
_STATUS: Final[dict[int, bytes]] = {}


def _status(code: int) -> bytes:
    value = _STATUS.get(code)
    if value is None:
        value = b"%d" % code
        if len(_STATUS) < 1024:
            _STATUS[code] = value
    return value


def _digits(value: bytes) -> int | None:
    return int(value) if value.isdigit() and len(value) <= 18 else None


def request_head(
    headers: list[tuple[bytes, bytes]], end_stream: bool,
) -> tuple[RequestHead, bool, float | None]:
    """An HTTP/2 request's fields as the `RequestHead` the exchange knows, whether it is gRPC,
    and its `grpc-timeout` in seconds (None: none, or malformed). Raises ProtocolError."""
    head = RequestHead()
    method = b""
    path = b""
    authority: bytes | None = None
    host: bytes | None = None
    fields: Headers = []
    forward: Headers = []
    cookies: list[bytes] | None = None
    content_type: bytes | None = None
    grpc_timeout: float | None = None
    kinds = _KINDS
    for field in headers:
        name = field[0]
        if name[:1] == b":":
            if name == b":method":
                method = field[1]
            elif name == b":path":
                path = field[1]
            elif name == b":authority":
                authority = field[1]
            continue  # :scheme (and :protocol) stay behind
        fields.append(field)
        kind = kinds.get(name, 0)
        if not kind:
            forward.append(field)
            continue
        value = field[1]
        if kind == _CONTENT_TYPE:
            content_type = value
            forward.append(field)
        elif kind == _COOKIE:
            # RFC 9113 8.2.3: split cookie fields are joined again for an HTTP/1.1 hop.
            if cookies is None:
                cookies = [value]
            else:
                cookies.append(value)
        elif kind == _HOST:
            host = value
        elif kind == _CONTENT_LENGTH:
            length = _digits(value)
            if length is None:
                raise ProtocolError("content-length is not a decimal number")
            head.content_length = length
        elif kind == _IDEMPOTENCY_KEY:
            head.idempotency_key = True
            forward.append(field)
        elif kind == _TIMEOUT_MS:
            head.timeout_ms = _digits(value)
        elif kind == _RETRY_ATTEMPTS:
            head.retry_attempts = _digits(value)
        elif kind == _GRPC_TIMEOUT:
            grpc_timeout = parse_timeout(value)
        # else: _DROP
    if cookies is not None:
        forward.append((b"cookie", b"; ".join(cookies)))
    if method == b"CONNECT":
        raise ProtocolError("CONNECT over HTTP/2 is not supported")
    head.method = method
    head.target = path
    head.version = "2"
    head.headers = fields
    head.forward = forward
    head.host = authority if authority is not None else host
    head.authority = head.host or b""
    # A body without content-length reaches an HTTP/1.1 endpoint chunked.
    head.chunked = not end_stream and head.content_length is None
    return head, is_grpc(content_type), grpc_timeout


def _response_fields(status: int, fields: Headers) -> list[tuple[bytes, bytes]]:
    out = [(b":status", _status(status))]
    drop = _RESPONSE_DROP
    for name, value in fields:
        low = name.lower()
        if low in drop or low[:1] == b":":
            continue
        out.append((low, value))
    return out


def _trailer_fields(fields: Headers) -> list[tuple[bytes, bytes]]:
    drop = _RESPONSE_DROP
    return [(n.lower(), v) for n, v in fields if n.lower() not in drop and n[:1] != b":"]


def _done(ex: Exchange) -> bool:
    return ex.phase is Phase.DONE


def _count_grpc(ex: Exchange | None, code: int) -> None:
    """`sidecar_grpc_responses_total{cluster,status}` for a gRPC answer the sidecar made (the
    endpoint side counts the endpoints' answers)."""
    cluster = ex.cluster if ex is not None else None
    if cluster is not None:
        cluster.stats.grpc_response(code)


class H2AppStream(AppStream):
    """One request stream of an app connection: the `AppStream` of its exchange."""

    __slots__ = (
        "conn", "sid", "exchange", "grpc", "paused", "unconsumed", "pending", "end_pending",
        "trailers_pending", "head_pending", "head_sent", "local_done", "over",
        "deadline", "told_paused", "blocked_since", "counted", "msg_left", "msg_prefix",
    )

    def __init__(self, conn: H2AppConnection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.exchange: Exchange | None = None
        self.grpc = False
        self.paused = 0  # flow_control reasons the exchange gave (pause_request)
        self.unconsumed = 0  # request bytes delivered while paused: window not yet given back
        self.pending: list[bytes] = []  # response bytes the app's windows did not take yet
        self.end_pending = False  # the response's end waits behind `pending`
        self.trailers_pending: Headers | None = None
        self.head_pending: list[tuple[bytes, bytes]] | None = None
        self.head_sent = False
        self.local_done = False  # our end (END_STREAM) handed to the engine
        self.over = False  # the exchange ended (counted out of in-flight)
        self.deadline = math.inf
        self.told_paused = False  # the exchange was told app_write_paused
        self.blocked_since = math.inf  # when `pending` last stopped moving
        self.counted = False
        # gRPC responses: where the body handed to the app stands in its length-prefixed
        # messages (bytes left of the current one; its 5-byte prefix read so far), so that an
        # error after the answer began can end it with trailers at a message boundary.
        self.msg_left = 0
        self.msg_prefix = b""

    def __repr__(self) -> str:
        return f"<H2AppStream {self.sid} exchange={self.exchange!r}>"

    # --- the request, from the connection --------------------------------------------------
    def begin(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        conn = self.conn
        ctx = conn.ctx
        try:
            head, grpc, grpc_timeout = request_head(headers, end_stream)
        except ProtocolError as exc:
            self.refuse_head(headers, exc)
            return
        self.grpc = grpc
        refusal = ctx.admit()
        if refusal is not None:
            # The drain refuses new requests now: never processed, so the app's client may
            # send it elsewhere; and this connection takes no more (GOAWAY).
            conn.refuse(self)
            return
        ex = Exchange(self, head, conn.clock.now())
        self.exchange = ex
        self.counted = True
        ctx.stats.inflight += 1
        try:
            cluster = ctx.cluster_for(head.authority, head.target, False)
            if grpc_timeout is not None:
                # SPEC 11: the smallest of grpc-timeout, x-sidecar-timeout-ms and the
                # cluster's timeouts.request (the exchange takes timeout_ms as given).
                ms = max(1, math.ceil(grpc_timeout * 1000))
                own = head.timeout_ms
                if own is not None and 0 < own < ms:
                    ms = own
                limit = math.ceil(cluster.request_timeout * 1000)
                head.timeout_ms = ms if ms < limit else limit
            if not cluster.has_answer:
                ex.await_discovery(cluster)
            else:
                ex.start(cluster)
        except SidecarError as exc:
            if ex.phase is not Phase.DONE:
                ex.fail(exc)
        if end_stream and not _done(ex):  # a call: mypy would keep `phase` narrowed
            ex.request_end(None)

    def refuse_head(self, headers: list[tuple[bytes, bytes]], exc: ProtocolError) -> None:
        """A request head the sidecar will not route (malformed, or over the header limits):
        SPEC section 5's answer on this stream, a gRPC one for a gRPC call; the connection
        and its other streams go on."""
        self.grpc = any(n == b"content-type" and is_grpc(v) for n, v in headers)
        self._answer(exc, head_only=(b":method", b"HEAD") in headers)

    def trailers_too_large(self) -> None:
        """Request trailers over the header limits: the request fails as an HTTP/1.1 one whose
        trailers are too large does (431 if no answer began)."""
        ex = self.exchange
        if ex is not None and ex.phase is not Phase.DONE:
            ex.fail(HeadTooLarge("request trailers over max_header_bytes or max_headers"))
        else:
            self._maybe_gone()

    def request_data(self, data: bytes, end: bool) -> None:
        ex = self.exchange
        n = len(data)
        if ex is not None and ex.phase is not Phase.DONE:
            if n:
                ex.request_body(data)
            if self.paused:
                self.unconsumed += n  # given back once the exchange resumes the request
            elif n:
                self.conn.session.consume(self.sid, n)
            if end and not _done(ex):
                ex.request_end(None)
        else:
            if n:
                self.conn.session.consume(self.sid, n)  # nobody wants it: keep the app going
            if end:
                self._maybe_gone()

    def request_trailers(self, trailers: Headers) -> None:
        ex = self.exchange
        if ex is not None and ex.phase is not Phase.DONE:
            ex.request_end(trailers)
        else:
            self._maybe_gone()

    def peer_reset(self) -> None:
        """RST_STREAM from the app (or the engine closed the stream): the app is gone."""
        self.pending = []
        self.local_done = True
        ex = self.exchange
        if ex is not None and not self.over:
            if ex.phase is not Phase.DONE:
                ex.app_gone()
            self._exchange_over()

    # --- the response's flow, from the connection ---------------------------------------------
    def window_open(self, now: float) -> None:
        """The app's windows opened: send what waits."""
        pending = self.pending
        session = self.conn.session
        moved = False
        while pending:
            chunk = pending[0]
            n = session.send_data(self.sid, chunk, False)
            if n:
                moved = True
            if n < len(chunk):
                pending[0] = chunk[n:]
                break
            pending.pop(0)
        if moved:
            self.blocked_since = now
        if not pending:
            self.blocked_since = math.inf
            if self.end_pending:
                self.end_pending = False
                self._send_end(self.trailers_pending)
        self.update_pause()

    def update_pause(self) -> None:
        """Tell the exchange whether the app's side can take more now."""
        want = bool(self.pending) or self.conn.write_paused
        if want == self.told_paused:
            return
        self.told_paused = want
        ex = self.exchange
        if ex is not None and ex.phase is not Phase.DONE:
            if want:
                ex.app_write_paused()
            else:
                ex.app_write_resumed()

    def stalled(self) -> None:
        """No byte could be sent for `idle_timeout`: reset the stream (SPEC 11)."""
        self.conn.ctx.stats.abuse("zero_window_stall")
        self.conn.session.reset(self.sid, CANCEL)
        self.peer_reset()
        self.conn.forget(self)

    # --- AppStream: what the exchange reads ---------------------------------------------------
    def now(self) -> float:
        return self.conn.clock.now()

    def listener(self) -> str:
        return self.conn.ctx.name

    def writing_paused(self) -> bool:
        return bool(self.pending) or self.conn.write_paused

    # --- AppStream: the response --------------------------------------------------------------
    def send_interim(self, head: ResponseHead) -> None:
        if head.status == 101:
            return
        self.conn.session.send_headers(self.sid, _response_fields(head.status, head.forward),
                                       False)
        self.conn.wrote()

    def send_response_head(self, head: ResponseHead, keep_alive: bool) -> bool:
        fields = _response_fields(head.status, head.forward)
        if head.content_length is not None and head.status != 204:
            fields.append((b"content-length", b"%d" % head.content_length))
        # Held until the body's first byte, the end, or the connection's next flush: an
        # answer whose end follows in the same loop round (a gRPC Trailers-Only one) leaves
        # as one HEADERS frame.
        self.head_pending = fields
        self.conn.head_due(self)
        return keep_alive

    def send_head_due(self) -> None:
        fields = self.head_pending
        if fields is not None:
            self.head_pending = None
            self.head_sent = True
            self.conn.session.send_headers(self.sid, fields, False)
            self.conn.wrote()

    def send_response_body(self, data: bytes) -> None:
        if self.head_pending is not None:
            self.send_head_due()
        if not data:
            return
        if self.grpc:
            self._track_messages(data)
        if self.pending:
            self.pending.append(data)
            return
        n = self.conn.session.send_data(self.sid, data, False)
        if n < len(data):
            self.pending.append(data[n:] if n else data)
            self.blocked_since = self.conn.clock.now()
            self.conn.blocked(self)
            self.update_pause()
        self.conn.wrote()

    def send_response_end(self, trailers: Headers | None) -> None:
        if self.pending:
            self.end_pending = True
            self.trailers_pending = trailers
            return
        self._send_end(trailers)

    def _send_end(self, trailers: Headers | None) -> None:
        session = self.conn.session
        sid = self.sid
        fields = self.head_pending
        if fields is not None:
            # No body was sent: one HEADERS frame with END_STREAM; for gRPC the trailers are
            # folded in (a Trailers-Only answer stays one, which tells the app's library that
            # no message came).
            self.head_pending = None
            self.head_sent = True
            if trailers and not self.grpc:
                session.send_headers(sid, fields, False)
                session.send_trailers(sid, _trailer_fields(trailers))
            else:
                if trailers:
                    fields = fields + _trailer_fields(trailers)
                session.send_headers(sid, fields, True)
        elif trailers:
            session.send_trailers(sid, _trailer_fields(trailers))
        else:
            session.send_data(sid, b"", True)
        self.local_done = True
        self.conn.wrote()
        self._maybe_gone()

    def batch_begin(self) -> None:
        self.conn.batch += 1

    def batch_end(self) -> None:
        conn = self.conn
        conn.batch -= 1
        if not conn.batch:
            conn.flush_soon()

    # --- AppStream: endings -------------------------------------------------------------------
    def done(self, keep_alive: bool) -> None:
        self._exchange_over()
        self._maybe_gone()

    def send_error(self, exc: SidecarError, request_done: bool, keep_alive: bool) -> None:
        ex = self.exchange
        self._answer(exc, head_only=ex is not None and ex.head.method == b"HEAD")
        self._exchange_over()
        self._maybe_gone()

    def _answer(self, exc: SidecarError, head_only: bool) -> None:
        """The sidecar's own answer: SPEC section 5's, or a gRPC Trailers-Only one."""
        session = self.conn.session
        if self.grpc:
            fields = error_headers(exc)
            _count_grpc(self.exchange, int(fields[2][1]))
            session.send_headers(self.sid, fields, True)
            self.head_sent = self.local_done = True
            self.conn.wrote()
            self._maybe_gone()
            return
        body = b"" if head_only else error_body(exc)
        self.head_pending = [
            (b":status", _status(exc.status)),
            (b"content-type", b"application/json"),
            (b"x-sidecar-error", exc.code.encode("ascii", "replace")),
            (b"content-length", b"%d" % len(error_body(exc) if head_only else body)),
        ]
        self.send_response_body(body)
        self.send_response_end(None)

    def _track_messages(self, data: bytes) -> None:
        """Move the gRPC message position past `data` (5-byte prefix: flag, big-endian
        length; then the message)."""
        i = 0
        n = len(data)
        while i < n:
            left = self.msg_left
            if left:
                take = left if left < n - i else n - i
                self.msg_left = left - take
                i += take
                continue
            need = 5 - len(self.msg_prefix)
            self.msg_prefix += data[i:i + need]
            i += need
            if len(self.msg_prefix) == 5:
                self.msg_left = int.from_bytes(self.msg_prefix[1:5], "big")
                self.msg_prefix = b""

    def abort_partial(self, exc: SidecarError) -> None:
        """The answer began and cannot be completed. A gRPC answer standing at a message
        boundary ends with the sidecar's error as trailers (`grpc-status` per SPEC 11's
        mapping, `grpc-message`, `x-sidecar-error`): the app keeps the messages it got and
        learns why the rest is missing. Anything else is cut (RST_STREAM INTERNAL_ERROR)."""
        if (self.grpc and not self.local_done and not self.end_pending
                and not self.msg_left and not self.msg_prefix):
            fields = error_headers(exc)
            _count_grpc(self.exchange, int(fields[2][1]))
            self.send_response_end(fields[2:])  # after any bytes the app's window holds back
            self._exchange_over()
            self._maybe_gone()
            return
        self._cut()

    def _cut(self) -> None:
        """RST_STREAM INTERNAL_ERROR: the app sees a truncated answer, never a wrong one."""
        self.pending = []
        self.end_pending = False
        self.head_pending = None
        self.conn.session.reset(self.sid, INTERNAL_ERROR)
        self.local_done = True
        self._exchange_over()
        self.conn.forget(self)
        self.conn.wrote()

    def rescue(self, exc: Exception, site: str) -> None:
        """An unexpected exception at one of the exchange's seams: answer this stream (400
        before routing, 502 internal after, a reset once a response began); the connection
        and its other streams go on."""
        ctx = self.conn.ctx
        ctx.stats.internal_errors += 1
        ex = self.exchange
        err = internal_error(exc, site, ex is not None and ex.cluster is not None)
        try:
            if ex is not None and ex.phase is not Phase.DONE:
                ex.keep_alive = False
                ex.fail(err)
            elif not self.head_sent and not self.local_done:
                self._answer(err, head_only=False)
        except Exception as again:
            internal_error(again, site + "_rescue", True)
            if ex is not None:
                ex.phase = Phase.DONE
            self._cut()
            return
        if ex is not None and not self.over:
            self._cut()
        self.conn.wrote()

    def _exchange_over(self) -> None:
        """The one place a request leaves the in-flight count (and is logged)."""
        if self.over:
            return
        self.over = True
        conn = self.conn
        ctx = conn.ctx
        self.deadline = math.inf
        if self.counted:
            ctx.stats.inflight -= 1
            ex = self.exchange
            if ctx.access_log and ex is not None:
                ex.log_access(ctx.name, "h2", conn.clock.now())
            if ctx.watch_requests:
                ctx.changed()
        # The exchange refers to this stream (its `app`): letting go of it here leaves no
        # cycle, so a finished request (and a closed connection) is freed by reference
        # counting, not by the cyclic collector. Nothing reads it once the request is over.
        self.exchange = None

    def _maybe_gone(self) -> None:
        """The connection forgets a stream whose response is all with the engine and whose
        exchange is over (the engine keeps the rest: a reset, the app's leftover DATA)."""
        if self.local_done and not self.pending and (self.over or self.exchange is None):
            self.conn.forget(self)

    # --- AppStream: the request's flow ----------------------------------------------------------
    def pause_request(self, reason: int) -> None:
        self.paused |= reason

    def resume_request(self, reason: int) -> None:
        self.paused &= ~reason
        if not self.paused and self.unconsumed:
            n = self.unconsumed
            self.unconsumed = 0
            self.conn.session.consume(self.sid, n)
            self.conn.wrote()

    # --- AppStream: time ----------------------------------------------------------------------
    def set_deadline(self, when: float) -> None:
        self.deadline = when
        self.conn.schedule(when)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        conn = self.conn

        def run() -> None:
            callback()
            conn.wrote()

        return conn.loop.call_later(delay, run)

    def start_tunnel(
        self, exchange: AppExchange, endpoint: asyncio.Transport, to_app: bytes,
        established: bool,
    ) -> bool:
        del exchange, to_app, established
        endpoint.close()  # no tunnels over HTTP/2 streams (CONNECT is refused before this)
        return False


class H2AppConnection(H2Sink, asyncio.Protocol):
    """One app connection speaking HTTP/2 (see the module's docstring)."""

    def __init__(self, ctx: ListenerContext, clock: Clock = MONOTONIC) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.clock = clock  # every time read (sidecar/clock.py); timers are relative to it
        self.transport: asyncio.Transport | None = None
        lim = ctx.limits
        self.session = H2Session(
            self, False,
            max_concurrent_streams=lim.max_concurrent_streams,
            max_header_bytes=lim.max_header_bytes,
            max_headers=lim.max_headers,
        )
        self.streams: dict[int, H2AppStream] = {}
        self.blocked_streams: dict[int, H2AppStream] = {}  # with response bytes waiting
        self.batch = 0
        self.closed = False
        self.closing = False  # GOAWAY sent: close once the open streams are over
        self.write_paused = False
        self.paused_since = math.inf
        self.idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._flush_due = False
        self._heads: list[H2AppStream] = []  # streams holding a response head

    def __repr__(self) -> str:
        return f"<H2AppConnection {self.ctx.name} streams={len(self.streams)}>"

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        set_nodelay(transport)
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.stats.downstream_connections += 1
        self.session.initiate()
        self.idle_since = now = self.clock.now()
        self.schedule(now + ctx.limits.idle_timeout)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.batch += 1
        try:
            self.session.receive(data)
        except H2ProtocolError as exc:
            self.batch -= 1
            self._fatal(str(exc))
            return
        except Exception as exc:  # a bug under a callback: the connection cannot go on
            self.batch -= 1
            self.ctx.stats.internal_errors += 1
            internal_error(exc, "h2_receive", True)
            self._fatal("internal error")
            return
        self.batch -= 1
        if not self.batch:
            self.flush()

    def eof_received(self) -> bool:
        return False  # the app sends nothing more: HTTP/2 has no half-closed connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        for st in list(self.streams.values()):
            st.peer_reset()
        self.streams.clear()
        self.blocked_streams.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heads = []
        # Free nghttp2's memory now and break the session <-> connection cycle: the streams'
        # exchanges may still call in (answers arriving), which finds every stream gone.
        self.session.close()
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.stats.downstream_connections -= 1
        ctx.changed()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.paused_since = self.clock.now()
        self.schedule(self.paused_since + self.ctx.limits.idle_timeout)
        for st in list(self.streams.values()):
            st.update_pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.paused_since = math.inf
        for st in list(self.streams.values()):
            st.update_pause()

    # --- writing --------------------------------------------------------------------------------
    def wrote(self) -> None:
        """Frames were queued: out at the end of this loop round, unless a read of the app's
        is being processed (its end flushes)."""
        if not self.batch:
            self.flush_soon()

    def head_due(self, st: H2AppStream) -> None:
        self._heads.append(st)
        self.wrote()

    def flush_soon(self) -> None:
        """Flush once the loop has run the callbacks of this round: the answers of every
        endpoint read in one round (streams of this connection on different endpoint
        connections) leave in one write."""
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        self.flush()

    def flush(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        heads = self._heads
        if heads:
            self._heads = []
            for st in heads:
                st.send_head_due()
        try:
            out = self.session.data_to_send()
        except H2ProtocolError as exc:
            self._fatal(str(exc))
            return
        if out:
            transport.write(out)
        if self.closing and not self.streams:
            transport.close()

    def _fatal(self, why: str) -> None:
        """A connection error (ours to report, or the app's abuse): GOAWAY out, then close."""
        transport = self.transport
        if transport is None or self.closed:
            return
        try:
            out = self.session.data_to_send()
        except H2ProtocolError:
            out = b""
        if out:
            transport.write(out)
        transport.close()

    # --- H2Sink ---------------------------------------------------------------------------------
    def on_h2_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        st = H2AppStream(self, stream_id)
        self.streams[stream_id] = st
        try:
            st.begin(headers, end_stream)
        except Exception as exc:
            st.rescue(exc, "request")

    def on_h2_too_large(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                        end_stream: bool, trailers: bool) -> None:
        """A header block over limits.max_header_bytes or max_headers: 431 header_too_large
        on its stream (as HTTP/1.1 answers), never routed; the connection goes on."""
        if trailers:
            found = self.streams.get(stream_id)
            if found is not None:
                try:
                    found.trailers_too_large()
                except Exception as exc:
                    found.rescue(exc, "request")
            return
        st = H2AppStream(self, stream_id)
        self.streams[stream_id] = st
        try:
            st.refuse_head(headers, HeadTooLarge(
                "request head over max_header_bytes or max_headers"))
        except Exception as exc:
            st.rescue(exc, "request")

    def on_h2_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        st = self.streams.get(stream_id)
        if st is None:
            if data:
                self.session.consume(stream_id, len(data))
            return
        try:
            st.request_data(data, end_stream)
        except Exception as exc:
            st.rescue(exc, "request")

    def on_h2_trailers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        st = self.streams.get(stream_id)
        if st is not None:
            try:
                st.request_trailers(headers)
            except Exception as exc:
                st.rescue(exc, "request")

    def on_h2_reset(self, stream_id: int, error_code: int) -> None:
        st = self.streams.get(stream_id)
        if st is not None:
            self.forget(st)
            st.peer_reset()

    def on_h2_window_open(self, stream_id: int) -> None:
        blocked = self.blocked_streams
        if not blocked:
            return
        now = self.clock.now()
        if stream_id == 0:
            for st in list(blocked.values()):
                self._window_open(st, now)
        else:
            one = blocked.get(stream_id)
            if one is not None:
                self._window_open(one, now)

    def _window_open(self, st: H2AppStream, now: float) -> None:
        try:
            st.window_open(now)
        except Exception as exc:
            st.rescue(exc, "response")
        if not st.pending:
            self.blocked_streams.pop(st.sid, None)
            st._maybe_gone()

    def on_h2_goaway(self, last_stream_id: int, error_code: int) -> None:
        self.closing = True  # the app closes: finish what is open, then close

    def on_h2_abuse(self, kind: str) -> None:
        self.ctx.stats.abuse(kind)
        _ABUSE_LOG.log(kind, logging.WARNING, "HTTP/2 abuse: connection closed", None,
                       listener=self.ctx.name, kind=kind)

    # --- streams ----------------------------------------------------------------------------------
    def blocked(self, st: H2AppStream) -> None:
        self.blocked_streams[st.sid] = st
        self.schedule(st.blocked_since + self.ctx.limits.idle_timeout)

    def forget(self, st: H2AppStream) -> None:
        if self.streams.pop(st.sid, None) is None:
            return
        self.blocked_streams.pop(st.sid, None)
        if not self.streams:
            self.idle_since = now = self.clock.now()
            if self.closing:
                self.wrote()
            else:
                self.schedule(now + self.ctx.limits.idle_timeout)

    def refuse(self, st: H2AppStream) -> None:
        """The drain refuses `st`: REFUSED_STREAM, and GOAWAY for the connection."""
        self.session.reset(st.sid, REFUSED_STREAM)
        st.local_done = True
        self.forget(st)
        # Its GOAWAY names the stream before it as the last one processed: the refused one
        # and any the app sent after it were not.
        self.goaway(st.sid - 2 if st.sid > 2 else 0)

    def goaway(self, last_stream_id: int | None = None) -> None:
        """No new streams from here on (GOAWAY NO_ERROR; last stream: `last_stream_id`, by
        default the last one processed); the open ones finish, then the connection closes."""
        if self.closing or self.closed:
            return
        self.closing = True
        try:
            self.session.goaway(NO_ERROR, last_stream_id)
        except H2ProtocolError:
            pass
        self.wrote()

    # --- time -------------------------------------------------------------------------------------
    def schedule(self, when: float) -> None:
        """Make sure the connection's one timer runs no later than `when`."""
        if when < self._timer_at and not self.closed:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            delay = when - self.clock.now()
            self._timer = self.loop.call_later(delay if delay > 0 else 0, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.closed:
            return
        now = self.clock.now()
        idle_timeout = self.ctx.limits.idle_timeout
        nxt = math.inf
        self.batch += 1
        try:
            for st in list(self.streams.values()):
                ex = st.exchange
                if st.deadline <= now and ex is not None and ex.phase is not Phase.DONE:
                    try:
                        ex.on_deadline(now)
                        if not _done(ex):
                            st.deadline = ex.next_deadline()
                    except Exception as exc:
                        st.rescue(exc, "deadline")
                if st.pending and now - st.blocked_since >= idle_timeout:
                    st.stalled()
                    continue
                if st.deadline < nxt and not st.over:
                    nxt = st.deadline
                if st.pending and st.blocked_since + idle_timeout < nxt:
                    nxt = st.blocked_since + idle_timeout
        finally:
            self.batch -= 1
        if self.write_paused:
            if now - self.paused_since >= idle_timeout:
                self.ctx.stats.abuse("zero_window_stall")
                self.abort()
                return
            nxt = min(nxt, self.paused_since + idle_timeout)
        if not self.streams:
            if now - self.idle_since >= idle_timeout:
                self.goaway()
                self.flush()
                if self.transport is not None:
                    self.transport.close()
                return
            nxt = min(nxt, self.idle_since + idle_timeout)
        self.flush()
        if nxt < math.inf:
            self.schedule(nxt)

    # --- draining (ListenerContext.connections) ---------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.streams

    def close_if_idle(self) -> bool:
        """The drain no longer admits requests: GOAWAY now; close at once if no stream is
        open, else once they are over."""
        if self.closed:
            return False
        self.goaway()
        if not self.streams:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return True
        return False

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            reset(self.transport)
