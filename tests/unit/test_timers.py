"""The deadline wheel: objects fire once their deadline passes, and a cancelled object is let go
at once. The last tests drive real app connections on 127.0.0.1 through DownstreamProtocol: a
closed connection must not stay in the wheel (it did, until its header/idle timeout bucket,
and at thousands of connections a second that kept hundreds of thousands of dead objects for
the collector's oldest generation: a full collection then stalled the loop for over a second).
"""

from __future__ import annotations

import asyncio
import gc
import math
import socket
import weakref
from collections.abc import Callable

import pytest

from sidecar._build import compiled
from sidecar.downstream.context import Limits, ListenerContext
from sidecar.downstream.protocol import DownstreamProtocol
from sidecar.downstream.router import ForwardTarget, RouteTable
from sidecar.observe.stats import ListenerStats
from sidecar.timers import TICK, Timed, Wheel
from sidecar.upstream.cluster import Cluster
from tests.unit.test_pool import LOOPS, eventually, run_on

pytestmark = pytest.mark.parametrize("loop", sorted(LOOPS))
BOUND = 5.0  # no wait in this file is longer


# A test class cannot implement the compiled Timed trait (mypyc: "interpreted classes cannot
# inherit from compiled traits"). These four run against the same source in the pure-Python
# pass of scripts/check; compiled, the wheel is exercised by the real objects further down
# and by tests/unit/test_pool.py.
pure_only = pytest.mark.skipif(compiled(), reason="by design: Timed is a compiled trait here; "
                               "runs in the SIDECAR_PURE=1 pass of scripts/check")


class Item(Timed):
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.filed_bucket = 0
        self.fired: list[float] = []
        self.then: Callable[[], None] | None = None

    def on_deadline(self, now: float) -> None:
        self.fired.append(now)
        if self.then is not None:
            self.then()


@pure_only
def test_objects_fire_once_their_deadline_passes(loop: str) -> None:
    async def main() -> None:
        aio = asyncio.get_running_loop()
        wheel = Wheel(aio)
        now = aio.time()
        soon, later, never = Item(now + 0.1), Item(now + 0.4), Item(math.inf)
        for item in (soon, later, never):
            wheel.schedule(item)
        assert len(wheel) == 2  # no deadline: not filed
        await eventually(lambda: bool(soon.fired))
        assert soon.fired[0] >= soon.deadline and not later.fired
        await eventually(lambda: bool(later.fired))
        assert later.fired[0] >= later.deadline
        assert len(wheel) == 0 and not never.fired

    run_on(loop, main())


@pure_only
def test_a_deadline_moved_later_is_refiled_and_one_moved_earlier_moves(loop: str) -> None:
    async def main() -> None:
        aio = asyncio.get_running_loop()
        wheel = Wheel(aio)
        now = aio.time()
        item = Item(now + 0.1)
        wheel.schedule(item)
        item.deadline = now + 0.3  # later: stays filed early, re-files itself when that fires
        wheel.schedule(item)
        await asyncio.sleep(0.1 + 3 * TICK)
        assert not item.fired and len(wheel) == 1
        await eventually(lambda: bool(item.fired))
        assert item.fired[0] >= now + 0.3

        early = Item(aio.time() + 2.0)
        wheel.schedule(early)
        early.deadline = aio.time() + 0.1  # earlier: filed again, and only once
        wheel.schedule(early)
        assert len(wheel) == 1
        await eventually(lambda: bool(early.fired))
        assert len(early.fired) == 1 and len(wheel) == 0

    run_on(loop, main())


@pure_only
def test_a_cancelled_object_never_fires_and_is_not_kept(loop: str) -> None:
    async def main() -> None:
        aio = asyncio.get_running_loop()
        wheel = Wheel(aio)
        item = Item(aio.time() + 0.1)
        fired = item.fired
        wheel.schedule(item)
        wheel.cancel(item)
        wheel.cancel(item)  # twice is harmless
        assert len(wheel) == 0 and item.filed_bucket == 0
        ref = weakref.ref(item)
        del item
        gc.collect()
        assert ref() is None  # the wheel held no reference
        await asyncio.sleep(0.1 + 3 * TICK)
        assert fired == []

    run_on(loop, main())


@pure_only
def test_cancel_from_a_deadline_handler_skips_a_neighbour_in_the_same_bucket(loop: str) -> None:
    async def main() -> None:
        aio = asyncio.get_running_loop()
        wheel = Wheel(aio)
        at = aio.time() + 0.1
        first, second = Item(at), Item(at)
        first.then = lambda: wheel.cancel(second)
        wheel.schedule(first)
        wheel.schedule(second)
        await eventually(lambda: bool(first.fired))
        await asyncio.sleep(3 * TICK)
        assert second.fired == [] and len(wheel) == 0

    run_on(loop, main())


# --- app connections ---------------------------------------------------------------------------
class NoClusters:
    def get(self, name: str) -> Cluster | None:
        return None

    def forward(self, target: ForwardTarget) -> Cluster:
        raise AssertionError("no forward proxy in this test")


async def _listener(wheel: Wheel) -> tuple[asyncio.Server, int, ListenerContext]:
    aio = asyncio.get_running_loop()
    # No routes: every request gets the sidecar's own 404 (no_route), no upstream needed.
    ctx = ListenerContext(
        name="app", table=RouteTable(), clusters=NoClusters(), stats=ListenerStats("app"),
        limits=Limits(header_timeout=60.0, idle_timeout=300.0), loop=aio, wheel=wheel,
    )
    server = await aio.create_server(lambda: DownstreamProtocol(ctx), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], ctx


async def _one(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), BOUND)
    try:
        if request:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        else:
            head = b""
    finally:
        writer.close()
        await writer.wait_closed()
    return head


@pytest.mark.parametrize("request_bytes", [b"", b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"],
                         ids=["silent", "keep-alive-request"])
def test_closed_app_connections_leave_the_wheel(loop: str, request_bytes: bytes) -> None:
    async def main() -> None:
        wheel = Wheel(asyncio.get_running_loop())
        server, port, ctx = await _listener(wheel)
        try:
            for _ in range(50):
                head = await _one(port, request_bytes)
                if request_bytes:
                    assert head.startswith(b"HTTP/1.1 404 ")
            await eventually(lambda: ctx.stats.downstream_connections == 0)
            # Every connection had a deadline minutes away (header or idle timeout); closed,
            # none may remain filed, or it and all it references live until then.
            assert len(wheel) == 0
        finally:
            server.close()
            await server.wait_closed()

    run_on(loop, main())


def test_an_open_connection_still_times_out(loop: str) -> None:
    async def main() -> None:
        aio = asyncio.get_running_loop()
        wheel = Wheel(aio)
        server, port, ctx = await _listener(wheel)
        ctx.limits.header_timeout = 0.2
        sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
        try:
            await eventually(lambda: ctx.stats.downstream_connections == 1)
            assert len(wheel) == 1
            sock.setblocking(False)
            # The wheel closes it (sending the 408 of SPEC section 5 or just closing).
            await eventually(lambda: ctx.stats.downstream_connections == 0)
            assert len(wheel) == 0
        finally:
            sock.close()
            server.close()
            await server.wait_closed()

    run_on(loop, main())
