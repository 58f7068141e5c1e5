"""One upstream HTTP/1.1 connection: an `EndpointStream` and the `Carrier` that carries it.

The network-facing `asyncio.Protocol`: a request out, a response in, one at a time. Its states
are `streams.CarrierState`, changed only through `_transition` and the table
`streams.CARRIER_TRANSITIONS`: CONNECTING -> IDLE <-> ACTIVE -> CLOSED, and ACTIVE -> TUNNEL
when an Upgrade/CONNECT turns it into a byte pipe that never returns to the pool. The pool
talks to it only through the `Carrier` methods; it tells the pool about itself through its
`CarrierOwner`, without importing the pool. Response bytes are parsed here and handed, event
by event, to the bound `EndpointUser` (an exchange); this module knows nothing of downstream.
"""

from __future__ import annotations

import asyncio
import math
import select
import socket
import ssl
import struct
from typing import Any, Final, cast

from sidecar.errors import BadUpstreamResponse, ConnectFailed, UpstreamError, UpstreamReset
from sidecar.flow_control import WRITE_HIGH_WATER, WRITE_LOW_WATER
from sidecar.http import writer
from sidecar.http.headers import Headers
from sidecar.http.parser import RequestHead, ResponseHead, ResponseParser, ResponseSink
from sidecar.streams import (
    CARRIER_TRANSITIONS,
    Carrier,
    CarrierOwner,
    CarrierState,
    EndpointStream,
    EndpointUser,
)

# Close an upstream socket right away with RST (SO_LINGER on, 0 s): used for connections that
# must not be reused and whose state is unknown (timeouts, protocol errors).
_LINGER_ABORT: Final = struct.pack("ii", 1, 0)


