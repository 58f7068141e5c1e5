"""The exchange's two legs, as narrow interfaces: the only thing `downstream/exchange.py` knows.

An exchange is one request and its response. It is driven from two sides, each of which may
speak HTTP/1.1 or HTTP/2 (or a third protocol later, as a new file):

- the *app side*: an `AppStream`, one request from the app. HTTP/1.1: the app connection's
  protocol object, bound to one exchange at a time (pipelined requests wait their turn).
  HTTP/2: one object per stream of the app's connection.
- the *endpoint side*: an `EndpointStream`, one try of the request to one endpoint. HTTP/1.1:
  a pooled connection, bound to the exchange for that try. HTTP/2: one stream on a
  multiplexed connection.

And between the endpoint side and the pool, the *carrier*: a `Carrier` is a connection the
pool keeps (HTTP/1.1: carries one stream at a time; HTTP/2: up to the peer's
SETTINGS_MAX_CONCURRENT_STREAMS). The pool hands out "a stream to endpoint X" whatever carries
it; a carrier tells the pool about itself through its `CarrierOwner`, never by importing it.

What the exchange asks of the pool (`upstream/pool.py`, one per endpoint), whatever carries
the streams:

    pool.acquire(waiter, user, method, fresh) -> EndpointStream | None
        a stream bound to `user` now (an idle carrier with capacity), or None: `waiter` is
        queued and called back once (`StreamWaiter`); `fresh`: on a newly opened carrier
    pool.cancel(waiter)          the waiter went away before its callback
    pool.inflight                requests on this endpoint (least-request balancing), counted
                                 by the pool alone: from `acquire` until the stream's ending
                                 (`release`, `reset`, `detach`) or the waiter's end

Calls go both ways on each leg, so each leg is a pair of base classes:

    leg (protocol)                 exchange                         endpoint (protocol)
    AppStream        <- calls --   Exchange(AppExchange,            EndpointStream
                     -- calls ->            EndpointUser)  <- calls -- (via EndpointUser)
                                                           -- calls ->

They are mypyc traits, not `typing.Protocol`s: compiled, a call through a trait is a native
call (a vtable found by the class), through a Protocol a lookup by name and argument parsing
(see docs/architecture.md, "What one request costs"). Traits, not plain base classes, because
one class implements several (the exchange is an `AppExchange`, an `EndpointUser` and a
`StreamWaiter`; the HTTP/1.1 connection is its parser's `ResponseSink`, an `EndpointStream`
and a `Carrier`), and mypyc allows one non-trait base only. mypyc refuses interpreted
subclasses of a compiled trait, so code that is not compiled (tests' fake legs; HTTP/2 code
while it is young) subclasses the matching `*Base` class at the end of this module instead:
the same contract, open to plain Python.

Every method below is part of the contract: an implementation overrides all of those that
raise `NotImplementedError`. Callbacks never raise into their caller on purpose: an
implementation that hits a bug inside a callback reports it through `rescue` (app side) or
`on_internal_error` (endpoint side), so that the app always gets an answer.

## A stream's states (both legs; RFC 9113 section 5.1, trimmed)

"local" is what this side sends, "remote" what it receives. For an `EndpointStream` local is
the request and remote the response; for an `AppStream` local is the response, remote the
request. A stream's end (`*_end`) closes its direction; a reset closes both at once.

    state         | -> allowed next                        | how
    OPEN          | LOCAL_DONE, REMOTE_DONE, CLOSED,       | head sent/received, bodies flow
                  | RESET, TUNNEL                          |
    LOCAL_DONE    | CLOSED, RESET                          | our end sent (request end, ...)
    REMOTE_DONE   | CLOSED, RESET                          | peer's end received first (an
                  |                                        | early answer: 413 before the body)
    CLOSED        | (final)                                | both ends: released / done
    RESET         | (final)                                | abort, error, app gone
    TUNNEL        | CLOSED                                 | CONNECT/Upgrade: bytes only
                  |                                        | (HTTP/1.1; HTTP/2 refuses)

`STREAM_TRANSITIONS` is this table as data; `stream_step` checks a step against it.

## A carrier's states (a pooled connection)

    state       | -> allowed next                      | meaning
    CONNECTING  | IDLE, ACTIVE, CLOSED                 | socket (and TLS) being opened
    IDLE        | ACTIVE, RETIRING, CLOSED             | open, no stream: capacity > 0
    ACTIVE      | IDLE, ACTIVE, RETIRING, TUNNEL,      | >= 1 stream open (HTTP/1.1:
                | CLOSED                               | exactly 1, capacity 0)
    RETIRING    | CLOSED                               | GOAWAY-like: no new stream, the open
                |                                      | ones finish, then it closes (linger)
    TUNNEL      | CLOSED                               | HTTP/1.1 only: the socket belongs to
                |                                      | a tunnel now; the pool forgot it
    CLOSED      | (final)                              | socket closed; owner told once

`CARRIER_TRANSITIONS` is this table as data. ACTIVE -> ACTIVE is a second stream opened on a
multiplexed carrier (HTTP/2); HTTP/1.1 never takes it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import Final, Protocol

from mypy_extensions import mypyc_attr, trait

from sidecar.errors import SidecarError, UpstreamError
from sidecar.http.headers import Headers
from sidecar.http.parser import RequestHead, ResponseHead


# --- states ---------------------------------------------------------------------------------------
class StreamState(enum.IntEnum):
    OPEN = 0
    LOCAL_DONE = 1
    REMOTE_DONE = 2
    CLOSED = 3
    RESET = 4
    TUNNEL = 5


STREAM_TRANSITIONS: Final[dict[StreamState, frozenset[StreamState]]] = {
    StreamState.OPEN: frozenset({StreamState.LOCAL_DONE, StreamState.REMOTE_DONE,
                                 StreamState.CLOSED, StreamState.RESET, StreamState.TUNNEL}),
    StreamState.LOCAL_DONE: frozenset({StreamState.CLOSED, StreamState.RESET}),
    StreamState.REMOTE_DONE: frozenset({StreamState.CLOSED, StreamState.RESET}),
    StreamState.CLOSED: frozenset(),
    StreamState.RESET: frozenset(),
    StreamState.TUNNEL: frozenset({StreamState.CLOSED}),
}


def stream_step(old: StreamState, new: StreamState) -> StreamState:
    """`new`, if the table allows `old -> new`; else RuntimeError (a bug, never the peer's
    doing: a peer's protocol violation is an error event, not a transition)."""
    if new not in STREAM_TRANSITIONS[old]:
        raise RuntimeError(f"stream: {old.name} -> {new.name}")
    return new


class CarrierState(enum.IntEnum):
    CONNECTING = 0
    IDLE = 1
    ACTIVE = 2
    RETIRING = 3
    TUNNEL = 4
    CLOSED = 5


CARRIER_TRANSITIONS: Final[dict[CarrierState, frozenset[CarrierState]]] = {
    CarrierState.CONNECTING: frozenset({CarrierState.IDLE, CarrierState.ACTIVE,
                                        CarrierState.CLOSED}),
    CarrierState.IDLE: frozenset({CarrierState.ACTIVE, CarrierState.RETIRING,
                                  CarrierState.CLOSED}),
    CarrierState.ACTIVE: frozenset({CarrierState.IDLE, CarrierState.ACTIVE,
                                    CarrierState.RETIRING, CarrierState.TUNNEL,
                                    CarrierState.CLOSED}),
    CarrierState.RETIRING: frozenset({CarrierState.CLOSED}),
    CarrierState.TUNNEL: frozenset({CarrierState.CLOSED}),
    CarrierState.CLOSED: frozenset(),
}


class Cancellable(Protocol):
    """What `AppStream.call_later` returns (an `asyncio.TimerHandle`, or a test's fake). A
    Protocol is fine here: a backoff timer is off the per-request path."""

    def cancel(self) -> None: ...


# --- the app side ------------------------------------------------------------------------------
@trait
@mypyc_attr(allow_interpreted_subclasses=True)
class AppExchange:
    """What an app leg calls on the exchange of the request it carries (the exchange's side
    of the `AppStream` contract). Each is called at most in the order a request happens:
    body pieces, then one `request_end`; `app_gone` at most once and then nothing more."""

    __slots__ = ()

    def request_body(self, data: bytes) -> None:
        """A piece of the request body, in order, de-framed (no chunk sizes, no DATA frame
        headers). The leg keeps delivering until the exchange pauses it
        (`AppStream.pause_request`), and at most one read's worth after that."""
        raise NotImplementedError

    def request_end(self, trailers: Headers | None) -> None:
        """The request is complete; `trailers` are its trailer fields (None: none sent)."""
        raise NotImplementedError

    def app_write_paused(self) -> None:
        """The app's side cannot take more response bytes now (HTTP/1.1: the socket's write
        buffer is above its high-water mark; HTTP/2: the stream's or connection's send window
        is exhausted). The exchange stops reading the response from the endpoint."""
        raise NotImplementedError

    def app_write_resumed(self) -> None:
        """The app's side drained: the exchange resumes reading the response."""
        raise NotImplementedError

    def app_gone(self) -> None:
        """The app went away (connection lost, HTTP/2 RST_STREAM): stop, free the endpoint
        stream (reset it), settle the policies. Nothing is written to the app afterwards."""
        raise NotImplementedError

    def on_deadline(self, now: float) -> None:
        """The deadline the exchange last set (`AppStream.set_deadline`) passed. The leg owns
        the timer (HTTP/1.1: its connection's one wheel entry)."""
        raise NotImplementedError

    def next_deadline(self) -> float:
        """When `on_deadline` should run next (inf: none)."""
        raise NotImplementedError

    def tunnel_closed(self, now: float) -> None:
        """A tunnel the exchange handed over (`AppStream.start_tunnel`) has ended: the
        exchange records the request's end (status, duration) now."""
        raise NotImplementedError


@trait
@mypyc_attr(allow_interpreted_subclasses=True)
class AppStream:
    """One request from the app, as the exchange sees it: where the response goes.

    HTTP/1.1 (`downstream/protocol.py`): the app connection's protocol, one exchange at a time.
    HTTP/2: one per stream. The exchange is created by the leg once a request head is complete
    (`Exchange(app, head, now)`), and the leg then delivers the rest of the request to it
    through `AppExchange`.

    The response: at most one `send_response_head` (any number of `send_interim` before it),
    then `send_response_body` pieces, then one `send_response_end`; then `done`. Instead of a
    response: `send_error` (which also ends the exchange). After a response head was sent and
    it cannot be completed: `abort_partial` (which also ends the exchange). CONNECT and
    accepted Upgrades: `start_tunnel` instead of a body.
    """

    __slots__ = ()

    # --- what the exchange reads -------------------------------------------------------------
    def now(self) -> float:
        """The clock the leg's deadlines run on (the event loop's monotonic seconds, or a
        test's fake clock). The exchange reads time only through this."""
        raise NotImplementedError

    def listener(self) -> str:
        """The listener's name, for the statistics and the access log."""
        raise NotImplementedError

    def writing_paused(self) -> bool:
        """Whether the app's side cannot take more now (see `AppExchange.app_write_paused`):
        a new endpoint stream starts with its response paused then."""
        raise NotImplementedError

    # --- the response ------------------------------------------------------------------------
    def send_interim(self, head: ResponseHead) -> None:
        """A 1xx other than 101 (100 Continue, 103 Early Hints). The leg may drop it
        (HTTP/1.0 apps do not understand them)."""
        raise NotImplementedError

    def send_response_head(self, head: ResponseHead, keep_alive: bool) -> bool:
        """The final response head (or 101 for an accepted Upgrade). The leg frames it
        (HTTP/1.1: Content-Length when the head has one, else chunked, or close-delimited for
        an HTTP/1.0 app; HTTP/2: a HEADERS frame). `keep_alive`: whether the exchange would
        let the app's connection carry another request after this one (False after an answer
        that began before the request was complete, or a refused Upgrade). Returns the
        keep-alive the leg will honour: it may only lower it (HTTP/1.1: `Connection: close`
        when its connection is closing, or the body is close-delimited). HTTP/2 streams
        return `keep_alive` unchanged (the connection outlives the stream)."""
        raise NotImplementedError

    def send_response_body(self, data: bytes) -> None:
        """A piece of the response body, un-framed; the leg frames it."""
        raise NotImplementedError

    def send_response_end(self, trailers: Headers | None) -> None:
        """The response body is complete; `trailers` (None: none) follow it (HTTP/1.1: in the
        last chunk when chunked, else dropped; HTTP/2: a HEADERS frame with END_STREAM)."""
        raise NotImplementedError

    def batch_begin(self) -> None:
        """What follows until `batch_end` comes from one read on the endpoint side (or one
        loop callback, such as a discovery answer): the leg may hold its writes and send them
        in one (corking); HTTP/2 flushes its connection at `batch_end`."""
        raise NotImplementedError

    def batch_end(self) -> None:
        raise NotImplementedError

    # --- endings -----------------------------------------------------------------------------
    def done(self, keep_alive: bool) -> None:
        """The exchange is over (the response was sent whole, or it was answered by
        `send_error`). HTTP/1.1: the connection goes on to the next request when
        `keep_alive` (and it is not closing), else it closes (after reading the rest of an
        unfinished request for a short grace, so that the app reads the answer). HTTP/2:
        the stream is closed; `keep_alive` is ignored."""
        raise NotImplementedError

    def send_error(self, exc: SidecarError, request_done: bool, keep_alive: bool) -> None:
        """Answer with the sidecar's own error (SPEC section 5: status, `x-sidecar-error`,
        JSON body), no response byte having been sent yet; then end the exchange as `done`
        does. `request_done`: the whole request was received. The leg may lower
        `keep_alive` (an unfinished request, a refusal for what the app sent)."""
        raise NotImplementedError

    def abort_partial(self, exc: SidecarError) -> None:
        """A response has begun and cannot be completed: the app must see a truncated
        message, never a wrong one (HTTP/1.1: close, or RST for a close-delimited body;
        HTTP/2: RST_STREAM INTERNAL_ERROR). Ends the exchange."""
        raise NotImplementedError

    def rescue(self, exc: Exception, site: str) -> None:
        """An unexpected exception reached one of the exchange's seams (a pool or timer
        callback): the leg answers the app (or cuts the response) and counts it."""
        raise NotImplementedError

    # --- the request's flow ------------------------------------------------------------------
    def pause_request(self, reason: int) -> None:
        """Stop delivering the request body, for `reason` (a `flow_control` bit:
        WAITING_UPSTREAM, PEER_WRITE_FULL); reasons are independent, the body flows again
        once none is left. HTTP/2: stop returning window to the app for this stream."""
        raise NotImplementedError

    def resume_request(self, reason: int) -> None:
        raise NotImplementedError

    # --- time --------------------------------------------------------------------------------
    def set_deadline(self, when: float) -> None:
        """Call the exchange's `on_deadline` at `when` (monotonic, `now()`'s clock). Replaces
        the previous deadline; inf: none."""
        raise NotImplementedError

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Run `callback` after `delay` seconds (a retry's backoff)."""
        raise NotImplementedError

    # --- tunnels (HTTP/1.1 only) -------------------------------------------------------------
    def start_tunnel(
        self, exchange: AppExchange, endpoint: asyncio.Transport, to_app: bytes,
        established: bool,
    ) -> bool:
        """Hand the app's connection and `endpoint` (an endpoint stream's socket, see
        `EndpointStream.detach`) to a byte tunnel: CONNECT (`established`: the leg first
        writes `200 Connection Established`) or an accepted Upgrade (the 101 head was sent;
        `to_app`: bytes the endpoint sent after it). Bytes the app sent after its request
        head go to the endpoint first. The tunnel calls `exchange.tunnel_closed` once when it
        ends. False when the leg cannot (HTTP/2 streams; the app already gone): then the
        endpoint socket is closed by the leg, and the exchange answers or ends."""
        raise NotImplementedError


# --- the endpoint side --------------------------------------------------------------------------
@trait
@mypyc_attr(allow_interpreted_subclasses=True)
class EndpointUser:
    """What an endpoint stream reports to whoever holds it (an exchange; HTTP/1.1 also a
    tunnel being set up). Order: `on_response_head` for each interim (1xx) and then the final
    head, `on_response_body` pieces, `on_response_end`; or `on_upgrade` after a 101's end; or,
    at any point, `on_upstream_error` once, after which nothing more comes."""

    __slots__ = ()

    def on_response_head(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_response_end(self, trailers: Headers | None) -> None:
        raise NotImplementedError

    def on_upgrade(self, rest: bytes) -> None:
        """A 101 was answered and its end delivered: the stream is a byte pipe now. `rest`:
        bytes the endpoint sent after the 101 head (HTTP/1.1 only)."""
        raise NotImplementedError

    def on_upstream_error(self, exc: UpstreamError) -> None:
        """The stream failed (reset, protocol error, TLS). The stream has let go of its user
        and will not be reused. What retry classification needs is on the stream
        (`EndpointStream.reused`, `response_started`, `taken_at`) and on `exc`
        (`before_write`: nothing of the request was written)."""
        raise NotImplementedError

    def on_upstream_pause_writing(self) -> None:
        """The endpoint cannot take more of the request body now (socket buffer or HTTP/2
        window): the exchange pauses the app's request (`AppStream.pause_request`)."""
        raise NotImplementedError

    def on_upstream_resume_writing(self) -> None:
        raise NotImplementedError

    def on_internal_error(self, exc: Exception) -> None:
        """An unexpected exception in one of this user's callbacks: the stream has let go of
        it (and resets itself); the user answers whoever is waiting."""
        raise NotImplementedError

    def batch_begin(self) -> None:
        """What the stream hands over from one read follows, until `batch_end`."""

    def batch_end(self) -> None:
        pass


@trait
@mypyc_attr(allow_interpreted_subclasses=True)
class EndpointStream:
    """One try of one request to one endpoint, as the exchange sees it.

    The pool opens it (`Carrier.open_stream`) bound to an `EndpointUser`. The request goes out
    as `send_head` (with whatever body is already held), then `send_body` pieces, then
    `send_end`; the response comes back through the user. The exchange ends it with exactly
    one of `release` (the response ended: the carrier may take another stream), `reset`
    (abandon it: the carrier is not reused for HTTP/1.1, RST_STREAM for HTTP/2) or `detach`
    (HTTP/1.1 only: the socket becomes a tunnel).

    Every stream keeps the two fields below; the methods that only read them are written
    once here (the trait's default methods).
    """

    __slots__ = ()

    _taken_at: float  # see `taken_at`
    _response_begun: bool  # see `response_started`

    # --- what retry classification reads ------------------------------------------------------
    def endpoint(self) -> str:
        """The endpoint's key (`ip:port`), for logs and the policies."""
        raise NotImplementedError

    def reused(self) -> bool:
        """Whether the carrier carried a request before this one (the keep-alive race can only
        hit a reused carrier)."""
        raise NotImplementedError

    def response_started(self) -> bool:
        """Whether a byte of the response has been received on this stream."""
        return self._response_begun

    def taken_at(self) -> float:
        """When the pool handed this stream out (the request's write followed at once)."""
        return self._taken_at

    def race_lost(self, now: float) -> None:
        """The exchange judged this stream's failure a keep-alive race (a reused carrier the
        peer closed as our request crossed its FIN; `sidecar.policy.retry.is_keepalive_race`):
        the carrier tells its pool, which learns that the endpoint closes idle connections."""
        raise NotImplementedError

    def writing_paused(self) -> bool:
        """Whether the endpoint cannot take more request body now (see
        `EndpointUser.on_upstream_pause_writing`)."""
        raise NotImplementedError

    # --- the request -------------------------------------------------------------------------
    def send_head(
        self, head: RequestHead, authority: bytes, deadline_ms: int,
        body: list[bytes] | None, end: bool, trailers: Headers | None,
    ) -> None:
        """Send the request head: `head`'s method, target and end-to-end fields, `authority`
        (HTTP/1.1 `Host`, HTTP/2 `:authority`), and `x-sidecar-deadline-ms: deadline_ms`
        unless it is negative. `body`: pieces already held (a retry, or a wait for the
        stream), sent right after the head in the same write where the protocol allows;
        `end`: the request is complete (its `trailers` follow). The stream frames everything
        (HTTP/1.1: `Content-Length` when the head has one, else chunked when the request has a
        body, as for an HTTP/2 app's request without content-length; HTTP/2: DATA frames)."""
        raise NotImplementedError

    def send_body(self, data: bytes) -> None:
        """A piece of the request body, un-framed."""
        raise NotImplementedError

    def send_end(self, trailers: Headers | None) -> None:
        """The request is complete; `trailers` follow it (None: none)."""
        raise NotImplementedError

    # --- the response's flow -----------------------------------------------------------------
    def pause_response(self) -> None:
        """Stop reading the response (HTTP/1.1: the socket; HTTP/2: no WINDOW_UPDATE for
        this stream). Idempotent."""
        raise NotImplementedError

    def resume_response(self) -> None:
        """Undo `pause_response`. Idempotent."""
        raise NotImplementedError

    # --- endings (exactly one) ---------------------------------------------------------------
    def release(self, now: float, reusable: bool) -> None:
        """The exchange is done with the stream, whose response ended. `reusable` False: the
        request's framing was left unfinished (an early answer), so the carrier must not carry
        another request (HTTP/1.1: it closes; HTTP/2: the stream is reset, the carrier goes
        on). The stream lets go of its user first, and resumes its reading if paused. `now`:
        the clock, just read by the caller."""
        raise NotImplementedError

    def reset(self, reason: str) -> None:
        """Abandon the stream now (error, timeout, retry, app gone): nothing more reaches the
        user. HTTP/1.1: the connection is aborted (RST) and leaves the pool; HTTP/2:
        RST_STREAM CANCEL. `reason`: the close reason for the statistics."""
        raise NotImplementedError

    def detach(self) -> asyncio.Transport | None:
        """Give the stream's socket to a tunnel (CONNECT, an accepted Upgrade): the carrier
        leaves the pool for good and its user is dropped. None when the protocol cannot
        (HTTP/2) or the socket is already gone; then the stream has been reset."""
        raise NotImplementedError


@trait
@mypyc_attr(allow_interpreted_subclasses=True)
class StreamWaiter:
    """Who asked the pool for a stream and was queued (`Pool.acquire` returned None): called
    back exactly once, unless it cancelled first (`Pool.cancel`)."""

    __slots__ = ()

    def on_pool_stream(self, stream: EndpointStream) -> None:
        """A stream, opened and bound to the user the waiter gave `Pool.acquire`."""
        raise NotImplementedError

    def on_pool_error(self, exc: SidecarError) -> None:
        """No stream: connect failed, `pending_timeout`, the endpoint went away. Nothing of
        the request was written."""
        raise NotImplementedError


# --- the pool and its carriers ------------------------------------------------------------------
@trait
@mypyc_attr(allow_interpreted_subclasses=True)
class CarrierOwner:
    """How a carrier tells its pool about itself (the pool implements this; a carrier never
    imports the pool)."""

    __slots__ = ()

    def now(self) -> float:
        """The pool's clock (see sidecar/clock.py)."""
        raise NotImplementedError

    def carrier_closed(self, carrier: Carrier, was_idle: bool) -> None:
        """`carrier`'s socket closed (by us or by the peer); called once, as it enters
        CLOSED. `was_idle`: it was IDLE then (in the pool's idle stack)."""
        raise NotImplementedError

    def stream_released(self, carrier: Carrier, now: float, reusable: bool) -> None:
        """A stream of `carrier` ended by `EndpointStream.release`: the pool may give it
        another (pool it, hand it to a waiter) or close it when it must not be reused."""
        raise NotImplementedError

    def stream_reset(self, carrier: Carrier, reason: str) -> None:
        """A stream of `carrier` was reset, or detached to a tunnel (`reason` "tunnel"). The
        pool's bookkeeping only: the carrier resets (HTTP/1.1: aborts) itself. For HTTP/1.1
        the carrier is gone from the pool; an HTTP/2 carrier goes on."""
        raise NotImplementedError

    def race_lost(self, carrier: Carrier, idle_before: float, now: float) -> None:
        """A stream of `carrier` lost the keep-alive race (`EndpointStream.race_lost`);
        `idle_before`: how long the carrier had been idle when it was handed out."""
        raise NotImplementedError

    def tls_error(self, exc: BaseException) -> str | None:
        """How the pool's TLS origin describes `exc`; None for a cleartext pool."""
        raise NotImplementedError


@trait
@mypyc_attr(allow_interpreted_subclasses=True)
class Carrier:
    """A connection the pool keeps, carrying streams to one endpoint. Its state follows
    `CARRIER_TRANSITIONS`; it changes only inside the carrier, through its methods.

    The fields below are every carrier's (each protocol's `__init__` sets them), and the
    methods that only read them are written once here, as the trait's default methods; the
    rest each protocol overrides."""

    __slots__ = ()

    state: CarrierState
    reusable: bool  # see `is_reusable`
    created_at: float
    expires_at: float  # the (jittered) end of its max_lifetime
    _idle_since: float  # see `idle_since`
    close_reason: str  # why it closed or is closing ("" while open)

    def capacity(self) -> int:
        """How many more streams it can open now: HTTP/1.1 1 when IDLE and reusable, else 0;
        HTTP/2 the peer's SETTINGS_MAX_CONCURRENT_STREAMS minus the open streams (0 once
        RETIRING)."""
        raise NotImplementedError

    def open_stream(self, user: EndpointUser, method: bytes, now: float) -> EndpointStream:
        """A new stream bound to `user`; `method` lets the response parser know a HEAD's
        answer has no body. Only when `capacity() > 0`."""
        raise NotImplementedError

    def usable(self, now: float, idle_timeout: float) -> bool:
        """Whether an idle carrier may still be handed out at `now`: open, reusable, before
        its expiry (`expiry`)."""
        raise NotImplementedError

    def expiry(self, idle_timeout: float) -> float:
        """When this idle carrier stops being safe to hand out: the earliest of its
        max_lifetime, the peer's announced keep-alive timeout (less a margin) and
        `idle_timeout` after it became idle."""
        raise NotImplementedError

    def is_closed(self) -> bool:
        return self.state is CarrierState.CLOSED

    def is_idle(self) -> bool:
        """In IDLE: open, no stream."""
        return self.state is CarrierState.IDLE

    def is_reusable(self) -> bool:
        """Whether it may carry another stream once its current ones end (False after the
        peer's `Connection: close`, an unsolicited byte, an error, `retire`)."""
        return self.reusable

    def past_lifetime(self, now: float) -> bool:
        """Past its (jittered) `max_lifetime`."""
        return now >= self.expires_at

    def opened_at(self) -> float:
        return self.created_at

    def idle_since(self) -> float:
        """When it last became idle (its last stream ended, or it connected)."""
        return self._idle_since

    def idle_for(self, now: float) -> float:
        raise NotImplementedError

    def streams_opened(self) -> int:
        """How many streams it has carried, the current ones included."""
        raise NotImplementedError

    def closed_by_peer(self) -> bool:
        """It closed because the peer closed it (not by us)."""
        return self.close_reason == "remote_closed"

    def peer_gone(self) -> bool:
        """Ask the kernel whether the peer has closed (or written to) this idle carrier
        without the loop having read it yet; then it is marked unreusable. A system call:
        the pool asks only of endpoints seen closing idle connections."""
        raise NotImplementedError

    def connected(self, now: float) -> None:
        """The pool's connect succeeded: CONNECTING -> IDLE at `now`."""
        raise NotImplementedError

    def parked(self, now: float) -> None:
        """The pool keeps it idle from `now` (its idle timers count from here)."""
        raise NotImplementedError

    def tls_session_due(self) -> asyncio.Transport | None:
        """Its transport, the first time it is asked after a stream ended (TLS 1.3 session
        tickets arrive after the handshake), for the TLS origin's session cache; else None."""
        raise NotImplementedError

    def retire(self, reason: str) -> None:
        """No new streams (GOAWAY-like); the open ones finish, then it closes. An idle
        carrier closes at once (HTTP/1.1 always: it has at most one stream)."""
        raise NotImplementedError

    def close(self, reason: str) -> None:
        """Close gracefully now: pending writes flushed, then FIN."""
        raise NotImplementedError

    def close_within(self, reason: str, linger: float) -> None:
        """As `close`, and reset (RST) if not closed within `linger` seconds (0: at once).

        SO_LINGER's promise without its cost: pending writes are flushed and FIN sent, and
        if that has not finished within `linger` seconds the socket is reset. Setting SO_LINGER
        > 0 itself would make close() block the event loop (Linux waits in close() even on a
        non-blocking socket: 2 s measured for linger 2 s and an unacknowledged send), which
        would freeze the whole sidecar on a dead upstream during a rollout."""
        if linger <= 0:
            self.abort(reason)
            return
        self.close(reason)
        if self.state is not CarrierState.CLOSED:
            asyncio.get_running_loop().call_later(linger, self._linger_expired)

    def _linger_expired(self) -> None:
        if self.state is not CarrierState.CLOSED:
            self.abort(self.close_reason or "drain")

    def abort(self, reason: str) -> None:
        """Reset now (RST): its state is unknown and it must never be reused."""
        raise NotImplementedError


# --- open to interpreted code (see the module's docstring) ----------------------------------------
@mypyc_attr(allow_interpreted_subclasses=True)
class AppExchangeBase(AppExchange):
    __slots__ = ()


@mypyc_attr(allow_interpreted_subclasses=True)
class AppStreamBase(AppStream):
    __slots__ = ()


@mypyc_attr(allow_interpreted_subclasses=True)
class EndpointUserBase(EndpointUser):
    __slots__ = ()


@mypyc_attr(allow_interpreted_subclasses=True)
class EndpointStreamBase(EndpointStream):
    __slots__ = ()


@mypyc_attr(allow_interpreted_subclasses=True)
class StreamWaiterBase(StreamWaiter):
    __slots__ = ()


@mypyc_attr(allow_interpreted_subclasses=True)
class CarrierOwnerBase(CarrierOwner):
    __slots__ = ()


@mypyc_attr(allow_interpreted_subclasses=True)
class CarrierBase(Carrier):
    __slots__ = ()
