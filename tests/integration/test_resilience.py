"""Issue 3 end to end: health checks, outlier ejection, breaker, retries, budget, deadlines and
load balancing, proven through a real sidecar process against real aiohttp upstreams.

One sidecar serves every scenario: each scenario is its own cluster (static endpoints: its own
upstreams, on distinct 127.0.0.1 ports) behind its own listener, so scenarios share no breaker,
budget or pool state and the sidecar starts once. The upstreams all run on one event loop in a
thread; the test switches each one at runtime to ok, fail (503, optionally with Retry-After),
hang, reset, or a failing health check, and counts the requests it really received.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.harness import LOOPS, Sidecar, free_port

HANG_MAX = 8.0  # a hanging upstream answers anyway after this long: nothing waits unbounded
WAIT = 5.0  # the longest any condition is polled for


@dataclass
class Seen:
    at: float
    method: str
    headers: dict[str, str]
    body: bytes
    peer_port: int


class Upstream:
    """One endpoint. Mode: ok | fail (503) | hang | reset; `fail_next` / `reset_next` make the
    next n requests fail first; `health_ok` drives /healthz; `delay` slows every answer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.mode = "ok"
        self.fail_next = 0
        self.reset_next = 0
        self.retry_after: str | None = None
        self.delay = 0.0
        self.fail_delay = 0.0
        self.slow_body = 0.0  # > 0: the head and a first chunk at once, the rest this much later
        self.health_ok = True
        self.requests: list[Seen] = []
        self.inflight = 0
        self.health_hits = 0

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def count(self) -> int:
        return len(self.requests)

    def reset_counts(self) -> None:
        self.requests = []

    async def health(self, request: web.Request) -> web.Response:
        self.health_hits += 1
        return web.Response(status=200 if self.health_ok else 503, text="health")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.requests.append(
            Seen(time.monotonic(), request.method, dict(request.headers), body,
                 peer[1] if peer else 0)
        )
        self.inflight += 1
        try:
            return await self._answer(request)
        finally:
            self.inflight -= 1

    def _fail(self) -> web.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
        return web.Response(status=503, text=f"{self.name} failing", headers=headers)

    async def _reset(self, request: web.Request) -> web.Response:
        if request.transport is not None:
            request.transport.abort()
        await asyncio.sleep(HANG_MAX)  # cancelled: the connection is gone
        return web.Response(text="unreachable")

    async def _answer(self, request: web.Request) -> web.Response:
        if self.fail_next > 0:
            self.fail_next -= 1
            if self.fail_delay:
                await asyncio.sleep(self.fail_delay)
            return self._fail()
        if self.reset_next > 0:
            self.reset_next -= 1
            return await self._reset(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "hang":
            loop = asyncio.get_running_loop()
            until = loop.time() + HANG_MAX
            while self.mode == "hang" and loop.time() < until:  # noqa: ASYNC110 (switched
                await asyncio.sleep(0.01)  # from the test's thread: a plain attribute)
        if self.mode == "fail":
            return self._fail()
        if self.mode == "reset":
            return await self._reset(request)
        if self.mode == "reset_mid_body":
            resp = web.StreamResponse(headers={"Content-Length": "1000"})
            await resp.prepare(request)
            await resp.write(b"x" * 100)
            await asyncio.sleep(0.05)
            return await self._reset(request)
        if self.slow_body:
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(b"first,")
            await asyncio.sleep(self.slow_body)
            await resp.write(b"last")
            await resp.write_eof()
            return resp
        return web.Response(text=self.name)


class UpstreamServers:
    """Every upstream on one event loop in one thread."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self._loop = asyncio.new_event_loop()
        self._runners: list[web.AppRunner] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ups = upstreams
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("upstreams did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            for up in self._ups:
                app = web.Application()
                app.router.add_get("/healthz", up.health)
                app.router.add_route("*", "/{tail:.*}", up.handle)
                # handler_cancellation: a handler whose client went away is cancelled, so
                # `inflight` shows connections the sidecar closed.
                runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2,
                                       handler_cancellation=True)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", up.port).start()
                self._runners.append(runner)

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        for up in self._ups:
            up.mode = "ok"  # release hanging handlers

        async def cleanup() -> None:
            for runner in self._runners:
                await runner.cleanup()

        fut = asyncio.run_coroutine_threadsafe(cleanup(), self._loop)
        try:
            fut.result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


# --- the scenarios: name -> (number of upstreams, cluster settings) --------------------------
NO_HEALTH = {"type": "none"}
SCENARIOS: dict[str, tuple[int, dict[str, Any]]] = {
    "retry": (1, {}),
    "post": (1, {}),
    "retry_after": (1, {}),
    "reset": (1, {}),
    "attempts_header": (1, {}),
    "breaker": (1, {
        "circuit_breaker": {"failure_rate_threshold": 0.5, "minimum_requests": 5,
                            "window": "2s", "open_duration": "1s",
                            "half_open_max_requests": 2},
        "retry": {"attempts": 1},
    }),
    "concurrency": (1, {"circuit_breaker": {"max_concurrent_requests": 2}}),
    "health": (3, {
        "load_balancer": "round_robin",
        "health_check": {"type": "http", "path": "/healthz", "interval": "200ms",
                         "timeout": "150ms", "healthy_threshold": 2, "unhealthy_threshold": 2},
    }),
    "outlier": (3, {
        "load_balancer": "round_robin",
        "outlier_detection": {"consecutive_failures": 3, "base_ejection_time": "1s",
                              "max_ejection_percent": 50},
    }),
    "outlier_health": (3, {
        "load_balancer": "round_robin",
        "health_check": {"type": "http", "path": "/healthz", "interval": "200ms",
                         "timeout": "150ms", "healthy_threshold": 1, "unhealthy_threshold": 1},
        "outlier_detection": {"consecutive_failures": 2, "base_ejection_time": "1s",
                              "max_ejection_percent": 100},
        "retry": {"attempts": 1},
    }),
    "budget": (1, {
        "circuit_breaker": {"minimum_requests": 100000},
        "retry": {"attempts": 3, "backoff": {"base": "1ms", "max": "5ms"},
                  "budget": {"ratio": 0.2, "min_per_second": 1}},
    }),
    "deadline": (1, {}),
    "per_try": (2, {"load_balancer": "round_robin", "retry": {"per_try_timeout": "300ms"}}),
    "connect": (1, {"load_balancer": "round_robin", "dead_endpoints": 1}),
    "tcp_health": (1, {
        "load_balancer": "round_robin",
        "dead_endpoints": 1,
        "health_check": {"type": "tcp", "interval": "200ms", "timeout": "150ms",
                         "healthy_threshold": 1, "unhealthy_threshold": 1},
    }),
    "per_try_wait": (1, {"pool": {"min_idle": 0, "max_connections": 1, "pending_timeout": "5s"},
                         "retry": {"per_try_timeout": "300ms"}}),
    "lb_round_robin": (3, {"load_balancer": "round_robin"}),
    "lb_least_request": (3, {"load_balancer": "least_request"}),
    "lb_random": (3, {"load_balancer": "random"}),
}


class World:
    def __init__(self, sidecar: Sidecar, upstreams: dict[str, list[Upstream]],
                 dead: dict[str, list[str]]) -> None:
        self.sidecar = sidecar
        self.upstreams = upstreams
        self.dead = dead  # endpoints nothing listens on

    def url(self, scenario: str, path: str = "/") -> str:
        return self.sidecar.url(scenario, path)

    def metric(self, name: str, scenario: str, **labels: str) -> float:
        return self.sidecar.metric(name, cluster=scenario, **labels)

    def cluster(self, scenario: str) -> dict[str, Any]:
        return self.sidecar.clusters()[scenario]

    def endpoint(self, scenario: str, up: Upstream) -> dict[str, Any]:
        for ep in self.cluster(scenario)["endpoints"]:
            if ep["address"] == up.key:
                return dict(ep)
        raise AssertionError(f"{up.key} not in /clusters of {scenario}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every scenario on both event loops; the slow ones (timing-bound, loop-independent
    policy logic) on uvloop only, to keep the file quick."""
    if "world" in metafunc.fixturenames:
        slow = metafunc.definition.get_closest_marker("slow") is not None
        metafunc.parametrize("world", ["uvloop"] if slow else list(LOOPS), indirect=True,
                             scope="module")


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    ups = {name: [Upstream(f"{name}-{i}") for i in range(n)]
           for name, (n, _) in SCENARIOS.items()}
    dead: dict[str, list[str]] = {}
    servers = UpstreamServers([u for group in ups.values() for u in group])
    clusters = []
    for name, (_, scenario) in SCENARIOS.items():
        settings = dict(scenario)
        dead[name] = [f"127.0.0.1:{free_port()}" for _ in range(settings.pop("dead_endpoints", 0))]
        c: dict[str, Any] = {
            "name": name,
            "discovery": {"type": "static",
                          "endpoints": dead[name] + [u.key for u in ups[name]]},
            "pool": {"min_idle": 0},
            "health_check": NO_HEALTH,
        }
        c.update(settings)
        clusters.append(c)
    config = {
        "listeners": [{"name": name, "protocol": "http", "cluster": name} for name in SCENARIOS],
        "clusters": clusters,
        "drain": {"grace": "2s", "accept_period": "0s"},
    }
    try:
        sidecar = Sidecar(config, loop=request.param)
    except BaseException:
        servers.stop()
        raise
    try:
        yield World(sidecar, ups, dead)
    finally:
        sidecar.stop()
        servers.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10.0) as c:
        yield c


