"""The exchange against fake legs: an `AppStream` and `EndpointStream`s that record what the
exchange asks of them, behind a real `Cluster` and real `Pool`s. No sockets: the pools are
never asked to connect (`max_connections` 0; their idle carriers are fakes), which is also
what an HTTP/2 leg will look like to the exchange (sidecar/streams.py).

Fakes, not real parts, on purpose: these tests pin the contract between the exchange and its
legs (what it calls, in which order, with what), which the integration tests (real sockets,
real servers) exercise only through HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from sidecar.clock import FakeClock
from sidecar.config import ClusterConfig
from sidecar.discovery.endpoints import Endpoint, Reset
from sidecar.downstream.exchange import Exchange, Phase
from sidecar.errors import ConnectFailed, SidecarError, UpstreamReset
from sidecar.flow_control import PEER_WRITE_FULL, WAITING_UPSTREAM
from sidecar.http.headers import Headers
from sidecar.http.parser import RequestHead, ResponseHead
from sidecar.observe.stats import Stats
from sidecar.policy.resilience import ClusterPolicies
from sidecar.streams import (
    AppExchange,
    AppStreamBase,
    CarrierBase,
    EndpointStream,
    EndpointStreamBase,
    EndpointUser,
)
from sidecar.timers import Wheel
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.pool import Pool


# --- the fake legs ------------------------------------------------------------------------------
class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeApp(AppStreamBase):
    """The app's side: records the response as the exchange hands it over."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.events: list[tuple[Any, ...]] = []
        self.paused: set[int] = set()
        self.deadline = math.inf
        self.timers: list[tuple[float, Callable[[], None], FakeHandle]] = []
        self.full = False

    def now(self) -> float:
        return self.clock.now()

    def listener(self) -> str:
        return "egress"

    def writing_paused(self) -> bool:
        return self.full

    def send_interim(self, head: ResponseHead) -> None:
        self.events.append(("interim", head.status))

    def send_response_head(self, head: ResponseHead, keep_alive: bool) -> bool:
        self.events.append(("head", head.status, keep_alive))
        return keep_alive

    def send_response_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def send_response_end(self, trailers: Headers | None) -> None:
        self.events.append(("end", trailers))

    def batch_begin(self) -> None:
        pass

    def batch_end(self) -> None:
        pass

    def done(self, keep_alive: bool) -> None:
        self.events.append(("done", keep_alive))

    def send_error(self, exc: SidecarError, request_done: bool, keep_alive: bool) -> None:
        self.events.append(("error", exc.code, exc.status))

    def abort_partial(self, exc: SidecarError) -> None:
        self.events.append(("abort", exc.code))

    def rescue(self, exc: Exception, site: str) -> None:
        raise AssertionError(f"rescue at {site}") from exc

    def pause_request(self, reason: int) -> None:
        self.paused.add(reason)

    def resume_request(self, reason: int) -> None:
        self.paused.discard(reason)

    def set_deadline(self, when: float) -> None:
        self.deadline = when

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle()
        self.timers.append((delay, callback, handle))
        return handle

    def start_tunnel(self, exchange: AppExchange, endpoint: asyncio.Transport, to_app: bytes,
                     established: bool) -> bool:
        self.events.append(("tunnel", established))
        return True

    def fire_timers(self) -> None:
        timers, self.timers = self.timers, []
        for _, callback, handle in timers:
            if not handle.cancelled:
                callback()


