"""One upstream connection: the network-facing `asyncio.Protocol`, a request out, a response in.

States (Envoy's pool client states, trimmed): CONNECTING -> IDLE <-> ACTIVE -> CLOSED, and
ACTIVE -> TUNNEL when an Upgrade/CONNECT turns it into a byte pipe that never returns to the
pool. The pool sees only the narrow contract: `is_idle()`, `has_expired(now)`, `is_closed()`.
Response bytes are parsed here and handed, event by event, to the bound *user* (an exchange
or a tunnel); this module knows nothing of downstream.
"""

from __future__ import annotations

import asyncio
import enum
import math
import select
import socket
import ssl
import struct
from typing import TYPE_CHECKING, Any, Final, cast

from mypy_extensions import mypyc_attr

from sidecar.errors import BadUpstreamResponse, ConnectFailed, UpstreamError, UpstreamReset
from sidecar.flow_control import WRITE_HIGH_WATER, WRITE_LOW_WATER
from sidecar.http.headers import Headers
from sidecar.http.parser import ResponseHead, ResponseParser, ResponseSink

if TYPE_CHECKING:
    from sidecar.upstream.pool import Pool


class State(enum.IntEnum):
    CONNECTING = 0
    IDLE = 1
    ACTIVE = 2
    TUNNEL = 3
    CLOSED = 4


_TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.CONNECTING: frozenset({State.IDLE, State.ACTIVE, State.CLOSED}),
    State.IDLE: frozenset({State.ACTIVE, State.CLOSED}),
    State.ACTIVE: frozenset({State.IDLE, State.TUNNEL, State.CLOSED}),
    State.TUNNEL: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


