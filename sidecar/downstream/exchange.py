"""One request and its response: attach an endpoint stream, stream both ways, retry safely.

Phases (enum + table): ROUTED -> WAITING (for a pooled stream) -> ATTACHED (request going
out, response coming back) -> DONE, or -> TUNNEL for CONNECT and accepted upgrades. A failure
before any response byte reached the app may be retried, by what the try was (SPEC section 5,
docs/retries.md): one that wrote nothing (connect failures) whatever the method; the
keep-alive race on a reused connection once and free, when the request is safe to replay;
anything later per the cluster's retry policy, for replayable requests. After a response byte
the app's side is cut, because a half-sent response cannot be taken back.

The exchange knows neither leg's protocol: the app side is an `AppStream`, the endpoint side
an `EndpointStream` the pool hands out (sidecar/streams.py). It is driven by callbacks from
both, never by a task: the common case (an idle pooled connection, a small response) runs
without a single await or timer.
"""

from __future__ import annotations

import enum
import logging
import math
from typing import Final

from sidecar.errors import (
    BadUpstreamResponse,
    ConnectFailed,
    ProtocolMismatch,
    SidecarError,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.flow_control import PEER_WRITE_FULL, WAITING_UPSTREAM
from sidecar.grpc import is_grpc
from sidecar.http.headers import Headers
from sidecar.http.parser import RequestHead, ResponseHead
from sidecar.policy.resilience import Attempt
from sidecar.policy.retry import STALE, failed_try, is_keepalive_race
from sidecar.streams import (
    AppExchange,
    AppStream,
    Cancellable,
    EndpointStream,
    EndpointUser,
    StreamWaiter,
)
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.pool import Pool

log = logging.getLogger("sidecar.exchange")
_ACCESS: Final = logging.getLogger("sidecar.access")

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_MAX_REPLAY: Final = 64 * 1024
# gRPC statuses the breaker and outlier detection count as failures (SPEC section 5): unknown,
# deadline_exceeded, internal, unavailable.
_GRPC_FAILURES: Final = frozenset({2, 4, 13, 14})


def _grpc_request(head: RequestHead) -> bool:
    """Whether the request is gRPC (SPEC section 11: by its content-type)."""
    for name, value in head.forward:
        if len(name) == 12 and name.lower() == b"content-type":
            return is_grpc(value)
    return False


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


class Exchange(AppExchange, EndpointUser, StreamWaiter, Attempt):
    """No `__slots__`: the many per-request fields start as class attributes, and __init__
    sets only the few that depend on the request (one exchange per request, so it counts)."""

    cluster: Cluster | None = None
    pool: Pool | None = None
    stream: EndpointStream | None = None
    phase: Phase
    deadline: float = math.inf
    try_deadline: float = math.inf
    attempt: int = 0
    max_attempts: int = 1
    replayable: bool = False  # may be sent again (idempotent, or keyed, and small enough)
    request_done: bool = False  # the app sent the whole request
    # The request body held here: until a stream is attached (pending), and for replay
    # while the request is replayable and small enough. None: nothing is kept (yet).
    body: list[bytes] | None = None
    body_len: int = 0
    # The body is also kept, within max_replay, for requests that are not replayable: an
    # HTTP/2 endpoint may still say it never processed the try (REFUSED_STREAM, GOAWAY), and
    # then it goes again whatever its method (SPEC section 11). False once it outgrew that.
    keep_body: bool = True
    grpc_failed: bool = False  # a gRPC answer whose status counts as the endpoint's failure
    trailers: Headers | None = None  # the app's request trailers, kept for a later send
    sent_at: float = 0.0  # when the current try's head goes out (its deadline header)
    response: ResponseHead | None = None
    response_started: bool = False  # a byte of the response went to the app
    response_done: bool = False
    status: int = 0
    last_error: SidecarError | None = None
    backoff_handle: Cancellable | None  # set in __init__: mypyc drops a class default here
    policy_token: int | None = None  # see policy/resilience.py
    stale_retried: bool = False
    waited: bool = False  # app reading is paused (WAITING_UPSTREAM) until a stream comes
    finished_at: float = 0.0  # loop time when recorded as done (0: not recorded)

    def __init__(self, app: AppStream, head: RequestHead, now: float) -> None:
        self.app = app
        self.head = head
        self.phase = Phase.ROUTED
        self.started = now
        self.sent_at = now
        self.backoff_handle = None
        self.replayable = head.method in IDEMPOTENT or head.idempotency_key
        self.keep_alive = head.keep_alive

    def endpoint_key(self) -> str | None:
        pool = self.pool
        return pool.key if pool is not None else None

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
        """Routing chose `cluster`: admit, then find a stream."""
        self.cluster = cluster
        cluster.last_used = self.started
        head = self.head
        timeout = cluster.request_timeout
        if head.timeout_ms is not None and head.timeout_ms > 0:
            timeout = head.timeout_ms / 1000.0
        self.deadline = self.started + timeout
        if cluster.protocol == "http1" and _grpc_request(head):
            raise ProtocolMismatch(
                "a gRPC request for a cluster pinned to protocol http1: its trailers cannot "
                "survive HTTP/1.1", cluster.name)
        policies = cluster.policies
        if policies is not None:
            # Raises CircuitOpen.
            self.max_attempts, self.replayable, self.policy_token = policies.start(head)
        if head.method == b"CONNECT" or (
            head.content_length and head.content_length > self.max_replay()
        ):
            self.replayable = False
            self.keep_body = False
        self._attempt()

    def await_discovery(self, cluster: Cluster) -> None:
        """Routing chose `cluster`, whose discovery has not answered yet (a forward-proxy
        destination still resolving): start once it answers, or fail at its connect_timeout
        (`on_deadline`). Either leg calls this instead of `start`."""
        self.cluster = cluster
        self.deadline = self.started + cluster.settings.connect_timeout
        self.app.set_deadline(self.next_deadline())
        cluster.when_ready(self._discovered)

    def _discovered(self) -> None:
        """The cluster's first discovery answer came (a loop callback). Phases never go back
        to ROUTED: any other phase means the exchange ended (app gone, timed out) meanwhile."""
        cluster = self.cluster
        if self.phase is not Phase.ROUTED or cluster is None:
            return
        app = self.app
        app.batch_begin()  # HTTP/2: the stream's frames go out once this callback is over
        try:
            self.start(cluster)
        except SidecarError as exc:
            self.fail(exc)
        except Exception as exc:  # a loop callback: nobody above us would answer the app
            app.rescue(exc, "discovery_wait")
        finally:
            app.batch_end()

    def max_replay(self) -> int:
        cluster = self.cluster
        if cluster is not None and cluster.policies is not None:
            return int(cluster.policies.max_body_bytes)
        return _MAX_REPLAY

    def _authority(self) -> bytes:
        head = self.head
        host = head.host if head.host and not head.absolute else head.authority
        return host or (self.cluster.name.encode() if self.cluster else b"")

    def _deadline_ms(self) -> int:
        """What is left of the request's deadline when this try's head goes out (-1: none)."""
        if self.deadline == math.inf:
            return -1
        left = self.deadline - self.sent_at
        return int(left * 1000) if left > 0 else 0  # not max(): a generic call

    def _attempt(self, fresh: bool = False) -> None:
        """Find an endpoint and a stream for the next try. `fresh`: the same endpoint, on a
        newly opened connection (after a stale pooled one)."""
        cluster = self.cluster
        assert cluster is not None
        if not fresh:
            self.attempt += 1  # the free retry after a stale connection is not a policy try
        pool = self.pool  # the previous try's endpoint, if any: another is preferred
        if not (fresh and pool is not None and not pool.closing):
            pool = self.pool = cluster.pick(pool)
        policies = cluster.policies
        if policies is not None and policies.per_try_timeout is not None:
            self.try_deadline = policies.try_deadline(self)
        self.app.set_deadline(self.next_deadline())
        # CONNECT always opens a new connection: a tunnel must not inherit one that spoke HTTP,
        # and a synchronous hand-over would start the tunnel inside the parser's callback,
        # before the bytes after the CONNECT head had been delivered.
        method = self.head.method
        stream = pool.acquire(self, self, method, fresh or method == b"CONNECT",
                              self.head.version == "2")
        if stream is None:
            self._phase(Phase.WAITING)
            self.waited = True
            self.app.pause_request(WAITING_UPSTREAM)
            return
        self._attach(stream)

    # --- StreamWaiter: the pool calls back ----------------------------------------------------
    def on_pool_stream(self, stream: EndpointStream) -> None:
        if self.phase is Phase.DONE:  # defensive: cancelled waiters are never called
            stream.release(self.app.now(), True)
            return
        try:
            self._attach(stream)
        except Exception as exc:  # the pool's caller (a connect task) would only log it
            self.app.rescue(exc, "attach")

    def _attach(self, stream: EndpointStream) -> None:
        if self.waited:  # an earlier try of this request waited for a stream
            self.waited = False
            self.app.resume_request(WAITING_UPSTREAM)
        self._phase(Phase.ATTACHED)
        self.stream = stream
        if self.app.writing_paused():
            # The app's side is still full from an earlier (pipelined) response, and it will
            # not report the pause again before the resume: start paused rather than read
            # this response at full speed into a socket that is full.
            stream.pause_response()
        if self.head.method == b"CONNECT":
            self._tunnel(stream, b"", True)
            return
        self._send(stream)

    def on_pool_error(self, exc: SidecarError) -> None:
        if self.phase is Phase.DONE:
            return
        try:
            # No stream was ever attached to this try: nothing of the request was written.
            self._failed(exc, unsent=True)
        except Exception as failure:
            self.app.rescue(failure, "pool_error")

    # --- sending ---------------------------------------------------------------------------------
    def _send(self, stream: EndpointStream) -> None:
        if stream.writing_paused():
            self.app.pause_request(PEER_WRITE_FULL)
        stream.send_head(self.head, self._authority(), self._deadline_ms(), self.body,
                         self.request_done, self.trailers)
        if not self.replayable and not self.keep_body:
            self.body = None  # sent; it will never be needed again

    # --- AppExchange: the app's side calls ------------------------------------------------------
    def request_body(self, data: bytes) -> None:
        """A piece of the app's request body."""
        self.body_len += len(data)
        if self.keep_body and self.body_len > self.max_replay():
            self.replayable = False  # too big to replay: streamed only, never retried
            self.keep_body = False
        stream = self.stream
        if stream is not None and self.phase is Phase.ATTACHED:
            stream.send_body(data)
            if self.keep_body:
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
        # Kept whichever way the request goes out: on the stream attached now, or by `_send`
        # once one is (new connection, pool wait, retry), trailers included (SPEC 5).
        self.trailers = trailers
        stream = self.stream
        if stream is not None and self.phase is Phase.ATTACHED:
            stream.send_end(trailers)
            if self.response_done:
                self._finish()

    def app_write_paused(self) -> None:
        if self.stream is not None:
            self.stream.pause_response()

    def app_write_resumed(self) -> None:
        if self.stream is not None:
            self.stream.resume_response()

    # --- EndpointUser: the endpoint stream calls back -------------------------------------------
    def batch_begin(self) -> None:
        self.app.batch_begin()  # what one upstream read yields leaves in one write to the app

    def batch_end(self) -> None:
        self.app.batch_end()

    def on_response_head(self, head: ResponseHead) -> None:
        status = head.status
        if status < 200 and status != 101:
            self.app.send_interim(head)
            return
        policies = self.cluster.policies if self.cluster is not None else None
        if policies is not None and (
            status >= 500 or (head.grpc_status > 0 and self._grpc_replay_safe())
        ) and self.attempt < self.max_attempts:
            delay = policies.status_retry_delay(self, head)
            if delay is not None:
                # Drop this response; its connection cannot be reused mid-body.
                self._drop_stream("not_reusable")
                self._schedule_retry(delay)
                return
        self.response = head
        self.status = status
        keep_alive = self.keep_alive
        if status == 101:
            if self.head.upgrade is None:
                self._drop_stream("error")
                self.fail(BadUpstreamResponse("101 response to a request that did not upgrade"))
                return
        elif self.head.upgrade is not None or not self.request_done:
            # A refused upgrade: the app's parser already treated its request as upgraded. An
            # answer that begins before the app finished sending (413, an early 200) ends the
            # app's connection: the leg says so in the head.
            keep_alive = False
        self.response_started = True
        self.keep_alive = self.app.send_response_head(head, keep_alive)

    def on_response_body(self, data: bytes) -> None:
        self.app.send_response_body(data)

    def on_response_end(self, trailers: Headers | None) -> None:
        if self.response is None:
            return  # a dropped response (retry) or an interim one
        if trailers:
            self._grpc_outcome(trailers)
        self.app.send_response_end(trailers)
        self.response_done = True
        if self.status == 101:
            return  # on_upgrade follows
        if not self.request_done:
            # The upstream answered before the app finished sending (e.g. 413): the stream's
            # request framing is unfinished, so its connection cannot be reused, and the app
            # must not send the rest into a connection that will take another request.
            self.keep_alive = False
        self._finish()

    def _grpc_replay_safe(self) -> bool:
        """Whether a gRPC call answered Trailers-Only may go again (SPEC section 11): its body
        is still held, and it is not a streaming call that had sent a message in full. A
        complete request of at most one message is a unary (or server-streaming) call: the
        server said its status without a response message; a streaming upload that had
        delivered a whole message may have had it processed. Read only then (rarely)."""
        body = self.body
        if not self.keep_body or (body is None and self.body_len):
            return False
        data = b"".join(body) if body else b""
        messages = 0
        at = 0
        while at + 5 <= len(data):
            at += 5 + int.from_bytes(data[at + 1:at + 5], "big")
            if at <= len(data):
                messages += 1
        return messages <= 1 if self.request_done else messages == 0

    def _grpc_outcome(self, trailers: Headers) -> None:
        """A gRPC answer from the endpoint (its trailers carry `grpc-status`): counted by
        status (`sidecar_grpc_responses_total`), and the statuses SPEC section 5 names are the
        endpoint's failures for the breaker and outlier detection."""
        for name, value in trailers:
            if len(name) == 11 and name.lower() == b"grpc-status":
                code = int(value) if value.isdigit() and len(value) < 4 else 2
                cluster = self.cluster
                if cluster is not None:
                    cluster.stats.grpc_response(code)
                if code in _GRPC_FAILURES:
                    self.grpc_failed = True
                return

    def on_upgrade(self, rest: bytes) -> None:
        stream = self.stream
        if stream is None or self.status != 101:
            return
        self._tunnel(stream, rest, False)

    def on_upstream_error(self, exc: UpstreamError) -> None:
        if self.phase in (Phase.DONE, Phase.TUNNEL):
            return
        stream = self.stream
        # A reused keep-alive connection that closed before a byte of answer, right after our
        # request was written: the upstream closed it while idle and our request crossed its
        # FIN. Not the upstream's failure. Later than that, the endpoint dropped a request it
        # had: a reset (SPEC section 5).
        stale = False
        if stream is not None and isinstance(exc, UpstreamReset):
            now = self.app.now()
            stale = is_keepalive_race(stream.reused(), stream.response_started(),
                                      now - stream.taken_at())
            if stale:
                stream.race_lost(now)
        self._drop_stream("error")
        self._failed(exc, stale=stale)

    def on_internal_error(self, exc: Exception) -> None:
        # The stream let go of us and resets itself; `fail` forgets it.
        self.app.rescue(exc, "response")

    def on_upstream_pause_writing(self) -> None:
        self.app.pause_request(PEER_WRITE_FULL)

    def on_upstream_resume_writing(self) -> None:
        self.app.resume_request(PEER_WRITE_FULL)

    # --- CONNECT and upgrades: the one tunnel hand-off --------------------------------------------
    def _tunnel(self, stream: EndpointStream, to_app: bytes, established: bool) -> None:
        """Hand the endpoint's socket and the app's to a tunnel: CONNECT (`established`: the
        leg answers 200 first) or an accepted Upgrade (the 101 went out; `to_app`: what the
        endpoint sent after it)."""
        self.stream = None
        transport = stream.detach()
        if transport is None:
            self.fail(UpstreamReset("upstream connection lost before the tunnel started"))
            return
        self._phase(Phase.TUNNEL)
        if established:
            self.status = 200
            self.response_started = True
        # The request is over once the tunnel stands (the bytes after it are not requests):
        # it gives its breaker slot back now, or every tunnel would hold one for good.
        self._settle(None)
        if not self.app.start_tunnel(self, transport, to_app, established):
            self._phase(Phase.DONE)

    def log_access(self, listener: str, protocol: str, now: float) -> None:
        """The request's one `access` line (docs/operations.md), whichever leg carried it:
        `protocol` is the app's (`http/1.1`, `h2`); `now` ends its duration."""
        head = self.head
        error = self.last_error
        _ACCESS.info(
            "access",
            extra={
                "fields": {
                    "listener": listener,
                    "protocol": protocol,
                    "method": head.method.decode("latin-1"),
                    "authority": head.authority.decode("latin-1"),
                    "path": head.target.decode("latin-1")[:256],
                    "status": self.status,
                    "cluster": self.cluster.name if self.cluster else None,
                    "endpoint": self.pool.key if self.pool else None,
                    "attempts": self.attempt,
                    "duration_ms": round((now - self.started) * 1000, 3),
                    "error": error.code if error and self.status >= 400 else None,
                }
            },
        )

    def tunnel_closed(self, now: float) -> None:
        cluster = self.cluster
        if cluster is not None:
            cluster.stats.request_done(self.app.listener(), self.status, now - self.started)
        self.phase = Phase.DONE

    # --- endings ---------------------------------------------------------------------------------
    def _drop_stream(self, reason: str) -> None:
        """Reset the current try's stream: nothing more of it reaches this exchange."""
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.reset(reason)

    def _finish(self) -> None:
        """Both directions complete: return the stream, record, let the next request go."""
        now = self.app.now()  # one clock read for the pool, the stats and the app side
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.release(now, self.request_done)
        self._record(None, now)
        self._phase(Phase.DONE)
        self.app.done(self.keep_alive)

    def _record(self, error: SidecarError | None, now: float = 0.0) -> None:
        cluster = self.cluster
        if cluster is None:
            return
        if not now:
            now = self.app.now()
        self.finished_at = now
        cluster.stats.request_done(self.app.listener(), self.status, now - self.started)
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
            # SPEC section 5: gRPC unavailable, internal, unknown and deadline_exceeded count
            # as failures, as a 5xx does.
            status = 503 if self.grpc_failed else self.status
            policies.on_done(token, status, self.attempt, endpoint, error)

    def _failed(self, exc: SidecarError, stale: bool = False, unsent: bool = False) -> None:
        """A try failed. Retry when that is safe and allowed, else answer or cut. `unsent`:
        the try never had a stream, so it wrote nothing."""
        self.last_error = exc
        if not self.response_started and self._may_retry(exc, stale, unsent):
            return
        self.fail(exc)

    def _may_retry(self, exc: SidecarError, stale: bool, unsent: bool) -> bool:
        if self.phase in (Phase.TUNNEL, Phase.DONE):
            return False
        before_write = exc.before_write
        if not isinstance(exc, UpstreamError) and not before_write:
            return False  # a local refusal (pool_timeout...)
        if exc.never_processed and not unsent and not self.keep_body:
            return False  # refused, but what was sent of the body is no longer here
        # An unsent try's body is all still here: nothing was written, and the app's side is
        # not read while a try has no stream (WAITING_UPSTREAM), so what is held is a read or
        # two whatever the body's size. A try that did write is replayed only if the request
        # is replayable (then its body was kept).
        kind = failed_try(before_write=before_write, wrote=not unsent,
                          replayable=self.replayable, stale=stale,
                          never_processed=exc.never_processed)
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
        if self.deadline != math.inf:
            self.sent_at = self.app.now()  # the deadline left now goes in the head
        try:
            self._attempt(fresh=fresh)
        except SidecarError as exc:
            self.fail(exc)
        except Exception as exc:  # a loop timer: nobody above us would answer the app
            self.app.rescue(exc, "retry")

    def _schedule_retry(self, delay: float) -> None:
        if delay <= 0:
            self._retry_now()
            return
        self._phase(Phase.BACKOFF)
        self.backoff_handle = self.app.call_later(delay, self._retry_now)

    def fail(self, exc: SidecarError) -> None:
        """Answer the app with the sidecar's own error, or cut the app's side if a response
        has already begun."""
        if self.phase is Phase.DONE:
            return
        self._stop_waiting()
        if self.waited:  # also when a try waited and the request ends in a later backoff
            self.waited = False
            self.app.resume_request(WAITING_UPSTREAM)
        if self.stream is not None:
            self._drop_stream("timeout" if isinstance(exc, UpstreamTimeout) else "error")
        if not exc.cluster and self.cluster is not None:
            exc.cluster = self.cluster.name
        self.last_error = exc
        self.status = exc.status
        self._record(exc)
        if self.cluster is not None:
            self.cluster.stats.local_error(exc.code)
        self._phase(Phase.DONE)
        if self.response_started:
            self.app.abort_partial(exc)
        else:
            self.app.send_error(exc, self.request_done, self.keep_alive)

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
                self.pool.cancel(self)  # no stream yet: stop waiting for one
            self._drop_stream("timeout")
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

    def app_gone(self) -> None:
        """The app went away mid-exchange: stop, free what we hold."""
        if self.phase is Phase.DONE:
            return
        self._stop_waiting()
        if self.phase is not Phase.TUNNEL:
            self._drop_stream("error")
        policies = self.cluster.policies if self.cluster is not None else None
        if policies is not None:
            policies.on_abandon(self)
        self.phase = Phase.DONE