def reset(transport: asyncio.Transport) -> None:
    """Close now with RST (SO_LINGER on, 0 s): no TIME_WAIT, nothing more sent. For sockets
    in an unknown state, and for whatever is still busy at a drain's grace."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        except OSError:
            pass
    transport.abort()


# Asking the kernel whether an idle connection's peer has closed it (or sent anything: on an
# idle HTTP/1.1 connection that too means it must not be reused): one poll(2) with a zero
# timeout on the connection's descriptor, through one poll object for the whole process
# (registering a descriptor is a dict insert, not a system call). Measured here: 0.7 to 1.2 us
# from Python, against 24 us for a whole request; the pool asks it only of endpoints that
# have been seen closing idle connections (see upstream/pool.py).
_POLL: Final = select.poll()
_GONE_EVENTS: Final = (
    select.POLLIN | select.POLLPRI | select.POLLRDHUP | select.POLLERR | select.POLLHUP
)


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Heads and bodies go out in separate writes; with Nagle on, the second waits for the
    peer's delayed ACK (40 ms on Linux). Neither loop guarantees TCP_NODELAY: set it."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class UpstreamConnection(ResponseSink, EndpointStream, Carrier, asyncio.Protocol):
    __slots__ = (
        "owner",
        "key",
        "state",
        "transport",
        "parser",
        "user",
        "created_at",
        "expires_at",
        "_idle_since",
        "_taken_at",
        "fd",
        "keepalive_until",
        "keepalive_timeout",
        "requests",
        "reusable",
        "_response_begun",
        "close_reason",
        "write_paused",
        "tls_resumed",
        "tls_captured",
        "_chunked",
        "_reading_paused",
        "_in_feed",
        "_end_pending",
        "_end_trailers",
    )

    def __init__(self, owner: CarrierOwner, key: str, now: float, expires_at: float) -> None:
        self.owner = owner
        self.key = key
        self.state = CarrierState.CONNECTING
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(self)
        self.user: EndpointUser | None = None
        self.created_at = now
        self.expires_at = expires_at  # jittered max_lifetime
        self._idle_since = now
        self._taken_at = now  # when the pool last handed it to a request (its write)
        self.fd = -1  # the socket's descriptor, for `peer_gone`
        self.keepalive_until = math.inf  # the upstream's `Keep-Alive: timeout=`, minus a margin
        self.keepalive_timeout: float | None = None  # as the upstream last announced it
        self.requests = 0  # requests started on this connection
        self.reusable = True
        self._response_begun = False
        self.close_reason = ""
        self.write_paused = False
        self.tls_resumed: bool | None = None
        self.tls_captured = False
        self._chunked = False  # the current request's body goes out chunked
        self._reading_paused = False  # pause_response
        # While a read is being parsed, the end of a response is held until the whole read
        # is parsed: the exchange returns the connection to the pool on that end, and bytes
        # after it in the same read (that nobody asked for) must first mark it unreusable.
        self._in_feed = False
        self._end_pending = False
        self._end_trailers: Headers | None = None

    def _transition(self, new: CarrierState) -> None:
        if new not in CARRIER_TRANSITIONS[self.state]:
            raise RuntimeError(f"connection {self.key}: {self.state.name} -> {new.name}")
        self.state = new

    # --- Carrier: what the pool asks ------------------------------------------------------------
    def capacity(self) -> int:
        return 1 if self.state is CarrierState.IDLE and self.reusable else 0

    def open_stream(self, user: EndpointUser, method: bytes, now: float) -> EndpointStream:
        self._taken_at = now
        self.bind(user, method)
        return self

    def usable(self, now: float, idle_timeout: float) -> bool:
        # `reusable` too: between the EOF of an upstream closing an idle connection and its
        # connection_lost (a loop iteration later) the state is still IDLE.
        return (self.state is CarrierState.IDLE and self.reusable
                and now < self.expiry(idle_timeout))

    def expiry(self, idle_timeout: float) -> float:
        when = self._idle_since + idle_timeout  # not min(): a generic call, compiled
        if self.keepalive_until < when:
            when = self.keepalive_until
        return self.expires_at if self.expires_at < when else when

    def streams_opened(self) -> int:
        return self.requests

    def idle_for(self, now: float) -> float:
        """Seconds since it last became idle (its response ended, or it connected)."""
        return now - self._idle_since

    def connected(self, now: float) -> None:
        """The connect (and TLS handshake) succeeded: IDLE, ready for a stream."""
        self._transition(CarrierState.IDLE)
        self._idle_since = now

    def parked(self, now: float) -> None:
        """Back in the pool's idle stack (or handed on) at `now`."""
        self._idle_since = now

    def retire(self, reason: str) -> None:
        self.reusable = False
        if self.state is not CarrierState.ACTIVE:
            self.close(reason)

    def peer_gone(self) -> bool:
        """Has the upstream closed (FIN or RST) or written to this idle connection, by what
        the kernel already holds and the event loop has not read yet? Then it is marked
        unreusable. One system call: ask it only where it can help (the pool decides)."""
        fd = self.fd
        if fd < 0:
            return False
        _POLL.register(fd, _GONE_EVENTS)
        try:
            ready = _POLL.poll(0)
        except OSError:
            ready = [(fd, 0)]
        finally:
            _POLL.unregister(fd)
        if ready:
            self.reusable = False
            return True
        return False

    def tls_handshake(self) -> bool | None:
        """Whether its TLS session was resumed (None: not TLS). Read once, after connecting."""
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return None
        self.tls_resumed = bool(ssl_object.session_reused)
        return self.tls_resumed

    def tls_session_due(self) -> asyncio.Transport | None:
        """Its transport, the first time it is asked after a response: TLS 1.3 tickets
        arrive after the handshake, and by the end of a response they are in."""
        if self.tls_captured or self.transport is None:
            return None
        self.tls_captured = True
        return self.transport

    # --- binding (the pool's and tests' view of a stream) -----------------------------------------
    def bind(self, user: EndpointUser, method: bytes) -> None:
        """Hand the connection to a request; the response parser expects `method`'s answer."""
        self._transition(CarrierState.ACTIVE)
        self.user = user
        self.requests += 1
        self._response_begun = False
        self.parser.expect(method)

    def unbind(self, now: float) -> None:
        """The exchange is done with it: back to idle (the pool decides what happens next)."""
        self.user = None
        if self.state is CarrierState.ACTIVE:
            self._transition(CarrierState.IDLE)
            self._idle_since = now
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    # --- EndpointStream: what the exchange asks -----------------------------------------------
    def endpoint(self) -> str:
        return self.key

    def reused(self) -> bool:
        return self.requests > 1

    def race_lost(self, now: float) -> None:
        self.owner.race_lost(self, self._taken_at - self._idle_since, now)

    def writing_paused(self) -> bool:
        return self.write_paused

    def send_head(
        self, head: RequestHead, authority: bytes, deadline_ms: int,
        body: list[bytes] | None, end: bool, trailers: Headers | None,
    ) -> None:
        chunked = self._chunked = head.chunked
        extra: Headers = [(b"Host", authority)]
        if chunked:
            extra.append((b"Transfer-Encoding", b"chunked"))
        elif head.content_length is not None:
            extra.append((b"Content-Length", b"%d" % head.content_length))
        if head.upgrade is not None:
            extra.append((b"Connection", b"upgrade"))
            extra.append((b"Upgrade", head.upgrade))
        if deadline_ms >= 0:
            extra.append((b"x-sidecar-deadline-ms", b"%d" % deadline_ms))
        head_bytes = writer.request_head(head.method, head.target, head.forward, extra)
        transport = self.transport
        if transport is None:
            return
        if body:
            parts = [head_bytes]
            if chunked:
                for piece in body:
                    parts.extend(writer.chunk_parts(piece))
            else:
                parts.extend(body)
            if end and chunked:
                parts.append(writer.last_chunk(trailers))
            transport.writelines(parts)
        elif end and chunked:
            transport.writelines([head_bytes, writer.last_chunk(trailers)])
        else:
            transport.write(head_bytes)

    def send_body(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(writer.chunk(data) if self._chunked else data)

    def send_end(self, trailers: Headers | None) -> None:
        transport = self.transport
        if self._chunked and transport is not None:
            transport.write(writer.last_chunk(trailers))

    def pause_response(self) -> None:
        transport = self.transport
        if transport is not None and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()

    def resume_response(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def release(self, now: float, reusable: bool) -> None:
        if not reusable:
            self.reusable = False
        self.unbind(now)
        self.owner.stream_released(self, now, reusable)

    def reset(self, reason: str) -> None:
        self.user = None  # nothing more of what it reads may reach the exchange
        self._reading_paused = False
        self.owner.stream_reset(self, reason)
        self.abort(reason)

    def detach(self) -> asyncio.Transport | None:
        transport = self.transport
        self.user = None
        if transport is None or self.state is not CarrierState.ACTIVE:
            self.reset("error")
            return None
        self._transition(CarrierState.TUNNEL)
        self.owner.stream_reset(self, "tunnel")
        self._transition(CarrierState.CLOSED)  # the tunnel owns the socket now
        return transport

    # --- closing ---------------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Graceful: pending writes are flushed, then FIN."""
        if self.state is CarrierState.CLOSED:
            return
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.close()
        else:
            self._closed()

    def abort(self, reason: str) -> None:
        """Now, with RST: for a connection in an unknown state that must never be reused."""
        if self.state is CarrierState.CLOSED:
            return
        self.close_reason = self.close_reason or reason
        transport = self.transport
        if transport is not None:
            reset(transport)
        else:
            self._closed()

    # --- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        set_nodelay(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()

    def data_received(self, data: bytes) -> None:
        if self.user is None or self.state is not CarrierState.ACTIVE:
            # Bytes on an idle connection: the upstream is confused or closing. Never reuse it.
            self.reusable = False
            self.abort("error")
            return
        self._response_begun = True
        user = self.user
        # Everything the parser hands over from this read goes to the app in one write.
        user.batch_begin()
        self._in_feed = True
        try:
            self.parser.feed(data)
        except UpstreamError as exc:
            if self._end_pending:
                # The response was complete; what followed it in this read was not asked for.
                # The app has its answer; the connection must never carry another.
                self.reusable = False
            else:
                self._fail(exc)
        except Exception as exc:  # a bug under the user's callbacks: it still answers the app
            self._user_failed(exc, user)
        finally:
            self._in_feed = False
            if self._end_pending:
                # Through a method: the feed may have let go of the user (a retried 5xx), and
                # mypy still holds `self.user` at the non-None tested on entry (mypyc checks
                # reads against that).
                self._deliver_end()
            user.batch_end()

    def eof_received(self) -> bool:
        self.reusable = False
        user = self.user
        if user is not None and self.state is CarrierState.ACTIVE:
            try:
                self.parser.eof()
            except Exception as exc:
                self._eof_failed(exc, user)
        return False  # close our side too

    def _eof_failed(self, exc: Exception, user: EndpointUser) -> None:
        if isinstance(exc, BadUpstreamResponse):
            self._fail(
                UpstreamReset(
                    "upstream closed the connection before a complete response"
                    if self._response_begun
                    else "upstream closed the connection before responding"
                )
            )
        else:
            self._user_failed(exc, user)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        user = self.user
        if user is not None and self.state is CarrierState.ACTIVE:
            detail = f"connection lost: {exc}" if exc else "upstream closed the connection"
            err: UpstreamError = UpstreamReset(detail)
            if isinstance(exc, ssl.SSLError) and self.requests == 1 and not self._response_begun:
                described = self.owner.tls_error(exc)
                if described is not None:
                    # A TLS 1.3 server checks our client certificate after our side of the
                    # handshake ended: its alert, on the first read, is a failure to connect.
                    err = ConnectFailed(f"{self.key}: TLS: {described}")
            self.user = None
            self._closed()
            try:
                user.on_upstream_error(err)
            except Exception as failure:
                user.on_internal_error(failure)
        else:
            self._closed()
        # Let the transport go now: the connection sits in reference cycles (its parser) that
        # only the cyclic collector frees, and a TLS transport holds uvloop's 256 KiB read
        # buffer and OpenSSL's state; kept until a collection, an upstream that closes every
        # connection grew the heap by ~50 MiB (issue 17).
        self.transport = None

    def _user_failed(self, exc: Exception, user: EndpointUser) -> None:
        """`user` (bound when the read began; it may have let go since) raised something
        unexpected from a callback: this connection's state is unknown (never reuse it), and
        the user answers for itself."""
        self.user = None
        self.reusable = False
        self.abort("error")
        user.on_internal_error(exc)

    def _closed(self) -> None:
        state = self.state
        if state is not CarrierState.CLOSED:
            self._transition(CarrierState.CLOSED)
            if not self.close_reason:
                self.close_reason = "remote_closed"
            self.owner.carrier_closed(self, state is CarrierState.IDLE)

    def _fail(self, exc: UpstreamError) -> None:
        user = self.user
        self.user = None
        self.reusable = False
        self.abort("error")
        if user is not None:
            try:
                user.on_upstream_error(exc)
            except Exception as failure:
                user.on_internal_error(failure)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.user is not None:
            self.user.on_upstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.user is not None:
            self.user.on_upstream_resume_writing()

    # --- ResponseSink: relay to the user -------------------------------------------------------
    def on_response_head(self, head: ResponseHead) -> None:
        if not head.keep_alive:
            self.reusable = False
        if head.keep_alive_timeout is not None:
            self.keepalive_timeout = head.keep_alive_timeout
        user = self.user
        if user is not None:
            user.on_response_head(head)

    def on_response_body(self, data: bytes) -> None:
        user = self.user
        if user is not None:
            user.on_response_body(data)

    def on_response_end(self, trailers: Headers | None) -> None:
        timeout = self.keepalive_timeout
        if timeout is not None:
            # The upstream's idle timer starts when it has sent the response, not at its head
            # (a long download would otherwise retire a fresh connection). Retire a second
            # early (or at 90 % for short timeouts): the upstream's clock and ours are not the
            # same clock, and a request crossing its close is the stale-connection race.
            margin = timeout * 0.1
            self.keepalive_until = self.owner.now() + timeout - (margin if margin < 1.0 else 1.0)
        if self._in_feed:
            self._end_pending = True  # delivered once this read is parsed (data_received)
            self._end_trailers = trailers
            return
        user = self.user
        if user is not None:
            user.on_response_end(trailers)

    def _deliver_end(self) -> None:
        self._end_pending = False
        trailers, self._end_trailers = self._end_trailers, None
        user = self.user
        if user is not None:
            user.on_response_end(trailers)

    def on_upgrade(self, rest: bytes) -> None:
        if self._end_pending:
            self._deliver_end()  # the 101's end comes before the tunnel's first bytes
        user = self.user
        if user is not None:
            user.on_upgrade(rest)

    def get_extra_info(self, name: str) -> Any:
        return self.transport.get_extra_info(name) if self.transport is not None else None

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.key} {self.state.name} requests={self.requests}>"