@mypyc_attr(allow_interpreted_subclasses=True)
class ConnectionUser:
    """What a connection reports to whoever holds it (an exchange, or a tunnel). A base class,
    not a `typing.Protocol`, so that compiled code calls it directly (see `ResponseSink`)."""

    __slots__ = ()

    def on_response_head(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_response_end(self, trailers: Headers | None) -> None:
        raise NotImplementedError

    def on_upgrade(self, rest: bytes) -> None:
        raise NotImplementedError

    def on_upstream_error(self, exc: UpstreamError) -> None:
        raise NotImplementedError

    def on_upstream_pause_writing(self) -> None:
        raise NotImplementedError

    def on_upstream_resume_writing(self) -> None:
        raise NotImplementedError

    def on_internal_error(self, exc: Exception) -> None:
        """An unexpected exception in one of this user's callbacks: the connection has let go
        of it (and will be aborted); the user answers whoever is waiting."""
        raise NotImplementedError

    def batch_begin(self) -> None:
        """What the parser hands over from one read follows, until `batch_end`."""

    def batch_end(self) -> None:
        pass


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


class UpstreamConnection(ResponseSink, asyncio.Protocol):
    __slots__ = (
        "pool",
        "key",
        "state",
        "transport",
        "parser",
        "user",
        "created_at",
        "expires_at",
        "idle_since",
        "taken_at",
        "fd",
        "keepalive_until",
        "keepalive_timeout",
        "requests",
        "reusable",
        "response_started",
        "close_reason",
        "write_paused",
        "tls_resumed",
        "tls_captured",
        "_in_feed",
        "_end_pending",
        "_end_trailers",
    )

    def __init__(self, pool: Pool, key: str, now: float, expires_at: float) -> None:
        self.pool = pool
        self.key = key
        self.state = State.CONNECTING
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(self)
        self.user: ConnectionUser | None = None
        self.created_at = now
        self.expires_at = expires_at  # jittered max_lifetime
        self.idle_since = now
        self.taken_at = now  # loop time the pool last handed it to a request (its write)
        self.fd = -1  # the socket's descriptor, for `peer_gone`
        self.keepalive_until = math.inf  # the upstream's `Keep-Alive: timeout=`, minus a margin
        self.keepalive_timeout: float | None = None  # as the upstream last announced it
        self.requests = 0  # requests started on this connection
        self.reusable = True
        self.response_started = False
        self.close_reason = ""
        self.write_paused = False
        self.tls_resumed: bool | None = None
        self.tls_captured = False
        # While a read is being parsed, the end of a response is held until the whole read
        # is parsed: the exchange returns the connection to the pool on that end, and bytes
        # after it in the same read (that nobody asked for) must first mark it unreusable.
        self._in_feed = False
        self._end_pending = False
        self._end_trailers: Headers | None = None

    # --- the pool's view ------------------------------------------------------------------------
    def is_idle(self) -> bool:
        return self.state is State.IDLE

    def is_closed(self) -> bool:
        return self.state is State.CLOSED

    def idle_expiry(self, idle_timeout: float) -> float:
        """When this idle connection stops being safe to hand out."""
        when = self.idle_since + idle_timeout  # not min(): a generic call, compiled
        if self.keepalive_until < when:
            when = self.keepalive_until
        return self.expires_at if self.expires_at < when else when

    def has_expired(self, now: float, idle_timeout: float) -> bool:
        return now >= self.idle_expiry(idle_timeout)

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

    def _transition(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"connection {self.key}: {self.state.name} -> {new.name}")
        self.state = new

    # --- used by the pool and the exchange --------------------------------------------------------
    def bind(self, user: ConnectionUser, method: bytes) -> None:
        """Hand the connection to a request; the response parser expects `method`'s answer."""
        if self.state is not State.IDLE:  # IDLE -> ACTIVE is in the table: checked otherwise
            self._transition(State.ACTIVE)
        self.state = State.ACTIVE
        self.user = user
        self.requests += 1
        self.response_started = False
        self.parser.expect(method)

    def unbind(self) -> None:
        """The exchange is done with it: back to idle (the pool decides what happens next)."""
        self.user = None
        if self.state is State.ACTIVE:
            self.state = State.IDLE  # ACTIVE -> IDLE: always in the table

    def to_tunnel(self) -> None:
        self._transition(State.TUNNEL)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        transport = self.transport
        if transport is not None:
            transport.writelines(parts)

    def close(self, reason: str) -> None:
        """Graceful: pending writes are flushed, then FIN."""
        if self.state is State.CLOSED:
            return
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.close()
        else:
            self._closed()

    def abort(self, reason: str) -> None:
        """Now, with RST: for a connection in an unknown state that must never be reused."""
        if self.state is State.CLOSED:
            return
        self.close_reason = self.close_reason or reason
        transport = self.transport
        if transport is not None:
            reset(transport)
        else:
            self._closed()

    def close_within(self, reason: str, linger: float) -> None:
        """SO_LINGER's promise without its cost: pending writes are flushed and FIN sent, and
        if that has not finished within `linger` seconds the socket is reset. Setting SO_LINGER
        > 0 itself would make close() block the event loop (Linux waits in close() even on a
        non-blocking socket: 2 s measured for linger 2 s and an unacknowledged send), which
        would freeze the whole sidecar on a dead upstream during a rollout. `linger` 0: RST."""
        if linger <= 0:
            self.abort(reason)
            return
        self.close(reason)
        if self.state is not State.CLOSED:
            asyncio.get_running_loop().call_later(linger, self._linger_expired)

    def _linger_expired(self) -> None:
        if self.state is not State.CLOSED:
            self.abort(self.close_reason or "drain")

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
        if self.user is None or self.state is not State.ACTIVE:
            # Bytes on an idle connection: the upstream is confused or closing. Never reuse it.
            self.reusable = False
            self.abort("error")
            return
        self.response_started = True
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
        if user is not None and self.state is State.ACTIVE:
            try:
                self.parser.eof()
            except Exception as exc:
                self._eof_failed(exc, user)
        return False  # close our side too

    def _eof_failed(self, exc: Exception, user: ConnectionUser) -> None:
        if isinstance(exc, BadUpstreamResponse):
            self._fail(
                UpstreamReset(
                    "upstream closed the connection before a complete response"
                    if self.response_started
                    else "upstream closed the connection before responding"
                )
            )
        else:
            self._user_failed(exc, user)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        user = self.user
        if user is not None and self.state is State.ACTIVE:
            detail = f"connection lost: {exc}" if exc else "upstream closed the connection"
            err: UpstreamError = UpstreamReset(detail)
            tls = self.pool.tls
            if (isinstance(exc, ssl.SSLError) and tls is not None and self.requests == 1
                    and not self.response_started):
                # A TLS 1.3 server checks our client certificate after our side of the
                # handshake ended: its alert, on the first read, is a failure to connect.
                err = ConnectFailed(f"{self.key}: TLS: {tls.describe_error(exc)}")
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

    def _user_failed(self, exc: Exception, user: ConnectionUser) -> None:
        """`user` (bound when the read began; it may have let go since) raised something
        unexpected from a callback: this connection's state is unknown (never reuse it), and
        the user answers for itself."""
        self.user = None
        self.reusable = False
        self.abort("error")
        user.on_internal_error(exc)

    def _closed(self) -> None:
        was_idle = self.state is State.IDLE
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            if not self.close_reason:
                self.close_reason = "remote_closed"
            self.pool.on_closed(self, was_idle)

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
            self.keepalive_until = self.pool.now() + timeout - min(1.0, timeout * 0.1)
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
