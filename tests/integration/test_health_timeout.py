"""`health_check.timeout` longer than `interval` (issue 13 bug 3): accepted, as in Envoy.

A check still running delays that endpoint's next one: one endpoint never has two checks in
flight, and a slow endpoint does not hold back the checks of the others. Real aiohttp health
endpoints on 127.0.0.1 count the checks in flight on their side. Both event loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop
from aiohttp import web

from sidecar.config import ClusterConfig
from sidecar.policy.health import HealthChecker

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
BOUND = 5.0  # no wait is longer


def cluster_config(health: dict[str, object]) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "name": "c",
        "discovery": {"type": "static", "endpoints": ["127.0.0.1:8080"]},
        "health_check": {"type": "http", **health},
    })


def test_an_interval_shorter_than_the_default_timeout_is_accepted() -> None:
    hc = cluster_config({"interval": "200ms"}).health_check
    assert (hc.interval, hc.timeout) == (0.2, 1.0)  # the default timeout, as documented


def test_a_timeout_longer_than_the_interval_is_accepted() -> None:
    hc = cluster_config({"interval": "200ms", "timeout": "2s"}).health_check
    assert (hc.interval, hc.timeout) == (0.2, 2.0)


class Endpoint:
    """A health endpoint that answers `status`, after `gate` is set when it has one, and counts
    the checks in flight on its side."""

    def __init__(self, status: int, gate: asyncio.Event | None = None) -> None:
        self.status = status
        self.gate = gate
        self.hits = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await asyncio.wait_for(self.gate.wait(), BOUND)
            return web.Response(status=self.status)
        finally:
            self.in_flight -= 1


@asynccontextmanager
async def serve(endpoint: Endpoint) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/healthz", endpoint.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def eventually(cond: Callable[[], bool], what: str) -> None:
    """Poll state the checker and the servers change (there is no event to await)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"not within {BOUND}s: {what}")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_slow_checks_never_overlap_and_do_not_hold_back_others(loop: str) -> None:
    async def main() -> None:
        gate = asyncio.Event()
        slow_ok, slow_bad, fast = Endpoint(200, gate), Endpoint(503, gate), Endpoint(200)
        changes: list[tuple[str, bool]] = []
        async with serve(slow_ok) as p_ok, serve(slow_bad) as p_bad, serve(fast) as p_fast:
            hc = HealthChecker(
                "c", "http", interval=0.05, timeout=BOUND,  # timeout 100x the interval
                healthy_threshold=1, unhealthy_threshold=2,
                on_change=lambda key, healthy: changes.append((key, healthy)),
            )
            hc.set_endpoints([("ok", "127.0.0.1", p_ok), ("bad", "127.0.0.1", p_bad),
                              ("fast", "127.0.0.1", p_fast)])
            hc.start()
            try:
                await eventually(lambda: slow_ok.hits == 1 and slow_bad.hits == 1,
                                 "the first slow checks in flight")
                # While they hang (for many intervals), the fast endpoint goes on being checked
                # at its interval, and no second check starts on the slow ones.
                await eventually(lambda: fast.hits >= 4, "the fast endpoint checked meanwhile")
                assert (slow_ok.hits, slow_bad.hits) == (1, 1)
                gate.set()  # the slow ones answer now (and from now on)
                await eventually(lambda: not hc.is_healthy("bad"), "bad found unhealthy")
                await eventually(lambda: slow_ok.hits >= 3, "ok checked again")
            finally:
                await hc.stop()
        assert hc.is_healthy("ok") and hc.is_healthy("fast") and not hc.is_healthy("bad")
        assert changes == [("bad", False)]
        assert slow_ok.max_in_flight == slow_bad.max_in_flight == fast.max_in_flight == 1

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main(), 30))
