"""One request and its response: attach an upstream connection, stream both ways, retry safely.

Phases (enum + table): ROUTED -> WAITING (for a pooled connection) -> ATTACHED (request going
out, response coming back) -> DONE, or -> TUNNEL for CONNECT and accepted upgrades. A failure
before any response byte reached the app may be retried, by what the try was (SPEC section 5,
docs/retries.md): one that wrote nothing (connect failures) whatever the method; the
keep-alive race on a reused connection once and free, when the request is safe to replay;
anything later per the cluster's retry policy, for replayable requests. After a response byte
the app's connection is cut, because a half-sent response cannot be taken back.

The exchange is driven by callbacks from both protocols, never by a task: the common case
(an idle pooled connection, a small response) runs without a single await or timer.
"""

from __future__ import annotations

import enum
import logging
import math
from typing import TYPE_CHECKING, Any, Final

from sidecar.errors import (
    BadUpstreamResponse,
    ConnectFailed,
    SidecarError,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.flow_control import PEER_WRITE_FULL, WAITING_UPSTREAM
from sidecar.http import writer
from sidecar.http.headers import Headers
from sidecar.http.parser import RequestHead, ResponseHead
from sidecar.policy.retry import STALE, failed_try, is_keepalive_race
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.connection import ConnectionUser, UpstreamConnection
from sidecar.upstream.pool import Pool

if TYPE_CHECKING:
    from sidecar.downstream.protocol import DownstreamProtocol

log = logging.getLogger("sidecar.exchange")

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_CONNECTION_ESTABLISHED: Final = b"HTTP/1.1 200 Connection Established\r\n\r\n"
_MAX_REPLAY: Final = 64 * 1024


class Phase(enum.IntEnum):
    ROUTED = 0
    WAITING = 1
    ATTACHED = 2
    BACKOFF = 3
    TUNNEL = 4
    DONE = 5


_PHASES: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.ROUTED: frozenset({Phase.WAITING, Phase.ATTACHED, Phase.BACKOFF, Phase.DONE}),
    Phase.WAITING: frozenset({Phase.ATTACHED, Phase.WAITING, Phase.BACKOFF, Phase.DONE}),
    Phase.ATTACHED: frozenset({Phase.WAITING, Phase.ATTACHED, Phase.BACKOFF, Phase.TUNNEL,
                               Phase.DONE}),
    Phase.BACKOFF: frozenset({Phase.WAITING, Phase.ATTACHED, Phase.DONE}),
    Phase.TUNNEL: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}