def wait_until(cond: Callable[[], bool], within: float = WAIT, what: str = "") -> float:
    """Poll `cond` (sidecar state seen from outside) for a bounded time; returns seconds."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if cond():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not within {within}s: {what}")


def sidecar_error(resp: httpx.Response) -> str | None:
    return resp.headers.get("x-sidecar-error")


def timed_get(client: httpx.Client, url: str, **kw: Any) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    resp = client.get(url, **kw)
    return resp, time.perf_counter() - t0


# --- retries ----------------------------------------------------------------------------------
def test_get_retried_after_one_503(world: World, client: httpx.Client) -> None:
    (up,) = world.upstreams["retry"]
    up.fail_next = 1
    before = world.metric("sidecar_retries_total", "retry")
    resp = client.get(world.url("retry", "/item"))
    assert resp.status_code == 200 and resp.text == up.name
    assert up.count == 2
    assert world.metric("sidecar_retries_total", "retry") - before == 1
    assert world.metric("sidecar_retries_total", "retry", reason="503") >= 1
    assert world.metric("sidecar_requests_total", "retry", code_class="2xx") >= 1


def test_post_retried_only_with_idempotency_key(world: World, client: httpx.Client) -> None:
    (up,) = world.upstreams["post"]
    body = b"order=42;" * 500
    up.fail_next = 1
    resp = client.post(world.url("post", "/orders"), content=body)
    assert resp.status_code == 503 and sidecar_error(resp) is None  # the upstream's own 503
    assert up.count == 1
    assert world.metric("sidecar_retries_total", "post") == 0

    up.reset_counts()
    up.fail_next = 1
    resp = client.post(world.url("post", "/orders"), content=body,
                       headers={"Idempotency-Key": "k-1"})
    assert resp.status_code == 200
    assert [s.body for s in up.requests] == [body, body]
    assert all(s.method == "POST" and s.headers["Idempotency-Key"] == "k-1"
               for s in up.requests)
    assert world.metric("sidecar_retries_total", "post") == 1

    # A chunked body (length unknown up front) is replayed too.
    up.reset_counts()
    up.fail_next = 1
    resp = client.post(world.url("post", "/orders"), content=iter([b"part1-", b"part2"]),
                       headers={"Idempotency-Key": "k-2"})
    assert resp.status_code == 200
    assert [s.body for s in up.requests] == [b"part1-part2", b"part1-part2"]

    # Larger than max_body_bytes (64 KiB): streamed, never replayed, so never retried.
    big = b"y" * (100 * 1024)
    for content in (big, iter([big[:40000], big[40000:]])):
        up.reset_counts()
        up.fail_next = 1
        resp = client.post(world.url("post", "/orders"), content=content,
                           headers={"Idempotency-Key": "k-3"})
        assert resp.status_code == 503 and sidecar_error(resp) is None
        assert [s.body for s in up.requests] == [big]
    up.fail_next = 0


def test_retry_after_is_honoured_and_bounded(world: World, client: httpx.Client) -> None:
    (up,) = world.upstreams["retry_after"]
    up.retry_after = "1"
    up.fail_next = 1
    resp, took = timed_get(client, world.url("retry_after"))
    assert resp.status_code == 200
    assert up.count == 2
    gap = up.requests[1].at - up.requests[0].at
    assert 0.95 <= gap < 1.6, gap
    assert took < 2.0

    # Waiting 30 s would overrun the request's 2 s deadline: no retry, the 503 goes back at once.
    up.reset_counts()
    up.retry_after = "30"
    up.fail_next = 1
    resp, took = timed_get(client, world.url("retry_after"),
                           headers={"x-sidecar-timeout-ms": "2000"})
    assert resp.status_code == 503 and resp.headers["retry-after"] == "30"
    assert up.count == 1
    assert took < 0.5


def test_reset_is_retried_for_get_not_for_post(world: World, client: httpx.Client) -> None:
    (up,) = world.upstreams["reset"]
    up.reset_next = 1
    resp = client.get(world.url("reset"))
    assert resp.status_code == 200
    assert up.count == 2
    assert world.metric("sidecar_retries_total", "reset", reason="reset") == 1

    up.reset_counts()
    up.reset_next = 1
    resp = client.post(world.url("reset"), content=b"x")
    assert resp.status_code == 502 and sidecar_error(resp) == "upstream_reset"
    assert up.count == 1

    # Never after a response byte reached the app: a reset mid-body cuts the app's response.
    up.reset_counts()
    up.mode = "reset_mid_body"
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(world.url("reset"))
    finally:
        up.mode = "ok"
    assert up.count == 1
    assert client.get(world.url("reset")).status_code == 200


def test_connect_failure_is_retried_on_another_endpoint(
    world: World, client: httpx.Client
) -> None:
    (live,) = world.upstreams["connect"]
    for _ in range(4):
        assert client.get(world.url("connect")).status_code == 200
    assert live.count == 4
    assert world.metric("sidecar_retries_total", "connect", reason="connect-failure") >= 1


def test_tcp_health_check_takes_a_dead_endpoint_out(world: World, client: httpx.Client) -> None:
    (live,) = world.upstreams["tcp_health"]
    (dead,) = world.dead["tcp_health"]

    def dead_unhealthy() -> bool:
        eps = {ep["address"]: ep for ep in world.cluster("tcp_health")["endpoints"]}
        return not eps[dead]["healthy"] and eps[live.key]["healthy"]

    wait_until(dead_unhealthy, what="the dead endpoint unhealthy")
    retries = world.metric("sidecar_retries_total", "tcp_health")
    for _ in range(6):
        assert client.get(world.url("tcp_health")).status_code == 200
    assert live.count == 6
    assert world.metric("sidecar_retries_total", "tcp_health") == retries  # never tried there


def test_retry_attempts_header_disables_retries(world: World, client: httpx.Client) -> None:
    (up,) = world.upstreams["attempts_header"]
    up.fail_next = 1
    resp = client.get(world.url("attempts_header"), headers={"x-sidecar-retry-attempts": "1"})
    assert resp.status_code == 503 and sidecar_error(resp) is None
    assert up.count == 1
    up.fail_next = 2
    resp = client.get(world.url("attempts_header"), headers={"x-sidecar-retry-attempts": "3"})
    assert resp.status_code == 200
    assert up.count == 4


# --- the circuit breaker ---------------------------------------------------------------------
@pytest.mark.slow
def test_breaker_opens_answers_fast_and_closes_after_healing(
    world: World, client: httpx.Client
) -> None:
    (up,) = world.upstreams["breaker"]
    url = world.url("breaker")
    up.mode = "fail"
    for _ in range(5):  # minimum_requests, all failing
        resp = client.get(url)
        assert resp.status_code == 503 and sidecar_error(resp) is None
    opened = time.monotonic()
    assert up.count == 5
    assert world.cluster("breaker")["breaker"] == "open"
    assert world.metric("sidecar_circuit_breaker_state", "breaker") == 1
    assert world.metric("sidecar_circuit_breaker_transitions_total", "breaker", to="open") == 1

    latencies = []
    for _ in range(30):
        resp, took = timed_get(client, url)
        assert resp.status_code == 503 and sidecar_error(resp) == "circuit_open"
        assert resp.json()["error"] == "circuit_open" and resp.json()["cluster"] == "breaker"
        latencies.append(took)
    assert time.monotonic() - opened < 1.0, "the breaker must still be open for this check"
    assert up.count == 5, "an open breaker must not touch the upstream"
    assert max(latencies) < 0.05, latencies
    print(f"\nopen-breaker answers: median {statistics.median(latencies) * 1000:.2f} ms, "
          f"max {max(latencies) * 1000:.2f} ms over {len(latencies)}")
    assert world.metric("sidecar_local_errors_total", "breaker", code="circuit_open") == 30

    # After open_duration a probe goes through; it fails: open again.
    time.sleep(max(0.0, opened + 1.05 - time.monotonic()))
    resp = client.get(url)
    assert resp.status_code == 503 and sidecar_error(resp) is None  # the probe reached it
    assert up.count == 6
    reopened = time.monotonic()
    assert world.cluster("breaker")["breaker"] == "open"
    resp = client.get(url)
    assert sidecar_error(resp) == "circuit_open" and up.count == 6

    # Healed: after open_duration, half_open_max_requests (2) good probes close it.
    up.mode = "ok"
    time.sleep(max(0.0, reopened + 1.05 - time.monotonic()))
    assert client.get(url).status_code == 200
    assert world.cluster("breaker")["breaker"] == "half_open"
    assert world.metric("sidecar_circuit_breaker_state", "breaker") == 2
    assert client.get(url).status_code == 200
    assert world.cluster("breaker")["breaker"] == "closed"
    assert world.metric("sidecar_circuit_breaker_state", "breaker") == 0
    for _ in range(5):
        assert client.get(url).status_code == 200
    assert up.count == 13
    transitions = {to: world.metric("sidecar_circuit_breaker_transitions_total", "breaker",
                                    to=to) for to in ("open", "half_open", "closed")}
    assert transitions == {"open": 2, "half_open": 2, "closed": 1}


def test_max_concurrent_requests_answers_circuit_open(world: World) -> None:
    (up,) = world.upstreams["concurrency"]
    url = world.url("concurrency")
    up.mode = "hang"
    no_retry = {"x-sidecar-retry-attempts": "1"}

    def one() -> int:
        with httpx.Client(trust_env=False, timeout=10.0) as c:
            return c.get(url, headers=no_retry).status_code

    with ThreadPoolExecutor(2) as pool, httpx.Client(trust_env=False, timeout=10.0) as client:
        futures = [pool.submit(one) for _ in range(2)]
        try:
            wait_until(lambda: up.inflight == 2, what="two requests hanging upstream")
            resp, took = timed_get(client, url, headers=no_retry)
            assert resp.status_code == 503 and sidecar_error(resp) == "circuit_open"
            assert "max_concurrent_requests" in resp.json()["detail"]
            assert took < 0.05
            assert up.count == 2
        finally:
            up.mode = "ok"
        assert [f.result(10) for f in futures] == [200, 200]
        assert client.get(url).status_code == 200  # the slots were given back
    assert world.cluster("concurrency")["breaker"] == "closed"


# --- health checks, outlier detection ---------------------------------------------------------
def _spread(client: httpx.Client, url: str, ups: list[Upstream], n: int) -> list[int]:
    for up in ups:
        up.reset_counts()
    for _ in range(n):
        assert client.get(url).status_code == 200
    return [up.count for up in ups]


@pytest.mark.slow
def test_health_checks_take_endpoints_out_and_back(world: World, client: httpx.Client) -> None:
    ups = world.upstreams["health"]
    url = world.url("health")
    sick = ups[1]
    wait_until(lambda: all(u.health_hits >= 2 for u in ups), what="health checks running")

    sick.health_ok = False
    took = wait_until(lambda: not world.endpoint("health", sick)["healthy"], what="unhealthy")
    assert took < 1.5  # 2 checks at 200 ms
    assert world.metric("sidecar_endpoint_healthy", "health", endpoint=sick.key) == 0
    counts = _spread(client, url, ups, 30)
    assert counts[1] == 0 and counts[0] + counts[2] == 30 and min(counts[0], counts[2]) >= 10

    sick.health_ok = True
    wait_until(lambda: world.endpoint("health", sick)["healthy"], what="healthy again")
    assert world.metric("sidecar_endpoint_healthy", "health", endpoint=sick.key) == 1
    counts = _spread(client, url, ups, 30)
    assert min(counts) >= 5, counts

    # Every endpoint unhealthy: 503 no_healthy_endpoints, nothing reaches an upstream.
    for up in ups:
        up.health_ok = False
    wait_until(lambda: not any(ep["healthy"] for ep in world.cluster("health")["endpoints"]),
               what="all unhealthy")
    for up in ups:
        up.reset_counts()
    resp = client.get(url)
    assert resp.status_code == 503 and sidecar_error(resp) == "no_healthy_endpoints"
    assert sum(up.count for up in ups) == 0
    assert world.metric("sidecar_local_errors_total", "health", code="no_healthy_endpoints") >= 1

    for up in ups:
        up.health_ok = True
    wait_until(lambda: client.get(url).status_code == 200, what="serving again")
    assert world.metric("sidecar_health_checks_total", "health", result="failure") > 0
    assert world.metric("sidecar_health_checks_total", "health", result="success") > 0


@pytest.mark.slow
def test_outlier_detection_ejects_and_readmits(world: World, client: httpx.Client) -> None:
    ups = world.upstreams["outlier"]
    url = world.url("outlier")
    bad = ups[1]
    bad.mode = "fail"
    for _ in range(9):
        # Each 503 of the bad endpoint is retried on another one: the app sees none.
        assert client.get(url).status_code == 200
    assert bad.count == 3
    assert world.metric("sidecar_outlier_ejections_total", "outlier") == 1
    ejected_at = time.monotonic()
    assert world.endpoint("outlier", bad)["ejected"] is True
    counts = _spread(client, url, ups, 20)
    assert counts[1] == 0 and counts[0] + counts[2] == 20

    # Healed: back in service once base_ejection_time (1 s) has passed.
    bad.mode = "ok"
    bad.reset_counts()
    wait_until(lambda: client.get(url).status_code == 200 and bad.count > 0, within=4.0,
               what="the ejected endpoint back in rotation")
    assert 0.9 <= time.monotonic() - ejected_at < 3.0
    assert world.endpoint("outlier", bad)["ejected"] is False
    counts = _spread(client, url, ups, 30)
    assert min(counts) >= 5, counts


@pytest.mark.slow
def test_outlier_detection_keeps_the_last_healthy_endpoint(
    world: World, client: httpx.Client
) -> None:
    ups = world.upstreams["outlier_health"]
    url = world.url("outlier_health")
    last = ups[2]
    for up in ups[:2]:
        up.health_ok = False
    wait_until(lambda: [ep["healthy"] for ep in world.cluster("outlier_health")["endpoints"]]
               == [False, False, True], what="two endpoints unhealthy")
    last.mode = "fail"
    for _ in range(6):
        # Well past consecutive_failures, but ejecting it would leave nothing in service: the
        # app gets the upstream's own 503, never no_healthy_endpoints.
        resp = client.get(url)
        assert resp.status_code == 503 and sidecar_error(resp) is None
    assert last.count == 6
    assert world.metric("sidecar_outlier_ejections_total", "outlier_health") == 0
    last.mode = "ok"
    for up in ups[:2]:
        up.health_ok = True
    wait_until(lambda: all(ep["healthy"] for ep in world.cluster("outlier_health")["endpoints"]),
               what="healthy again")


# --- the retry budget --------------------------------------------------------------------------
def test_retry_storm_is_held_to_the_budget(world: World) -> None:
    (up,) = world.upstreams["budget"]
    url = world.url("budget")
    up.mode = "fail"
    n = 60

    def one(_: int) -> int:
        with httpx.Client(trust_env=False, timeout=10.0) as c:
            return sum(c.get(url).status_code == 503 for _ in range(n // 6))

    with ThreadPoolExecutor(6) as pool:
        assert sum(pool.map(one, range(6))) == n
    retries = up.count - n
    # ratio 0.2 of 60 requests + min_per_second 1 over the 10 s window = 22 retries at most;
    # without a budget there would be 2 x 60 = 120.
    allowed = int(1 * 10 + 0.2 * n)
    print(f"\nretry storm: {n} app requests, {up.count} upstream requests, "
          f"{retries} retries (budget {allowed}, unbudgeted {2 * n})")
    assert 10 <= retries <= allowed, retries
    assert world.metric("sidecar_retries_total", "budget") == retries
    assert world.metric("sidecar_retry_budget_exhausted_total", "budget") >= 1


# --- deadlines -------------------------------------------------------------------------------
def test_request_deadline(world: World, client: httpx.Client) -> None:
    (up,) = world.upstreams["deadline"]
    url = world.url("deadline")
    closed_before = world.metric("sidecar_upstream_connections_closed_total", "deadline",
                                 reason="timeout")
    up.mode = "hang"
    resp, took = timed_get(client, url, headers={"x-sidecar-timeout-ms": "300"})
    assert resp.status_code == 504 and sidecar_error(resp) == "upstream_timeout"
    assert 0.28 <= took < 1.0, took
    assert up.count == 1  # a timed-out request is not retried
    hung = up.requests[0]
    assert 250 <= int(hung.headers["x-sidecar-deadline-ms"]) <= 300
    # The sidecar closed that connection: the hanging handler was cancelled.
    wait_until(lambda: up.inflight == 0, within=2.0, what="hung connection closed")
    assert world.metric("sidecar_upstream_connections_closed_total", "deadline",
                        reason="timeout") == closed_before + 1

    up.mode = "ok"
    assert client.get(url).status_code == 200
    assert up.requests[1].peer_port != hung.peer_port  # a new connection, not the timed-out one
    assert int(up.requests[1].headers["x-sidecar-deadline-ms"]) == 15000  # timeouts.request

    # A retry carries what is left of the deadline, not the whole of it.
    up.reset_counts()
    up.fail_delay = 0.2
    up.fail_next = 1
    resp = client.get(url, headers={"x-sidecar-timeout-ms": "1000"})
    up.fail_delay = 0.0
    assert resp.status_code == 200
    first, second = (int(s.headers["x-sidecar-deadline-ms"]) for s in up.requests)
    assert first == 1000
    assert second <= 800, second


def test_per_try_timeout_moves_to_another_endpoint(world: World, client: httpx.Client) -> None:
    slow, fast = world.upstreams["per_try"]
    url = world.url("per_try")
    slow.mode = "hang"
    try:
        for _ in range(4):
            resp, took = timed_get(client, url)
            assert resp.status_code == 200 and resp.text == fast.name
            assert took < 1.0, took
    finally:
        slow.mode = "ok"
    assert slow.count >= 1  # round robin sent some first tries there
    assert fast.count == 4
    assert world.metric("sidecar_retries_total", "per_try", reason="timeout") == slow.count

    # Once the response is reaching the app the per-try timeout no longer applies: a body
    # slower than per_try_timeout is not cut.
    slow.slow_body = fast.slow_body = 0.5
    try:
        for _ in range(2):
            resp = client.get(url)
            assert resp.status_code == 200 and resp.text == "first,last"
    finally:
        slow.slow_body = fast.slow_body = 0.0


def test_per_try_timeout_while_waiting_for_a_connection(world: World) -> None:
    """The only connection is held by a POST (not replayable: no per-try timeout, it may take
    as long as it needs); a GET waits for that connection, its tries time out while waiting and
    are retried, the last one waits on and gets the connection once the POST is done."""
    (up,) = world.upstreams["per_try_wait"]
    url = world.url("per_try_wait")
    up.mode = "hang"

    def post() -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=10.0) as c:
            return c.post(url, content=b"slow")

    def get() -> tuple[httpx.Response, float]:
        with httpx.Client(trust_env=False, timeout=10.0) as c:
            return timed_get(c, url, headers={"x-sidecar-timeout-ms": "4000"})

    with ThreadPoolExecutor(2) as pool:
        try:
            posted = pool.submit(post)
            wait_until(lambda: up.inflight == 1, what="the POST hanging upstream")
            got = pool.submit(get)
            wait_until(lambda: world.metric("sidecar_retries_total", "per_try_wait",
                                            reason="timeout") == 2, within=3.0,
                       what="two per-try timeouts while waiting")
            time.sleep(0.2)
        finally:
            up.mode = "ok"
        assert posted.result(10).status_code == 200  # hung ~1 s > per_try_timeout: not cut
        resp, took = got.result(10)
    assert resp.status_code == 200
    assert [s.method for s in up.requests] == ["POST", "GET"]
    assert world.metric("sidecar_retries_total", "per_try_wait", reason="timeout") == 2
    assert world.cluster("per_try_wait")["endpoints"][0]["inflight"] == 0


# --- load balancing ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["round_robin", "least_request", "random"])
def test_load_balancers_spread_requests(world: World, client: httpx.Client, kind: str) -> None:
    name = f"lb_{kind}"
    ups = world.upstreams[name]
    counts = _spread(client, world.url(name), ups, 60)
    assert sum(counts) == 60
    if kind == "round_robin":
        assert counts == [20, 20, 20], counts
    else:
        assert min(counts) >= 8, counts


def test_least_request_avoids_a_slow_endpoint(world: World) -> None:
    ups = world.upstreams["lb_least_request"]
    url = world.url("lb_least_request")
    for up in ups:
        up.reset_counts()
    ups[0].delay = 0.1

    def one(_: int) -> None:
        with httpx.Client(trust_env=False, timeout=10.0) as c:
            for _ in range(15):
                assert c.get(url).status_code == 200

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(4)))
    finally:
        ups[0].delay = 0.0
    counts = [up.count for up in ups]
    assert sum(counts) == 60
    assert counts[0] < min(counts[1:]), counts
