"""The app-facing HTTP/1.1 `asyncio.Protocol`, the `AppStream` of one exchange at a time.

It moves bytes and timers only: parsing is `http.parser`, routing `router`, the request's
life `exchange`. Pipelined requests wait their turn (reading pauses while they do), so the
responses go back in order. One wheel deadline per connection covers the head timeout, the
keep-alive idle timeout and the current request's deadline. The exchange sees this object only
as an `AppStream` (sidecar/streams.py): HTTP/1.1's framing (Content-Length, chunked, a
close-delimited body for HTTP/1.0 apps, `Connection` fields) is decided here.

Counters the drain reads have one owner each here: the listener's in-flight count changes only
in `_begin` (+1) and `_let_go` (-1, or handed to a tunnel, which gives it back when it ends),
its connection count only in `connection_made` and `connection_lost` (or handed to a tunnel).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

from sidecar.downstream.context import ListenerContext
from sidecar.downstream.exchange import Exchange, Phase
from sidecar.downstream.tunnel import splice
from sidecar.errors import HeadTimeout, ProtocolError, SidecarError
from sidecar.flow_control import (
    PEER_WRITE_FULL,
    PIPELINED,
    WAITING_UPSTREAM,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    ReadGate,
)
from sidecar.http import writer
from sidecar.http.headers import Headers
from sidecar.http.parser import RequestHead, RequestParser, RequestSink, ResponseHead
from sidecar.rescue import error_response, internal_error
from sidecar.streams import AppExchange, AppStream, Cancellable
from sidecar.timers import Timed
from sidecar.upstream.connection import reset, set_nodelay

_DISCARD_GRACE: Final = 2.0  # how long we keep reading an unwanted request body before closing
_CONNECTION_ESTABLISHED: Final = b"HTTP/1.1 200 Connection Established\r\n\r\n"


class DownstreamProtocol(RequestSink, AppStream, Timed, asyncio.Protocol):
    __slots__ = (
        "ctx",
        "loop",
        "transport",
        "parser",
        "gate",
        "exchange",
        "queue",
        "http10",
        "closed",
        "discarding",
        "deadline",
        "filed_bucket",
        "write_paused",
        "listener_name",
        "peer",
        "upgraded",
        "app_eof",
        "_corked",
        "_out",
        "_draining_queue",
        "wheel",
        "_chunked_out",
        "_close_delimited",
        "_upgrade_rest",
    )

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.wheel = ctx.wheel
        self.listener_name = ctx.name
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(self, ctx.limits.max_header_bytes, ctx.limits.max_headers)
        self.gate: ReadGate = None  # type: ignore[assignment]  # set in connection_made
        self.exchange: Exchange | None = None
        self.queue: deque[tuple[str, Any]] | None = None  # events of pipelined requests
        self.http10 = False
        self.closed = False
        self.discarding = False  # reading the rest of a request nobody will answer again
        self.deadline = math.inf
        self.filed_bucket = 0
        self.write_paused = False
        self.peer: Any = None
        self.upgraded = False
        self.app_eof = False  # the app half-closed: answer what it sent, then close
        self._corked = 0
        self._out: list[bytes] = []
        self._draining_queue = False  # _run_queue is on the stack: it goes on by itself
        self._chunked_out = False  # the current response goes out chunked
        self._close_delimited = False  # ... or ends at our FIN (an HTTP/1.0 app, no length)
        self._upgrade_rest = b""  # what the app sent after its CONNECT/Upgrade head

    def now(self) -> float:
        return self.loop.time()

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        set_nodelay(transport)
        self.gate = ReadGate(transport)
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.stats.downstream_connections += 1
        # A new connection must send a head within header_timeout, like a slow one.
        self.set_deadline(self.loop.time() + ctx.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            # The request became a tunnel; until the upstream side is ready, hold the bytes.
            if self.exchange is not None:
                self._upgrade_rest += data
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        parser = self.parser
        starting = self.exchange is None and not parser.in_head and not self.discarding
        try:
            parser.feed(data)
        except ProtocolError as exc:
            self._bad_request(exc)
            return
        except SidecarError as exc:  # a request-level refusal raised inside a callback
            self._bad_request(ProtocolError(exc.detail))
            return
        except Exception as exc:  # a bug anywhere under the parser's callbacks: still answer
            self.rescue(exc, "request")
            return
        if starting and parser.in_head and self.exchange is None and not self.closed:
            # A head began in this read and is not complete: it has header_timeout from now.
            # (A head complete in one read, the usual case, never needs this deadline.)
            self.set_deadline(self.loop.time() + self.ctx.limits.header_timeout)

    def eof_received(self) -> bool:
        # The app half-closed (`shutdown(SHUT_WR)`, `nc -N`): it sends nothing more. The
        # exchange in progress and pipelined requests are still answered; then we close,
        # rather than leave the app waiting for our EOF until idle_timeout.
        self.app_eof = True
        ex = self.exchange
        return (ex is not None and ex.phase is not Phase.DONE) or bool(self.queue)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        ex = self.exchange
        if ex is not None and ex.phase is not Phase.TUNNEL:
            if ex.phase is not Phase.DONE:
                ex.app_gone()
            self._let_go(ex)
        self._gone()
        self.ctx.stats.downstream_connections -= 1
        self.ctx.changed()

    def _gone(self) -> None:
        """This protocol object is done with the app's connection (closed, or handed to a
        tunnel, which then holds its count)."""
        self.closed = True
        self.ctx.connections.discard(self)
        self.deadline = math.inf
        self.wheel.cancel(self)  # else the wheel keeps this dead connection until its bucket

    def _let_go(self, ex: Exchange) -> None:
        """`ex` is no longer this connection's: the one place the in-flight count drops."""
        if self.exchange is ex:
            self.exchange = None
            self.ctx.stats.inflight -= 1

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.app_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.app_write_resumed()

    # --- writing ----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._corked:
            self._out.append(data)
            return
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        if self._corked:
            self._out.extend(parts)
            return
        transport = self.transport
        if transport is not None and not self.closed:
            transport.writelines(parts)

    def cork(self) -> None:
        """Collect writes until `uncork`: a response head and body parsed from one upstream
        read leave in one syscall instead of two or three."""
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if self._corked == 0 and self._out:
            self._flush()

    def _flush(self) -> None:
        out, self._out = self._out, []
        transport = self.transport
        if transport is None or self.closed:
            return
        if len(out) == 1:
            transport.write(out[0])
            return
        size = 0
        for part in out:  # a loop, not sum(map(len, out)): compiled, it makes no call
            size += len(part)
        if size <= 16384:
            transport.write(b"".join(out))
        else:
            transport.writelines(out)

    # --- AppStream: the exchange's view ---------------------------------------------------------
    def listener(self) -> str:
        return self.listener_name

    def writing_paused(self) -> bool:
        return self.write_paused

    def send_interim(self, head: ResponseHead) -> None:
        if not self.http10:  # HTTP/1.0 clients do not understand interim responses
            self.write(writer.response_head(head.status, head.reason, head.forward, []))

    def send_response_head(self, head: ResponseHead, keep_alive: bool) -> bool:
        status = head.status
        extra: Headers = []
        self._chunked_out = False
        self._close_delimited = False
        if status == 101:
            extra.append((b"Connection", b"upgrade"))
            upgrade = next((v for n, v in head.headers if n.lower() == b"upgrade"), None)
            if upgrade is not None:
                extra.append((b"Upgrade", upgrade))
        elif head.bodyless:
            if head.content_length is not None and status != 204:
                extra.append((b"Content-Length", b"%d" % head.content_length))
        elif head.content_length is not None:
            extra.append((b"Content-Length", b"%d" % head.content_length))
        elif self.http10:
            self._close_delimited = True
            keep_alive = False
        else:
            self._chunked_out = True
            extra.append((b"Transfer-Encoding", b"chunked"))
        if status != 101:
            # A connection that reads the rest of a refused request closes after this answer
            # (never for a drain: the app's client pool is the app's business, SPEC section 6).
            if not keep_alive or self.discarding:
                keep_alive = False
                extra.append((b"Connection", b"close"))
            elif self.http10:
                extra.append((b"Connection", b"keep-alive"))
        self.write(writer.response_head(status, head.reason, head.forward, extra))
        return keep_alive

    def send_response_body(self, data: bytes) -> None:
        if self._chunked_out:
            if len(data) > 4096:
                self.writelines(writer.chunk_parts(data))
            else:
                self.write(writer.chunk(data))
        else:
            self.write(data)

    def send_response_end(self, trailers: Headers | None) -> None:
        if self._chunked_out:
            self.write(writer.last_chunk(trailers))

    def batch_begin(self) -> None:
        self.cork()

    def batch_end(self) -> None:
        self.uncork()

    def done(self, keep_alive: bool) -> None:
        ex = self.exchange
        if ex is not None:
            self.exchange_done(ex, keep_alive)

    def pause_request(self, reason: int) -> None:
        self.gate.pause(reason)

    def resume_request(self, reason: int) -> None:
        self.gate.resume(reason)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        return self.loop.call_later(delay, callback)

    # --- RequestSink ------------------------------------------------------------------------------
    def on_request_head(self, head: RequestHead) -> None:
        if self.parser.finished:
            # The connection is closing (`_close`): a request pipelined behind the one that
            # closed it, parsed from the same read, is never started.
            return
        if self.exchange is not None or self.queue:
            self._enqueue(("head", head))
            return
        self._begin(head)

    def on_request_body(self, data: bytes) -> None:
        if self.queue:
            self._enqueue(("body", data))
            return
        ex = self.exchange
        if ex is not None and ex.phase is not Phase.DONE:
            ex.request_body(data)

    def on_request_end(self, trailers: Headers | None) -> None:
        if self.queue:
            self._enqueue(("end", trailers))
            return
        ex = self.exchange
        if ex is not None and ex.phase is not Phase.DONE:
            ex.request_end(trailers)
        elif self.discarding:
            self._close()

    def on_upgrade(self, rest: bytes) -> None:
        if self.queue:
            self._enqueue(("upgrade", rest))
            return
        self.upgraded = True
        ex = self.exchange
        if ex is not None:
            self._upgrade_rest += rest
            if ex.phase is not Phase.DONE and self.transport is not None:
                self.transport.pause_reading()  # until the tunnel takes over

    def _enqueue(self, event: tuple[str, Any]) -> None:
        if self.queue is None:
            self.queue = deque()
        self.queue.append(event)
        self.gate.pause(PIPELINED)

    # --- requests ---------------------------------------------------------------------------------
    def _begin(self, head: RequestHead) -> None:
        ctx = self.ctx
        now = self.loop.time()
        self.http10 = head.version == "1.0"
        ex = Exchange(self, head, now)
        self.exchange = ex
        ctx.stats.inflight += 1
        try:
            refusal = ctx.admit()
            if refusal is not None:
                raise refusal
            cluster = ctx.cluster_for(head.authority, head.target, head.method == b"CONNECT")
            if not cluster.has_answer:
                ex.await_discovery(cluster)
                return
            ex.start(cluster)  # sets this connection's deadline to the request's
        except SidecarError as exc:
            if ex.phase is not Phase.DONE:
                ex.fail(exc)

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        """The exchange finished (response written, or failed and answered)."""
        if self.exchange is not ex:
            return
        self._let_go(ex)
        ctx = self.ctx
        if ctx.access_log:
            ex.log_access(self.listener_name, "http/1.1", self.loop.time())
        if self.closed:
            ctx.changed()
            return
        # In-flight counts matter to the drain only; connection counts are reported when
        # connections close. So the per-request callback runs only while draining.
        watch = ctx.watch_requests
        if not keep_alive:
            if ex.request_done or self.upgraded:
                self._close()
            else:
                # Read (and drop) the rest of the request before closing, so the app reads
                # our response instead of a reset.
                self.discarding = True
                self.queue = None
                self.gate.resume(PIPELINED)
                self.set_deadline(self.loop.time() + _DISCARD_GRACE)
            if watch:
                ctx.changed()
            return
        # A pipelined head already begun must still arrive within header_timeout.
        limits = ctx.limits
        wait = limits.header_timeout if self.parser.in_head else limits.idle_timeout
        self.set_deadline((ex.finished_at or self.loop.time()) + wait)
        if watch:
            ctx.changed()
        if self.queue:
            self._run_queue()
        if self.app_eof:
            self._close_if_answered()

    def _close_if_answered(self) -> None:
        # Its own method: in exchange_done, mypy holds `self.exchange` at the None it was set to
        # before `_run_queue` started the next one, and mypyc checks each read against that
        # type (a TypeError once it is not None).
        if self.exchange is None and not self.queue:
            self._close()

    def _run_queue(self) -> None:
        # No test of `self.exchange` inline here: mypy would hold it narrowed to None for the
        # loop body though `_begin` sets it, and mypyc checks every read against mypy's type
        # (a TypeError at run time). `_can_begin` and `_deliver_rest` read it afresh.
        queue = self.queue
        assert queue is not None
        if self._draining_queue:
            return  # a request it began ended at once (refused): the loop below goes on
        self._draining_queue = True
        try:
            self._drain_queue(queue)
        finally:
            self._draining_queue = False
        if not queue and self.queue is queue:
            self.queue = None
            if not self.closed:
                self.gate.resume(PIPELINED)

    def _drain_queue(self, queue: deque[tuple[str, Any]]) -> None:
        while queue and self._can_begin():
            kind, value = queue.popleft()
            if kind == "error":
                # Bad bytes after requests that were answered in order: refuse and close.
                self.queue = None
                self.write(error_response(value, close=True))
                self._close()
                return
            if kind == "head":
                self._begin(value)
            elif kind == "end":
                # The rest of a request answered as soon as it began (refused): not handed to
                # on_request_end, which would queue it again behind what is left.
                if self.discarding:
                    self._close()
            elif kind == "upgrade":
                self.upgraded = True
            # else "body" of such a request: dropped
            self._deliver_rest(queue)

    def _can_begin(self) -> bool:
        return self.exchange is None and not self.closed

    def _deliver_rest(self, queue: deque[tuple[str, Any]]) -> None:
        """Deliver the rest of the request just begun to its exchange directly."""
        while queue and queue[0][0] not in ("head", "error"):
            ex = self.exchange
            if ex is None:
                return
            kind, value = queue.popleft()
            if ex.phase is Phase.DONE:
                continue
            if kind == "body":
                ex.request_body(value)
            elif kind == "end":
                ex.request_end(value)
            else:
                self.upgraded = True
                self._upgrade_rest += value

    def send_error(self, exc: SidecarError, request_done: bool, keep_alive: bool) -> None:
        """The sidecar answers for itself (SPEC section 5 error body)."""
        ex = self.exchange
        if ex is None:
            return
        # A bodyless request is complete once its head is: its end event follows at once.
        done = request_done or not (ex.head.has_body or ex.head.method == b"CONNECT")
        # A request refused for what the app sent (an empty Host, a bad port) closes the
        # connection like a parser refusal does (SPEC section 5).
        keep = keep_alive and done and not self.upgraded and not isinstance(exc, ProtocolError)
        if done:
            ex.request_done = True
        ex.keep_alive = keep
        self.write(error_response(exc, close=not keep, head_only=ex.head.method == b"HEAD"))
        self.exchange_done(ex, keep)

    def abort_partial(self, exc: SidecarError) -> None:
        """A response has begun and cannot be completed: cut the connection so that the app
        sees a truncated message, never a wrong one. A framed body (Content-Length, chunked)
        cut by a FIN is visibly short, and the app keeps what it already received. A
        close-delimited body (an HTTP/1.0 app) ends at the FIN, so a FIN would pass the cut off
        as its end: that one is cut with a RST."""
        ex = self.exchange
        if ex is not None:
            self.exchange_done(ex, False)
        if self.transport is not None:
            if self._close_delimited:
                reset(self.transport)
            else:
                self.transport.abort()

    def _bad_request(self, exc: ProtocolError) -> None:
        """Bytes we cannot read unambiguously: answer 400 (431, 408) and close. Nothing of
        the request has been forwarded: an exchange starts only on a complete head."""
        ex = self.exchange
        if ex is not None and ex.phase is not Phase.DONE:
            if ex.request_done or self.queue:
                # The bad bytes come after a complete request still being answered (pipelined):
                # that request, and any queued before the bad one, get their responses first.
                self._enqueue(("error", exc))
                return
            # A framing error in the body of a request already under way: cut both legs.
            ex.fail(exc)
            self._close()
            return
        if self.exchange is None and not self.closed:
            self.write(error_response(exc, close=True))
        self._close()

    def rescue(self, exc: Exception, site: str) -> None:
        """An exception nobody expected reached one of our seams (a parser callback, a pool or
        loop callback, a timer). The app gets an answer, never a silently closed connection:
        400 before routing, 502 `internal` after, or a cut connection if a response had begun.
        Then the connection ends: the parser or the exchange may be in any state, so bytes the
        app still sends are dropped unread for a short grace (so that it reads our answer
        rather than a reset), and the connection is closed."""
        ctx = self.ctx
        ctx.stats.internal_errors += 1
        ex = self.exchange
        err = internal_error(exc, site, ex is not None and ex.cluster is not None)
        self.queue = None
        try:
            if ex is not None and ex.phase is not Phase.DONE:
                ex.keep_alive = False
                ex.fail(err)  # answers (or cuts a begun response) and ends the exchange
            elif ex is None and site == "request" and not self.closed and not self.upgraded:
                # The app's bytes raised before an exchange existed: they were a request.
                # (Elsewhere with no exchange, every request was answered: an error response
                # now would be read as the answer to the app's next request. Just close.)
                self.write(error_response(err, close=True))
        except Exception as again:
            internal_error(again, site + "_rescue", True)
            if ex is not None:
                # The exchange could not end itself: drop it, and reset the app's connection,
                # the one answer left.
                ex.phase = Phase.DONE
                self._let_go(ex)
            self.abort()
            return
        if ex is not None:
            # `fail` found a response under way that it could not complete or cut.
            self._let_go(ex)
        if self.transport is None or self.closed:
            return
        self._flush_out()
        self.upgraded = True  # data_received drops whatever the app still sends
        self.discarding = True
        gate = self.gate
        gate.resume(PIPELINED)
        gate.resume(WAITING_UPSTREAM)
        gate.resume(PEER_WRITE_FULL)
        self.set_deadline(self.loop.time() + _DISCARD_GRACE)
        if self.app_eof:
            self._close()

    def _flush_out(self) -> None:
        # Corked (the error came from inside an upstream read): that read's uncork flushes.
        if self._out and not self._corked:
            self._flush()

    def _close(self) -> None:
        self.parser.finished = True  # nothing the app sends from here on starts a request
        if self.transport is not None and not self.closed:
            if self._out:
                self._flush()
            self.transport.close()

    # --- tunnels ----------------------------------------------------------------------------------
    def start_tunnel(
        self, exchange: AppExchange, endpoint: asyncio.Transport, to_app: bytes,
        established: bool,
    ) -> bool:
        app_transport = self.transport
        if app_transport is None or self.closed:
            endpoint.close()
            return False
        self.upgraded = True
        if established:
            self.write(_CONNECTION_ESTABLISHED)
        if self._out:
            # The 101 head was corked with this upstream read: it must reach the app before
            # the tunnel's first byte, and once `closed` is set below a flush would drop it.
            self._flush()
        ctx = self.ctx
        app_eof = self.app_eof
        # This protocol object is done; the tunnel owns both sockets, and the request's
        # in-flight count until it ends.
        self.exchange = None
        self._gone()

        def finished() -> None:
            ctx.stats.downstream_connections -= 1
            ctx.stats.inflight -= 1
            exchange.tunnel_closed(ctx.loop.time())
            ctx.changed()

        splice(app_transport, endpoint, ctx.tunnels, finished, to_upstream=self._upgrade_rest,
               to_app=to_app, app_eof=app_eof)
        self._upgrade_rest = b""
        return True

    # --- deadlines (Timed) ------------------------------------------------------------------------
    def set_deadline(self, when: float) -> None:
        self.deadline = when
        self.wheel.schedule(self)

    def deadline_changed(self) -> None:
        ex = self.exchange
        if ex is not None:
            self.set_deadline(ex.next_deadline())

    def on_deadline(self, now: float) -> None:
        if self.closed:
            return
        ex = self.exchange
        if ex is not None:
            try:
                if ex.phase is not Phase.DONE:
                    ex.on_deadline(now)
                if self.exchange is ex and ex.phase is not Phase.DONE:
                    self.deadline_changed()
            except Exception as exc:  # the wheel would only log it: answer the app too
                self.rescue(exc, "deadline")
            return
        if self.discarding:
            self._close()
        elif self.parser.in_head:
            self._bad_request(HeadTimeout("request head not received within header_timeout"))
        else:
            self._close()  # idle keep-alive (or a connection that never sent anything)

    # --- draining ---------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return self.exchange is None and not self.parser.in_head

    def close_if_idle(self) -> bool:
        if self.idle and not self.closed:
            self._close()
            return True
        return False

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            reset(self.transport)

    def __repr__(self) -> str:
        return f"<DownstreamProtocol {self.listener_name} exchange={self.exchange!r}>"
