"""Test helpers for resolvers: run a coroutine on a chosen loop, record deltas, run a resolver."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from sidecar.discovery.endpoints import Delta, Endpoint, Resolver, apply_delta

LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(uvloop.new_event_loop, id="uvloop"),
]


def run(
    main: Callable[[], Coroutine[Any, Any, None]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> None:
    """Run one test body on a fresh loop of the given kind."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


class Recorder:
    """The `emit` of a resolver under test: keeps every delta and the endpoint set they make."""

    def __init__(self) -> None:
        self.deltas: list[Delta] = []
        self.current: dict[str, Endpoint] = {}
        self._changed = asyncio.Event()

    def __call__(self, delta: Delta) -> None:
        self.deltas.append(delta)
        self.current = apply_delta(self.current, delta)
        self._changed.set()

    @property
    def keys(self) -> set[str]:
        return set(self.current)

    async def wait_for(
        self, predicate: Callable[[dict[str, Endpoint]], bool], *, within: float = 10.0
    ) -> dict[str, Endpoint]:
        """Until the endpoint set satisfies `predicate`; fails the test after `within` seconds."""
        try:
            async with asyncio.timeout(within):
                while not predicate(self.current):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"endpoints never matched; last {sorted(self.current)}, {self.deltas}")
        return self.current

    async def wait_for_keys(self, keys: set[str], *, within: float = 10.0) -> dict[str, Endpoint]:
        return await self.wait_for(lambda current: set(current) == keys, within=within)

    async def wait_for_deltas(self, count: int, *, within: float = 10.0) -> list[Delta]:
        try:
            async with asyncio.timeout(within):
                while len(self.deltas) < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"expected {count} deltas, got {self.deltas}")
        return self.deltas


async def wait_until(
    predicate: Callable[[], bool], *, within: float = 10.0, what: str = ""
) -> None:
    """Poll a condition every 10 ms; fails the test after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while True:  # polled: the things tests wait on here have no event to wait for
                if predicate():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what or predicate}")


@contextlib.asynccontextmanager
async def running(resolver: Resolver, emit: Recorder) -> AsyncIterator[asyncio.Task[None]]:
    """The resolver's run() as a task; cancelled on exit, and it must end by that cancellation
    (a resolver never raises anything else), promptly."""
    task = asyncio.create_task(resolver.run(emit))
    try:
        yield task
        assert not task.done(), f"resolver stopped by itself: {task}"
    finally:
        task.cancel()
        async with asyncio.timeout(5):
            with contextlib.suppress(asyncio.CancelledError):
                await task