class Exchange(ConnectionUser):
    """No `__slots__`: the many per-request fields start as class attributes, and __init__
    sets only the few that depend on the request (one exchange per request, so it counts)."""

    cluster: Cluster | None = None
    pool: Pool | None = None
    conn: UpstreamConnection | None = None
    phase: Phase
    deadline: float = math.inf
    try_deadline: float = math.inf
    attempt: int = 0
    max_attempts: int = 1
    request_done: bool = False  # the app sent the whole request
    request_sent: bool = False  # ... and it all went to the current upstream connection
    # The request body held here: until a connection is attached (pending), and for replay
    # while the request is replayable and small enough. None: nothing is kept (yet).
    body: list[bytes] | None = None
    body_len: int = 0
    trailers: Headers | None = None  # the app's request trailers, kept for a later send
    head_bytes: bytes = b""
    response: ResponseHead | None = None
    response_started: bool = False  # a byte of the response went to the app
    response_done: bool = False
    chunked_out: bool = False
    close_delimited_out: bool = False
    upstream_paused: bool = False
    upgrade_rest: bytes = b""
    status: int = 0
    last_error: SidecarError | None = None
    backoff_handle: Any = None
    policy_token: int | None = None  # see policy/resilience.py
    slot_held: bool = False  # counted in pool.inflight
    stale_retried: bool = False
    waited: bool = False  # app reading is paused (WAITING_UPSTREAM) until a connection comes
    finished_at: float = 0.0  # loop time when recorded as done (0: not recorded)

    def __init__(self, proto: DownstreamProtocol, head: RequestHead, now: float) -> None:
        self.proto = proto
        self.head = head
        self.phase = Phase.ROUTED
        self.started = now
        self.replayable = head.method in IDEMPOTENT or head.idempotency_key
        self.keep_alive = head.keep_alive

    def _phase(self, new: Phase) -> None:
        if new not in _PHASES[self.phase]:
            raise RuntimeError(f"exchange: {self.phase.name} -> {new.name}")
        self.phase = new

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.head.method.decode()} {self.phase.name} "
            f"attempt={self.attempt} cluster={self.cluster.name if self.cluster else None}>"
        )

    # --- starting --------------------------------------------------------------------------------
    def start(self, cluster: Cluster) -> None:
        """Routing chose `cluster`: admit, then find a connection."""
        self.cluster = cluster
        cluster.last_used = self.started
        head = self.head
        timeout = cluster.request_timeout
        if head.timeout_ms is not None and head.timeout_ms > 0:
            timeout = head.timeout_ms / 1000.0
        self.deadline = self.started + timeout
        policies = cluster.policies
        if policies is not None:
            # Raises CircuitOpen.
            self.max_attempts, self.replayable, self.policy_token = policies.start(head)
        if head.method == b"CONNECT" or (
            head.content_length and head.content_length > self.max_replay()
        ):
            self.replayable = False
        self.head_bytes = self._upstream_head()
        self._attempt()

    def max_replay(self) -> int:
        cluster = self.cluster
        if cluster is not None and cluster.policies is not None:
            return int(cluster.policies.max_body_bytes)
        return _MAX_REPLAY

    def _upstream_head(self, now: float | None = None) -> bytes:
        """The request head for the upstream; `now` (a retry): what is left of the deadline
        then goes in `x-sidecar-deadline-ms`."""
        head = self.head
        host = head.host if head.host and not head.absolute else head.authority
        extra: Headers = [(b"Host", host or (self.cluster.name.encode() if self.cluster else b""))]
        if head.chunked:
            extra.append((b"Transfer-Encoding", b"chunked"))
        elif head.content_length is not None:
            extra.append((b"Content-Length", b"%d" % head.content_length))
        if head.upgrade is not None:
            extra.append((b"Connection", b"upgrade"))
            extra.append((b"Upgrade", head.upgrade))
        if self.deadline != math.inf:
            sent_at = self.started if now is None else now
            left = self.deadline - sent_at
            remaining = int(left * 1000) if left > 0 else 0  # not max(): a generic call
            extra.append((b"x-sidecar-deadline-ms", b"%d" % remaining))
        return writer.request_head(head.method, head.target, head.forward, extra)

    def _attempt(self, fresh: bool = False) -> None:
        """Find an endpoint and a connection for the next try. `fresh`: the same endpoint, on
        a newly opened connection (after a stale pooled one)."""
        cluster = self.cluster
        assert cluster is not None
        if not fresh:
            self.attempt += 1  # the free retry after a stale connection is not a policy try
        pool = self.pool  # the previous try's endpoint, if any: another is preferred
        if not (fresh and pool is not None and not pool.closing):
            pool = self.pool = cluster.pick(pool)
        pool.inflight += 1
        self.slot_held = True
        policies = cluster.policies
        if policies is not None and policies.per_try_timeout is not None:
            self.try_deadline = policies.try_deadline(self)
        self.proto.set_deadline(self.next_deadline())
        # CONNECT always opens a new connection: a tunnel must not inherit one that spoke HTTP,
        # and a synchronous hand-over would start the tunnel inside the parser's callback,
        # before the bytes after the CONNECT head (`upgrade_rest`) had been delivered.
        conn = pool.acquire(self, fresh=fresh or self.head.method == b"CONNECT")
        if conn is None:
            self._phase(Phase.WAITING)
            self.waited = True
            self.proto.gate.pause(WAITING_UPSTREAM)
            return
        self._attach(conn)

    # --- Waiter: the pool calls back ------------------------------------------------------------
    def on_pool_connection(self, conn: UpstreamConnection) -> None:
        if self.phase is Phase.DONE:  # defensive: cancelled waiters are never called
            assert self.pool is not None
            self.pool.release(conn)
            return
        try:
            self._attach(conn)
        except Exception as exc:  # the pool's caller (a connect task) would only log it
            self.proto.rescue(exc, "attach")

    def _attach(self, conn: UpstreamConnection) -> None:
        if self.waited:  # an earlier try of this request waited for a connection
            self.waited = False
            self.proto.gate.resume(WAITING_UPSTREAM)
        self._phase(Phase.ATTACHED)
        self.conn = conn
        conn.bind(self, self.head.method)
        if self.proto.write_paused:
            # The app's socket is still full from an earlier (pipelined) response, and the
            # transport will not call pause_writing again before resume_writing: start paused
            # rather than read this response at full speed into a socket that is full.
            self.pause_upstream()
        if self.head.method == b"CONNECT":
            self._open_connect_tunnel(conn)
            return
        self._send()

    def on_pool_error(self, exc: SidecarError) -> None:
        if self.phase is Phase.DONE:
            return
        try:
            self._release_pool_slot()
            # No connection was ever attached to this try: nothing of the request was written.
            self._failed(exc, unsent=True)
        except Exception as failure:
            self.proto.rescue(failure, "pool_error")

    # --- sending ---------------------------------------------------------------------------------
    def _send(self) -> None:
        conn = self.conn
        assert conn is not None
        if conn.write_paused:
            self.proto.gate.pause(PEER_WRITE_FULL)
        body = self.body
        chunked = self.head.chunked
        if body:
            parts = [self.head_bytes]
            if chunked:
                for piece in body:
                    parts.extend(writer.chunk_parts(piece))
            else:
                parts.extend(body)
            if self.request_done and chunked:
                parts.append(writer.last_chunk(self.trailers))
            conn.writelines(parts)
        elif self.request_done and chunked:
            conn.writelines([self.head_bytes, writer.last_chunk(self.trailers)])
        else:
            conn.write(self.head_bytes)
        if not self.replayable:
            self.body = None  # sent; it will never be needed again
        self.request_sent = self.request_done

    def request_body(self, data: bytes) -> None:
        """A piece of the app's request body."""
        self.body_len += len(data)
        if self.replayable and self.body_len > self.max_replay():
            self.replayable = False  # too big to replay: streamed only, never retried
        conn = self.conn
        if conn is not None and self.phase is Phase.ATTACHED:
            conn.write(writer.chunk(data) if self.head.chunked else data)
            if self.replayable:
                if self.body is None:
                    self.body = [data]
                else:
                    self.body.append(data)
            else:
                self.body = None
        else:
            # Not attached yet (waiting, or backing off before a retry): hold it. Reading is
            # paused meanwhile, so this holds at most a read or two.
            if self.body is None:
                self.body = []
            self.body.append(data)

    def request_end(self, trailers: Headers | None) -> None:
        self.request_done = True
        # Kept whichever way the request goes out: on the connection attached now, or by
        # `_send` once one is (new connection, pool wait, retry), trailers included (SPEC 5).
        self.trailers = trailers
        if self.conn is not None and self.phase is Phase.ATTACHED:
            if self.head.chunked:
                self.conn.write(writer.last_chunk(trailers))
            self.request_sent = True
            if self.response_done:
                self._finish()

    # --- ConnectionUser: the upstream connection calls back ---------------------------------------
    def batch_begin(self) -> None:
        self.proto.cork()  # what one upstream read yields leaves in one write to the app

    def batch_end(self) -> None:
        self.proto.uncork()

    def on_response_head(self, head: ResponseHead) -> None:
        status = head.status
        proto = self.proto
        if status < 200 and status != 101:
            if proto.http10:
                return  # HTTP/1.0 clients do not understand interim responses
            proto.write(writer.response_head(status, head.reason, head.forward, []))
            return
        policies = self.cluster.policies if self.cluster is not None else None
        if policies is not None and status >= 500 and self.attempt < self.max_attempts:
            delay = policies.status_retry_delay(self, head)
            if delay is not None:
                # Drop this response; its connection cannot be reused mid-body.
                self._discard_conn("not_reusable", abort=True)
                self._release_pool_slot()
                self._schedule_retry(delay)
                return
        self.response = head
        self.status = status
        extra: Headers = []
        if status == 101:
            if self.head.upgrade is None:
                self._discard_conn("error", abort=True)
                self.fail(BadUpstreamResponse("101 response to a request that did not upgrade"))
                return
            extra.append((b"Connection", b"upgrade"))
            upgrade = next((v for n, v in head.headers if n.lower() == b"upgrade"), None)
            if upgrade is not None:
                extra.append((b"Upgrade", upgrade))
        elif head.bodyless:
            if head.content_length is not None and status != 204:
                extra.append((b"Content-Length", b"%d" % head.content_length))
        elif head.content_length is not None:
            extra.append((b"Content-Length", b"%d" % head.content_length))
        elif proto.http10:
            self.close_delimited_out = True
            self.keep_alive = False
        else:
            self.chunked_out = True
            extra.append((b"Transfer-Encoding", b"chunked"))
        if self.head.upgrade is not None and status != 101:
            self.keep_alive = False  # the app's parser already treated its request as upgraded
        if status != 101:
            # An answer that begins before the app finished sending (413, an early 200) ends
            # the app's connection (on_response_end): say so now, in the head, or the app
            # sends its next request into a socket about to close.
            if not self.keep_alive or not self.request_done or proto.closing_after_response():
                self.keep_alive = False
                extra.append((b"Connection", b"close"))
            elif proto.http10:
                extra.append((b"Connection", b"keep-alive"))
        self.response_started = True
        proto.write(writer.response_head(status, head.reason, head.forward, extra))

    def on_response_body(self, data: bytes) -> None:
        if self.chunked_out:
            if len(data) > 4096:
                self.proto.writelines(writer.chunk_parts(data))
            else:
                self.proto.write(writer.chunk(data))
        else:
            self.proto.write(data)

    def on_response_end(self, trailers: Headers | None) -> None:
        if self.response is None:
            return  # a dropped response (retry) or an interim one
        if self.chunked_out:
            self.proto.write(writer.last_chunk(trailers))
        self.response_done = True
        if self.status == 101:
            return  # on_upgrade follows
        if not self.request_done:
            # The upstream answered before the app finished sending (e.g. 413): the upstream
            # connection's request framing is unfinished, so it cannot be reused, and the app
            # must not send the rest into a connection that will take another request.
            self.keep_alive = False
            self._discard_conn("not_reusable")
        self._finish()

    def on_upgrade(self, rest: bytes) -> None:
        conn = self.conn
        if conn is None or self.status != 101:
            return
        self._phase(Phase.TUNNEL)
        conn.to_tunnel()
        assert self.pool is not None
        self.pool.discard(conn, "tunnel")
        self._release_pool_slot()
        self.conn = None
        self._settle(None)  # as for CONNECT: the upgrade request is over
        self.proto.start_tunnel(self, conn, to_app=rest)

    def on_upstream_error(self, exc: UpstreamError) -> None:
        if self.phase in (Phase.DONE, Phase.TUNNEL):
            return
        conn = self.conn
        # A reused keep-alive connection that closed before a byte of answer, right after our
        # request was written: the upstream closed it while idle and our request crossed its
        # FIN. Not the upstream's failure. Later than that, the endpoint dropped a request it
        # had: a reset (SPEC section 5).
        stale = False
        if conn is not None and isinstance(exc, UpstreamReset):
            now = self.proto.loop.time()
            stale = is_keepalive_race(conn.requests > 1, conn.response_started,
                                      now - conn.taken_at)
            if stale and self.pool is not None:
                self.pool.note_race(conn, now)
        self._discard_conn("error", abort=True)
        self._failed(exc, stale=stale)

    def on_internal_error(self, exc: Exception) -> None:
        # The connection let go of us and aborts itself; `fail` takes it out of the pool.
        self.proto.rescue(exc, "response")

    def on_upstream_pause_writing(self) -> None:
        self.proto.gate.pause(PEER_WRITE_FULL)

    def on_upstream_resume_writing(self) -> None:
        self.proto.gate.resume(PEER_WRITE_FULL)

    # --- backpressure from the app's side ---------------------------------------------------------
    def pause_upstream(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None and not self.upstream_paused:
            self.upstream_paused = True
            conn.transport.pause_reading()

    def resume_upstream(self) -> None:
        conn = self.conn
        if self.upstream_paused:
            self.upstream_paused = False
            if conn is not None and conn.transport is not None:
                conn.transport.resume_reading()

    # --- CONNECT ----------------------------------------------------------------------------------
    def _open_connect_tunnel(self, conn: UpstreamConnection) -> None:
        self._phase(Phase.TUNNEL)
        conn.to_tunnel()
        assert self.pool is not None
        self.pool.discard(conn, "tunnel")
        self._release_pool_slot()
        self.conn = None
        self.status = 200
        self.response_started = True
        # The request is over once the tunnel stands (the bytes after it are not requests):
        # it gives its breaker slot back now, or every tunnel would hold one for good.
        self._settle(None)
        self.proto.write(_CONNECTION_ESTABLISHED)
        self.proto.start_tunnel(self, conn, to_upstream=self.upgrade_rest)

    # --- endings ---------------------------------------------------------------------------------
    def _release_pool_slot(self) -> None:
        if self.slot_held:
            self.slot_held = False
            assert self.pool is not None
            self.pool.inflight -= 1

    def _discard_conn(self, reason: str, abort: bool = False) -> None:
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        conn.user = None  # nothing more of what it reads may reach this exchange
        if self.upstream_paused:
            self.upstream_paused = False
        assert self.pool is not None
        self.pool.discard(conn, reason, abort=abort)

    def _finish(self) -> None:
        """Both directions complete: return the connection, record, let the next request go."""
        now = self.proto.loop.time()  # one clock read for the pool, the stats and the app side
        conn = self.conn
        if conn is not None:
            self.conn = None
            if self.upstream_paused:
                self.upstream_paused = False
                if conn.transport is not None:
                    conn.transport.resume_reading()
            assert self.pool is not None
            self.pool.release(conn, now)
        self._release_pool_slot()
        self._record(None, now)
        self._phase(Phase.DONE)
        self.proto.exchange_done(self, self.keep_alive)

    def _record(self, error: SidecarError | None, now: float = 0.0) -> None:
        cluster = self.cluster
        if cluster is None:
            return
        if not now:
            now = self.proto.loop.time()
        self.finished_at = now
        cluster.stats.request_done(self.proto.listener_name, self.status, now - self.started)
        self._settle(error)

    def _settle(self, error: SidecarError | None) -> None:
        """Tell the breaker and outlier detection how the request ended; once (the token)."""
        cluster = self.cluster
        policies = cluster.policies if cluster is not None else None
        token = self.policy_token
        if policies is not None and token:
            self.policy_token = None
            pool = self.pool
            endpoint = pool.key if pool is not None else None
            policies.on_done(token, self.status, self.attempt, endpoint, error)

    def _failed(self, exc: SidecarError, stale: bool = False, unsent: bool = False) -> None:
        """A try failed. Retry when that is safe and allowed, else answer or cut. `unsent`:
        the try never had a connection, so it wrote nothing."""
        self.last_error = exc
        self._release_pool_slot()
        if not self.response_started and self._may_retry(exc, stale, unsent):
            return
        self.fail(exc)

    def _may_retry(self, exc: SidecarError, stale: bool, unsent: bool) -> bool:
        if self.phase in (Phase.TUNNEL, Phase.DONE):
            return False
        before_write = exc.before_write
        if not isinstance(exc, UpstreamError) and not before_write:
            return False  # a local refusal (pool_timeout...)
        # An unsent try's body is all still here: nothing was written, and the app's socket
        # is not read while a try has no connection (WAITING_UPSTREAM), so what is held is a
        # read or two whatever the body's size. A try that did write is replayed only if the
        # request is replayable (then its body was kept).
        kind = failed_try(before_write=before_write, wrote=not unsent,
                          replayable=self.replayable, stale=stale)
        if kind is None:
            return False
        cluster = self.cluster
        assert cluster is not None
        if kind == STALE and not self.stale_retried:
            # One free retry on a fresh connection: the app never sees this race.
            self.stale_retried = True
            cluster.stats.retried("stale")
            self._retry_now(fresh=True)
            return True
        policies = cluster.policies
        if policies is None:
            return False
        # A second race in one request (a waiter for a fresh connection may be handed one
        # released by another request) still is not the endpoint's fault, but is budgeted.
        delay = policies.retry_delay(self, exc, kind == STALE)
        if delay is None:
            return False
        self._schedule_retry(delay)
        return True

    def _retry_now(self, fresh: bool = False) -> None:
        self.backoff_handle = None
        if self.phase is Phase.DONE:
            return
        if self.phase is Phase.WAITING and self.pool is not None:
            self.pool.cancel(self)
        self.response = None
        self.status = 0
        self.request_sent = False
        if self.deadline != math.inf:
            self.head_bytes = self._upstream_head(self.proto.now())  # the deadline left now
        try:
            self._attempt(fresh=fresh)
        except SidecarError as exc:
            self.fail(exc)
        except Exception as exc:  # a loop timer: nobody above us would answer the app
            self.proto.rescue(exc, "retry")

    def _schedule_retry(self, delay: float) -> None:
        if delay <= 0:
            self._retry_now()
            return
        self._phase(Phase.BACKOFF)
        self.backoff_handle = self.proto.loop.call_later(delay, self._retry_now)

    def fail(self, exc: SidecarError) -> None:
        """Answer the app with the sidecar's own error, or cut the connection if a response
        has already begun."""
        if self.phase is Phase.DONE:
            return
        self._stop_waiting()
        if self.waited:  # also when a try waited and the request ends in a later backoff
            self.waited = False
            self.proto.gate.resume(WAITING_UPSTREAM)
        if self.conn is not None:
            self._discard_conn("timeout" if isinstance(exc, UpstreamTimeout) else "error",
                               abort=True)
        self._release_pool_slot()  # e.g. pool.acquire() raised after _attempt took the slot
        if not exc.cluster and self.cluster is not None:
            exc.cluster = self.cluster.name
        self.last_error = exc
        self.status = exc.status
        self._record(exc)
        if self.cluster is not None:
            self.cluster.stats.local_error(exc.code)
        self._phase(Phase.DONE)
        if self.response_started:
            self.proto.abort_after_partial_response(self, exc)
        else:
            self.proto.error_response(self, exc)

    def on_deadline(self, now: float) -> None:
        """The request deadline (or the try's) passed."""
        if self.phase in (Phase.DONE, Phase.TUNNEL):
            return
        if now < self.deadline and now >= self.try_deadline:
            # Per-try timeout: this try is over, the request may go on. Once only: the next
            # try sets its own; meanwhile (backoff) only the request deadline applies.
            self.try_deadline = math.inf
            if self.response_started or not self.replayable:
                # No other try can follow (the response is reaching the app, or the body grew
                # too large to replay): abandoning this one would only turn it into a 504.
                return
            if self.phase is Phase.WAITING and self.pool is not None:
                self.pool.cancel(self)  # no connection yet: stop waiting for one
            self._discard_conn("timeout", abort=True)
            self._failed(UpstreamTimeout("per-try timeout"))
            return
        if self.phase is Phase.ROUTED and self.attempt == 0 and self.cluster is not None:
            # Still waiting for the cluster's first discovery answer (a forward-proxy host
            # resolving): nothing was ever sent, the name did not resolve in time.
            self.fail(ConnectFailed(
                f"{self.cluster.name}: no address resolved within "
                f"{now - self.started:.3f}s", self.cluster.name))
            return
        self.fail(UpstreamTimeout(f"request timeout after {now - self.started:.3f}s"))

    def _stop_waiting(self) -> bool:
        """Cancel a pending backoff and leave the pool's queue. True if it was queued."""
        if self.backoff_handle is not None:
            self.backoff_handle.cancel()
            self.backoff_handle = None
        if self.phase is Phase.WAITING and self.pool is not None:
            self.pool.cancel(self)
            return True
        return False

    def next_deadline(self) -> float:
        # Not min(): compiled, a comparison of two floats is inline, min() a generic call.
        return self.deadline if self.deadline < self.try_deadline else self.try_deadline

    def abandon(self) -> None:
        """The app went away mid-exchange: stop, free what we hold."""
        if self.phase is Phase.DONE:
            return
        self._stop_waiting()
        if self.phase is not Phase.TUNNEL:
            self._discard_conn("error", abort=True)
        self._release_pool_slot()
        policies = self.cluster.policies if self.cluster is not None else None
        if policies is not None:
            policies.on_abandon(self)
        self.phase = Phase.DONE
