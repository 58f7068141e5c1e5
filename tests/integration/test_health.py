"""Active health checks against a real aiohttp upstream on 127.0.0.1, switched by the test."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from sidecar.policy.health import HEALTHY, UNHEALTHY, HealthChecker, HealthState, tcp_check

LOOPBACK = "127.0.0.1"


class Upstream:
    """A health endpoint whose answer the test switches: ok, fail, hang."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.hits = 0
        self.hosts: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.hosts.append(request.host)
        if self.mode == "hang":
            await asyncio.sleep(30)
        return web.Response(status=200 if self.mode == "ok" else 503, text=self.mode)


@asynccontextmanager
async def serve(
    upstream: Upstream, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/healthz", upstream.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port
    finally:
        await runner.cleanup()


from tests.harness import free_port  # noqa: E402  (outside the ephemeral range)


async def wait_for(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `cond` (state the checker changes, not an event we could await) for a bounded time."""
    for _ in range(int(within / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {within} s")


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


def test_health_state_thresholds() -> None:
    s = HealthState(healthy_threshold=2, unhealthy_threshold=3)
    assert s.state is HEALTHY
    assert [s.observe(False) for _ in range(3)] == [False, False, True]
    assert s.state is UNHEALTHY
    assert s.observe(True) is False
    assert s.observe(False) is False  # the streak resets
    assert [s.observe(True) for _ in range(2)] == [False, True]
    assert s.healthy


def test_http_check_flips_after_thresholds_and_back() -> None:
    async def main() -> None:
        upstream = Upstream()
        changes: list[tuple[str, bool]] = []
        stats = {"success": 0, "failure": 0}
        async with serve(upstream) as port:
            key = f"{LOOPBACK}:{port}"
            hc = HealthChecker(
                "c",
                "http",
                path="/healthz",
                interval=60,
                timeout=0.3,
                healthy_threshold=2,
                unhealthy_threshold=3,
                on_change=lambda k, h: changes.append((k, h)),
                stats=stats,
            )
            hc.set_endpoints([(key, LOOPBACK, port)])
            try:
                await hc.check_once()
                assert hc.is_healthy(key) and stats == {"success": 1, "failure": 0}

                upstream.mode = "fail"
                await hc.check_once()
                await hc.check_once()
                assert hc.is_healthy(key)
                await hc.check_once()
                assert not hc.is_healthy(key)
                assert changes == [(key, False)]

                upstream.mode = "ok"
                await hc.check_once()
                assert not hc.is_healthy(key)
                await hc.check_once()
                assert hc.is_healthy(key)
                assert changes == [(key, False), (key, True)]

                upstream.mode = "hang"  # each check ends at its timeout
                for _ in range(3):
                    await hc.check_once()
                assert not hc.is_healthy(key)
                assert stats == {"success": 3, "failure": 6}
                assert upstream.hosts[0] == key
            finally:
                await hc.stop()

    run(main)


def test_loop_runs_on_its_own_and_stops_cleanly() -> None:
    async def main() -> None:
        upstream = Upstream()
        changes: list[tuple[str, bool]] = []
        async with serve(upstream) as port:
            key = f"{LOOPBACK}:{port}"
            hc = HealthChecker(
                "c",
                "http",
                interval=0.05,
                timeout=0.2,
                healthy_threshold=1,
                unhealthy_threshold=2,
                on_change=lambda k, h: changes.append((k, h)),
            )
            hc.set_endpoints([(key, LOOPBACK, port)])
            hc.start()
            hc.start()  # idempotent: still one task
            assert hc.running
            try:
                await wait_for(lambda: upstream.hits >= 2)
                upstream.mode = "fail"
                await wait_for(lambda: not hc.is_healthy(key))
                upstream.mode = "ok"
                await wait_for(lambda: hc.is_healthy(key))
                assert changes == [(key, False), (key, True)]
            finally:
                await hc.stop()
            assert not hc.running
            hits = upstream.hits
            await asyncio.sleep(0.2)
            assert upstream.hits == hits  # nothing probes after stop()
            await hc.stop()  # idempotent

    run(main)


def test_removed_endpoint_result_is_dropped() -> None:
    async def main() -> None:
        upstream = Upstream()
        upstream.mode = "hang"
        stats = {"success": 0, "failure": 0}
        async with serve(upstream) as port:
            key = f"{LOOPBACK}:{port}"
            hc = HealthChecker(
                "c", "http", interval=60, timeout=0.3, unhealthy_threshold=1, stats=stats
            )
            hc.set_endpoints([(key, LOOPBACK, port)])
            try:
                task = asyncio.create_task(hc.check_once())
                await wait_for(lambda: upstream.hits == 1)
                hc.set_endpoints([])
                await task
                assert stats == {"success": 0, "failure": 0}
                assert hc.is_healthy(key)  # unknown keys: no opinion
            finally:
                await hc.stop()

    run(main)


def test_tcp_check_open_and_closed_ports() -> None:
    async def main() -> None:
        closed = free_port()
        async with asyncio.timeout(2):
            assert await tcp_check(LOOPBACK, closed) is False
        async with serve(Upstream()) as port:
            async with asyncio.timeout(2):
                assert await tcp_check(LOOPBACK, port) is True

            changes: list[tuple[str, bool]] = []
            hc = HealthChecker(
                "c",
                "tcp",
                interval=60,
                timeout=0.5,
                unhealthy_threshold=2,
                on_change=lambda k, h: changes.append((k, h)),
            )
            good, bad = f"{LOOPBACK}:{port}", f"{LOOPBACK}:{closed}"
            hc.set_endpoints([(good, LOOPBACK, port), (bad, LOOPBACK, closed)])
            try:
                await hc.check_once()
                assert hc.is_healthy(bad)
                await hc.check_once()
                assert not hc.is_healthy(bad)
                assert hc.is_healthy(good)
                assert changes == [(bad, False)]
                assert "1 unhealthy" in repr(hc)
            finally:
                await hc.stop()

    run(main)


def test_https_check_with_server_hostname() -> None:
    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("health.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def main() -> None:
        upstream = Upstream()
        async with serve(upstream, server_ctx) as port:
            key = f"{LOOPBACK}:{port}"
            ok = HealthChecker(
                "c",
                "http",
                interval=60,
                timeout=1,
                unhealthy_threshold=1,
                ssl_context=client_ctx,
                server_hostname="health.test",
            )
            wrong = HealthChecker(
                "c",
                "http",
                interval=60,
                timeout=1,
                unhealthy_threshold=1,
                ssl_context=client_ctx,
                server_hostname="other.test",
            )
            for hc in (ok, wrong):
                hc.set_endpoints([(key, LOOPBACK, port)])
            try:
                await ok.check_once()
                await wrong.check_once()
                assert ok.is_healthy(key)
                assert not wrong.is_healthy(key)  # the certificate does not name other.test
                assert upstream.hosts == ["health.test"]
            finally:
                await ok.stop()
                await wrong.stop()

    run(main)
