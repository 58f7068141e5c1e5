"""A terminating endpoint keeps no idle connection (SPEC section 5, issue 13 bug 2).

The real discovery path: the fake Kubernetes API server (tests/k8s/fake_apiserver.py) serves an
EndpointSlice, `KubernetesResolver` watches it and emits deltas into a real `Cluster`, whose pool
connects to a real origin on 127.0.0.1 that counts the connections open on its side. When the
slice marks the endpoint `terminating`, the request in flight finishes, the idle connections
close at once, the connection the request finished with is closed instead of pooled, and no
connection is opened again (min_idle is not refilled for it). Both event loops; bounded waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.config import ClusterConfig
from sidecar.discovery.kubernetes import KubernetesResolver
from sidecar.errors import NoHealthyEndpoints
from sidecar.observe.stats import Stats
from sidecar.timers import Wheel
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.connection import UpstreamConnection
from sidecar.upstream.pool import Pool
from tests.k8s.cluster_iface import FakeCluster
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.support import LOOPS, run, wait_until
from tests.unit.test_pool import User, Waiter, send_get

SVC = "payments"
OK: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Origin:
    """An HTTP/1.1 origin counting, on its side, the connections accepted and still open. While
    `hold` is set, responses wait until `release()`."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.hold = False
        self.held: list[asyncio.Transport] = []
        self.transports: set[asyncio.Transport] = set()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        origin = self

        class Conn(asyncio.Protocol):
            def __init__(self) -> None:
                self.buf = b""
                self.transport: asyncio.Transport | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport  # type: ignore[assignment]
                origin.transports.add(self.transport)
                origin.accepted += 1
                origin.open += 1

            def data_received(self, data: bytes) -> None:
                self.buf += data
                while b"\r\n\r\n" in self.buf:
                    _, self.buf = self.buf.split(b"\r\n\r\n", 1)
                    assert self.transport is not None
                    if origin.hold:
                        origin.held.append(self.transport)
                    else:
                        self.transport.write(OK)

            def connection_lost(self, exc: Exception | None) -> None:
                origin.transports.discard(self.transport)  # type: ignore[arg-type]
                origin.open -= 1

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(Conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def release(self) -> None:
        self.hold = False
        for transport in self.held:
            transport.write(OK)
        self.held.clear()

    async def stop(self) -> None:
        """Whatever the test left open is closed here too (a loop closing with live server
        transports can hang uvloop)."""
        for transport in list(self.transports):
            transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def acquire(pool: Pool) -> UpstreamConnection:
    waiter = Waiter()
    conn = waiter.take(pool)
    return conn if conn is not None else await waiter.get()


async def eventually(cond: Callable[[], bool], what: str) -> None:
    await wait_until(cond, within=5.0, what=what)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_terminating_endpoint_closes_idle_and_finished_connections(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], tmp_path: Path
) -> None:
    async def main() -> None:
        origin = Origin()
        await origin.start()
        try:
            await scenario(origin)
        finally:
            await origin.stop()

    async def scenario(origin: Origin) -> None:
        async with FakeApiServer(tmp_path / "apiserver") as server:
            k8s = FakeCluster(server)
            await k8s.create_endpoints(SVC, ["127.0.0.1"], ports=(("http", origin.port),))
            loop = asyncio.get_running_loop()
            cfg = ClusterConfig.model_validate({
                "name": SVC,
                "discovery": {"type": "kubernetes", "service": SVC, "port": "http"},
                "pool": {"min_idle": 2, "idle_timeout": "60s"},
            })
            cluster = Cluster(cfg, loop, Wheel(loop), Stats().cluster(SVC))
            resolver = KubernetesResolver(
                SVC, k8s.namespace, "http", api=k8s.api(),
                backoff_initial=0.02, backoff_max=0.2, request_timeout=5.0,
            )
            task = loop.create_task(resolver.run(cluster.apply))
            try:
                key = f"127.0.0.1:{origin.port}"
                await eventually(lambda: key in cluster.endpoints, "the endpoint discovered")
                pool = cluster.pick()
                await eventually(lambda: pool.idle_count == 2 and origin.open == 2, "prewarmed")

                # One request done (its connection idle again), one in flight, held by the origin.
                done, busy = await acquire(pool), await acquire(pool)
                user = User()
                send_get(done, user, b"p")
                await asyncio.wait_for(user.done, 5)
                pool.release(done)
                origin.hold = True
                user = User()
                send_get(busy, user, b"p")
                await eventually(lambda: len(origin.held) == 1, "the request at the origin")
                assert pool.active_count == 1 and pool.idle_count >= 1
                await eventually(lambda: pool.connecting_count == 0, "refills settled")

                await k8s.mark_terminating(SVC, "127.0.0.1", serving=True)
                await eventually(lambda: cluster.endpoints[key].terminating, "terminating seen")
                with pytest.raises(NoHealthyEndpoints):
                    cluster.pick()  # no new requests go there
                # Idle connections close at once; the one in flight stays.
                await eventually(lambda: origin.open == 1, "idle connections closed")
                assert pool.idle_count == 0 and pool.active_count == 1
                accepted = origin.accepted

                origin.release()  # the in-flight request finishes ...
                head = await asyncio.wait_for(user.done, 5)
                assert head.status == 200 and not user.errors
                pool.release(busy)
                # ... and its connection is closed, not pooled (nor replaced by a min_idle
                # refill): nothing is left open to a pod that is shutting down and waits on us.
                assert pool.idle_count == 0 and pool.connecting_count == 0
                await eventually(lambda: origin.open == 0, "the finished connection closed")
                assert pool.total == 0 and origin.accepted == accepted
                assert cluster.stats.connections_closed["endpoint_removed"] >= 2
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                cluster.abort_all("drain")

    run(main, loop_factory)
