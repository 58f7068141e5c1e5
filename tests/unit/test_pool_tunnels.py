"""A TCP listener's dedicated connections count in the pool's `inflight` from `open_dedicated`
until the waiter's one `tunnel_closed`, whichever way the connection ends: the balancer and
the drain read that count, so it must never drift below zero or stay above it."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.errors import SidecarError
from tests.harness import free_port
from tests.unit.test_pool import BOUND, LOOPS, Server, make_pool, run_on

pytestmark = pytest.mark.parametrize("loop", sorted(LOOPS))


class TunnelWaiter:
    """What `downstream/tcp.py` is to the pool, reduced to what it reports."""

    def __init__(self) -> None:
        self.done: asyncio.Future[asyncio.Transport | SidecarError] = (
            asyncio.get_running_loop().create_future())

    def on_pool_tunnel(self, transport: asyncio.Transport) -> None:
        self.done.set_result(transport)

    def on_pool_error(self, exc: SidecarError) -> None:
        self.done.set_result(exc)


def test_an_app_that_left_before_the_connect_failed_is_counted_out_once(loop: str) -> None:
    async def main() -> None:
        pool = make_pool(free_port())  # nothing listens there: the connect is refused
        waiter = TunnelWaiter()
        pool.open_dedicated(waiter)
        assert pool.inflight == 1
        pool.tunnel_closed()  # the app closed its connection while we connected
        assert isinstance(await asyncio.wait_for(waiter.done, BOUND), SidecarError)
        assert pool.inflight == 0

    run_on(loop, main())


def test_a_tunnel_counts_until_it_is_closed(loop: str) -> None:
    async def main() -> None:
        async with Server() as server:
            pool = make_pool(server.port)
            waiter = TunnelWaiter()
            pool.open_dedicated(waiter)
            transport = await asyncio.wait_for(waiter.done, BOUND)
            assert not isinstance(transport, SidecarError)  # (uvloop's are no asyncio.Transport)
            assert pool.inflight == 1 and pool.active_count == 0  # not the pool's any more
            transport.close()
            pool.tunnel_closed()
            assert pool.inflight == 0

    run_on(loop, main())