class FakeStream(EndpointStreamBase):
    """One stream on a `FakeCarrier`: records what the exchange sends."""

    def __init__(self, carrier: FakeCarrier, user: EndpointUser, method: bytes, now: float):
        self.carrier = carrier
        self.user = user
        self.method = method
        self.taken = now
        self.sent: list[tuple[Any, ...]] = []
        self.reading_paused = False
        self.full = False
        self.begun = False
        self.ended: str | None = None

    def endpoint(self) -> str:
        return self.carrier.pool.key

    def reused(self) -> bool:
        return self.carrier.streams > 1

    def response_started(self) -> bool:
        return self.begun

    def taken_at(self) -> float:
        return self.taken

    def race_lost(self, now: float) -> None:
        self.carrier.pool.race_lost(self.carrier, 0.0, now)

    def writing_paused(self) -> bool:
        return self.full

    def send_head(self, head: RequestHead, authority: bytes, deadline_ms: int,
                  body: list[bytes] | None, end: bool, trailers: Headers | None) -> None:
        self.sent.append(("head", head.method, authority, deadline_ms, list(body or ()), end,
                          trailers))

    def send_body(self, data: bytes) -> None:
        self.sent.append(("body", data))

    def send_end(self, trailers: Headers | None) -> None:
        self.sent.append(("end", trailers))

    def pause_response(self) -> None:
        self.reading_paused = True

    def resume_response(self) -> None:
        self.reading_paused = False

    def release(self, now: float, reusable: bool) -> None:
        self.ended = "released"
        self.carrier.status = "idle" if reusable else "closed"
        self.carrier.pool.stream_released(self.carrier, now, reusable)

    def reset(self, reason: str) -> None:
        self.ended = f"reset:{reason}"
        self.carrier.pool.stream_reset(self.carrier, reason)
        self.carrier.status = "closed"

    def detach(self) -> asyncio.Transport | None:
        self.ended = "detached"
        self.carrier.pool.stream_reset(self.carrier, "tunnel")
        self.carrier.status = "closed"
        return asyncio.Transport()

    # --- the endpoint answers ----------------------------------------------------------------
    def respond(self, status: int, body: bytes = b"", trailers: Headers | None = None,
                end: bool = True) -> None:
        head = ResponseHead()
        head.status = status
        head.headers = head.forward = []
        head.content_length = None if trailers is not None else len(body)
        head.chunked = trailers is not None
        self.begun = True
        self.user.on_response_head(head)
        if body:
            self.user.on_response_body(body)
        if end:
            self.user.on_response_end(trailers)


