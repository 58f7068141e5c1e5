"""`min_idle` is refilled as soon as it is drawn down (issue 13 bug 4), not at the pool's next
idle timer: bounded by max_connections, one refill in flight per missing slot, and none for an
endpoint out of service. Real pools against a real origin on 127.0.0.1 that counts the
connections it accepted; both event loops.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.clock import FakeClock
from sidecar.config import ClusterConfig
from sidecar.discovery.endpoints import Endpoint, Reset
from sidecar.observe.stats import Stats
from sidecar.policy.resilience import ClusterPolicies
from sidecar.timers import Wheel
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.connection import UpstreamConnection
from sidecar.upstream.pool import Pool
from tests.integration.test_terminating_endpoint import Origin, acquire
from tests.unit.test_pool import LOOPS, User, eventually, make_pool, run_on, send_get

pytestmark = pytest.mark.parametrize("loop", sorted(LOOPS))

PROMPTLY = 3.0  # far under idle_timeout (60 s): the refill may not wait for the idle timer


def slow_request(conn: UpstreamConnection) -> User:
    """A request the origin holds (while `origin.hold`): the connection stays busy."""
    user = User()
    send_get(conn, user)
    return user


async def finish(pool: Pool, origin: Origin, users: list[tuple[UpstreamConnection, User]]) -> None:
    origin.release()
    for conn, user in users:
        assert (await asyncio.wait_for(user.done, 5)).status == 200
        pool.release(conn)


def test_taken_idle_connections_are_refilled_at_once(loop: str) -> None:
    async def main() -> None:
        origin = Origin()
        await origin.start()
        try:
            pool = make_pool(origin.port, min_idle=2, idle_timeout=60.0)
            pool.prewarm()
            await eventually(lambda: pool.idle_count == 2 and origin.accepted == 2)
            origin.hold = True
            # Two concurrent slow requests take both prewarmed connections ...
            a, b = await acquire(pool), await acquire(pool)
            users = [(a, slow_request(a)), (b, slow_request(b))]
            await eventually(lambda: len(origin.held) == 2)
            # ... and two new ones are opened for the next burst right away, no more.
            await eventually(lambda: origin.accepted == 4 and pool.idle_count == 2, PROMPTLY)
            assert pool.connecting_count == 0 and pool.total == 4
            await finish(pool, origin, users)
            assert pool.idle_count == 4 and origin.accepted == 4
            pool.abort_all("drain")
        finally:
            await origin.stop()

    run_on(loop, main())


def test_refills_stay_within_max_connections_and_never_storm(loop: str) -> None:
    async def main() -> None:
        origin = Origin()
        await origin.start()
        try:
            pool = make_pool(origin.port, min_idle=2, max_idle=2, max_connections=3,
                             idle_timeout=60.0)
            pool.prewarm()
            await eventually(lambda: pool.idle_count == 2)
            origin.hold = True
            a = await acquire(pool)
            users = [(a, slow_request(a))]
            assert pool.connecting_count == 1  # one refill for the one missing slot
            for _ in range(5):
                pool.prewarm()  # asked again and again: still one in flight
            assert pool.connecting_count == 1
            b = await acquire(pool)  # the other idle one: room for no more than max_connections
            users.append((b, slow_request(b)))
            assert pool.total == 3 and pool.connecting_count <= 1
            await eventually(lambda: pool.idle_count == 1 and pool.connecting_count == 0)
            assert origin.accepted == 3
            await finish(pool, origin, users)
            pool.abort_all("drain")
        finally:
            await origin.stop()

    run_on(loop, main())


def test_an_idle_connection_the_upstream_closes_is_replaced(loop: str) -> None:
    async def main() -> None:
        origin = Origin()
        await origin.start()
        try:
            pool = make_pool(origin.port, min_idle=2, idle_timeout=60.0)
            pool.prewarm()
            await eventually(lambda: pool.idle_count == 2 and origin.accepted == 2)
            next(iter(origin.transports)).close()  # the upstream closes one idle connection
            await eventually(lambda: origin.accepted == 3 and pool.idle_count == 2, PROMPTLY)
            pool.abort_all("drain")
        finally:
            await origin.stop()

    run_on(loop, main())


def test_no_refill_for_an_ejected_endpoint(loop: str) -> None:
    """Outlier detection ejects one of two endpoints (the cluster learns it through its real
    policies, on a clock the test moves): taking its idle connections opens no new ones; once
    its ejection ends, it is warm again."""

    async def main() -> None:
        one, two = Origin(), Origin()
        await one.start()
        await two.start()
        try:
            aio_loop = asyncio.get_running_loop()
            cfg = ClusterConfig.model_validate({
                "name": "c",
                "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{one.port}"]},
                "pool": {"min_idle": 2, "idle_timeout": "60s"},
                "outlier_detection": {"consecutive_failures": 1, "base_ejection_time": "30s",
                                      "max_ejection_percent": 50},
            })
            cluster = Cluster(cfg, aio_loop, Wheel(aio_loop), Stats().cluster("c"))
            clock = FakeClock()
            policies = ClusterPolicies("c", cfg, cluster.stats, clock, cluster.refresh)
            cluster.policies = policies
            eps = (Endpoint("127.0.0.1", one.port), Endpoint("127.0.0.1", two.port))
            cluster.apply(Reset(eps))
            policies.set_endpoints([(ep.key, ep.ip, ep.port) for ep in eps])
            pool = cluster.pools[eps[0].key]
            await eventually(lambda: one.accepted == 2 and two.accepted == 2
                             and pool.idle_count == 2)
            policies.outlier.record(eps[0].key, False)  # ejected
            assert policies.endpoint_ejected(eps[0].key) and not pool.warm
            conns = [await acquire(pool), await acquire(pool)]  # e.g. retries still in flight
            assert pool.connecting_count == 0 and pool.idle_count == 0
            for conn in conns:
                pool.discard(conn, "error")
            await eventually(lambda: one.open == 0)
            assert one.accepted == 2
            clock.advance(31)
            policies.tick()  # the ejection is over: the cluster recomputes who serves
            assert pool.warm
            await eventually(lambda: one.accepted == 4 and pool.idle_count == 2, PROMPTLY)
            cluster.abort_all("drain")
        finally:
            await one.stop()
            await two.stop()

    run_on(loop, main())