class FakeCarrier(CarrierBase):
    """A pooled connection that carries one `FakeStream` at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        # Not `state`: Carrier declares that field (a CarrierState) for its default methods,
        # and compiled, a string there would be refused.
        self.status = "idle"
        self.streams = 0
        self.opened: list[FakeStream] = []

    def capacity(self) -> int:
        return 1 if self.status == "idle" else 0

    def open_stream(self, user: EndpointUser, method: bytes, now: float) -> EndpointStream:
        self.status = "active"
        self.streams += 1
        stream = FakeStream(self, user, method, now)
        self.opened.append(stream)
        return stream

    def usable(self, now: float, idle_timeout: float) -> bool:
        return self.status == "idle"

    def expiry(self, idle_timeout: float) -> float:
        return math.inf

    def is_closed(self) -> bool:
        return self.status == "closed"

    def is_idle(self) -> bool:
        return self.status == "idle"

    def is_reusable(self) -> bool:
        return self.status != "closed"

    def past_lifetime(self, now: float) -> bool:
        return False

    def opened_at(self) -> float:
        return 0.0

    def idle_since(self) -> float:
        return 0.0

    def idle_for(self, now: float) -> float:
        return now

    def streams_opened(self) -> int:
        return self.streams

    def closed_by_peer(self) -> bool:
        return False

    def peer_gone(self) -> bool:
        return False

    def connected(self, now: float) -> None:
        self.status = "idle"

    def parked(self, now: float) -> None:
        pass

    def tls_session_due(self) -> asyncio.Transport | None:
        return None

    def retire(self, reason: str) -> None:
        self.status = "closed"

    def close(self, reason: str) -> None:
        self.status = "closed"

    def close_within(self, reason: str, linger: float) -> None:
        self.status = "closed"

    def abort(self, reason: str) -> None:
        self.status = "closed"


# --- the world around them -----------------------------------------------------------------------
class World:
    def __init__(self, loop: asyncio.AbstractEventLoop, retries: bool = True) -> None:
        cfg = ClusterConfig.model_validate({
            "name": "up",
            "discovery": {"type": "static", "endpoints": ["127.0.0.1:1", "127.0.0.1:2"]},
            "retry": {"attempts": 3 if retries else 1},
        })
        self.clock = FakeClock()
        self.cluster = Cluster(cfg, loop, Wheel(loop), Stats().cluster("up"))
        # Never connect: carriers are put in by hand (no config allows 0).
        self.cluster.settings = replace(self.cluster.settings, max_connections=0)
        self.cluster.policies = ClusterPolicies("up", cfg, self.cluster.stats, self.clock,
                                                self.cluster.refresh)
        self.cluster.apply(Reset((Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2))))
        self.pools = list(self.cluster.pools.values())
        self.app = FakeApp(self.clock)

    def park(self, pool: Pool) -> FakeCarrier:
        carrier = FakeCarrier(pool)
        pool._park(carrier)  # noqa: SLF001 (the pool would have connected it)
        return carrier

    def park_everywhere(self) -> dict[str, FakeCarrier]:
        return {pool.key: self.park(pool) for pool in self.pools}

    def exchange(self, method: bytes = b"GET", body: bool = False,
                 chunked: bool = False) -> Exchange:
        head = RequestHead()
        head.method = method
        head.target = b"/x"
        head.host = head.authority = b"up"
        head.headers = head.forward = []
        if body:
            head.chunked = chunked
            head.content_length = None if chunked else 6
        return Exchange(self.app, head, self.clock.now())

    def stream_of(self, ex: Exchange) -> FakeStream:
        stream = ex.stream
        assert isinstance(stream, FakeStream)
        return stream

    def inflight(self) -> int:
        return sum(pool.inflight for pool in self.pools)


@pytest.fixture
def world() -> Iterator[World]:
    loop = asyncio.new_event_loop()  # the pools' wheel needs one; it never runs here
    try:
        yield World(loop)
    finally:
        loop.close()


# --- the tests -----------------------------------------------------------------------------------
def test_a_request_and_its_response_pass_through_both_legs(world: World) -> None:
    carriers = world.park_everywhere()
    ex = world.exchange()
    ex.start(world.cluster)
    stream = world.stream_of(ex)
    assert world.inflight() == 1
    ex.request_end(None)
    method, authority, deadline_ms = stream.sent[0][1:4]
    assert (method, authority) == (b"GET", b"up")
    assert deadline_ms == 15000  # timeouts.request, all of it left
    assert stream.sent[1] == ("end", None)
    stream.respond(200, b"hello")
    assert world.app.events == [("head", 200, True), ("body", b"hello"), ("end", None),
                                ("done", True)]
    assert stream.ended == "released" and ex.phase is Phase.DONE
    assert world.inflight() == 0
    assert sorted(c.status for c in carriers.values()) == ["idle", "idle"]
    assert world.app.deadline == ex.started + 2.0  # the per-try timeout, set by the exchange


def test_a_try_that_sent_nothing_is_retried_on_another_endpoint(world: World) -> None:
    ex = world.exchange(b"POST", body=True)  # not replayable: only an unsent try may go again
    ex.start(world.cluster)
    # No idle carrier anywhere: the request waits, its body is not read meanwhile.
    assert ex.phase is Phase.WAITING and WAITING_UPSTREAM in world.app.paused
    first = ex.pool
    assert first is not None and first.pending_count == 1 and world.inflight() == 1
    ex.request_body(b"abc")
    ex.request_body(b"def")  # held: the app's reading is paused, at most a read or two
    ex.request_end(None)
    other = next(pool for pool in world.pools if pool is not first)
    carrier = world.park(other)
    first._connect_failed(ConnectFailed("refused", "up"))  # noqa: SLF001 (the connect task's)
    assert ex.phase is Phase.BACKOFF and world.inflight() == 0
    world.app.fire_timers()  # the backoff ends
    assert ex.pool is other and ex.phase is Phase.ATTACHED
    stream = carrier.opened[0]
    # Everything held goes with the head, in one call, the request's end with it.
    assert stream.sent == [("head", b"POST", b"up", 15000, [b"abc", b"def"], True, None)]
    assert WAITING_UPSTREAM not in world.app.paused
    stream.respond(201)
    assert world.app.events[0] == ("head", 201, True)
    assert world.app.events[-1] == ("done", True)
    assert sum(world.cluster.stats.retries.values()) == 1
    assert world.inflight() == 0


def test_an_error_before_the_response_is_answered_by_the_sidecar(world: World) -> None:
    world.park_everywhere()
    ex = world.exchange(b"POST", body=True)  # written, not replayable: no retry
    ex.start(world.cluster)
    stream = world.stream_of(ex)
    ex.request_body(b"abcdef")
    ex.request_end(None)
    stream.user.on_upstream_error(UpstreamReset("connection reset"))
    assert world.app.events == [("error", "upstream_reset", 502)]
    assert stream.ended == "reset:error" and ex.phase is Phase.DONE
    assert world.inflight() == 0


def test_an_error_after_the_response_began_cuts_the_app_side(world: World) -> None:
    world.park_everywhere()
    ex = world.exchange()
    ex.start(world.cluster)
    stream = world.stream_of(ex)
    ex.request_end(None)
    stream.respond(200, b"part", end=False)
    stream.user.on_upstream_error(UpstreamReset("connection reset"))
    assert world.app.events == [("head", 200, True), ("body", b"part"),
                                ("abort", "upstream_reset")]
    assert stream.ended == "reset:error" and world.inflight() == 0


def test_backpressure_goes_both_ways(world: World) -> None:
    world.park_everywhere()
    ex = world.exchange(b"POST", body=True)
    ex.start(world.cluster)
    stream = world.stream_of(ex)
    # The endpoint cannot take more of the request: the app's request stops being read.
    stream.user.on_upstream_pause_writing()
    assert PEER_WRITE_FULL in world.app.paused
    stream.user.on_upstream_resume_writing()
    assert PEER_WRITE_FULL not in world.app.paused
    # The app cannot take more of the response: the endpoint's response stops being read.
    ex.app_write_paused()
    assert stream.reading_paused
    ex.app_write_resumed()
    assert not stream.reading_paused


def test_a_stream_attached_while_the_app_is_full_starts_paused(world: World) -> None:
    world.park_everywhere()
    world.app.full = True
    ex = world.exchange()
    ex.start(world.cluster)
    assert world.stream_of(ex).reading_paused


def test_trailers_pass_both_ways(world: World) -> None:
    world.park_everywhere()
    ex = world.exchange(b"POST", body=True, chunked=True)
    ex.start(world.cluster)
    stream = world.stream_of(ex)
    ex.request_body(b"abc")
    ex.request_end([(b"x-checksum", b"1")])
    assert stream.sent[1:] == [("body", b"abc"), ("end", [(b"x-checksum", b"1")])]
    stream.respond(200, b"ok", trailers=[(b"grpc-status", b"0")])
    assert world.app.events[-2:] == [("end", [(b"grpc-status", b"0")]), ("done", True)]


def test_an_early_answer_ends_the_app_connection_and_the_stream_is_not_reused(
    world: World,
) -> None:
    world.park_everywhere()
    ex = world.exchange(b"POST", body=True)
    ex.start(world.cluster)
    stream = world.stream_of(ex)
    stream.respond(413)  # before the request's end
    assert world.app.events == [("head", 413, False), ("end", None), ("done", False)]
    assert stream.ended == "released" and stream.carrier.status == "closed"


def test_a_5xx_is_retried_on_another_stream_before_anything_reaches_the_app(
    world: World,
) -> None:
    carriers = world.park_everywhere()
    ex = world.exchange()
    ex.start(world.cluster)
    first = world.stream_of(ex)
    ex.request_end(None)
    first.respond(503)
    assert first.ended == "reset:not_reusable" and world.app.events == []
    world.app.fire_timers()
    second = world.stream_of(ex)
    assert second is not first and second.carrier is not first.carrier
    # The retry's head carries what is left of the deadline; the request was complete.
    assert second.sent[0][5] is True
    second.respond(200)
    assert world.app.events[0] == ("head", 200, True)
    assert len(carriers) == 2 and world.inflight() == 0


def test_the_app_going_away_resets_the_stream(world: World) -> None:
    world.park_everywhere()
    ex = world.exchange()
    ex.start(world.cluster)
    stream = world.stream_of(ex)
    ex.app_gone()
    assert stream.ended == "reset:error" and ex.phase is Phase.DONE
    assert world.app.events == [] and world.inflight() == 0


def test_connect_hands_the_stream_over_to_a_tunnel(world: World) -> None:
    ex = world.exchange(b"CONNECT")
    ex.start(world.cluster)  # CONNECT always wants a fresh connection: it waits
    pool = ex.pool
    assert pool is not None and ex.phase is Phase.WAITING
    carrier = FakeCarrier(pool)
    pool._active.add(carrier)  # noqa: SLF001 (as a finished connect does)
    assert pool._hand_over(carrier)  # noqa: SLF001
    assert world.app.events == [("tunnel", True)]
    assert carrier.opened[0].ended == "detached" and ex.phase is Phase.TUNNEL
    assert world.inflight() == 0
    ex.tunnel_closed(world.clock.now() + 1.0)
    assert ex.phase is Phase.DONE
