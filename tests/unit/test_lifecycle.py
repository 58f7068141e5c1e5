"""The drain state machine (sidecar/lifecycle.py) on a real loop with stand-in counts and actions;
tests/integration/test_lifecycle.py runs it inside a real sidecar."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from sidecar.errors import Draining
from sidecar.lifecycle import Counts, Drain, DrainSettings, DrainState, linger_seconds

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
pytestmark = pytest.mark.parametrize("loop_name", sorted(LOOPS))


def run(loop_name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(asyncio.wait_for(main(), 10))


class World:
    """The numbers and actions the drain sees, recorded."""

    def __init__(self, **settings: Any) -> None:
        self.counts = Counts()
        self.calls: list[str] = []
        self.states: list[DrainState] = []
        self.lingers: list[int] = []
        self.busy_at_grace = 3
        self.drain = Drain(
            asyncio.get_running_loop(),
            DrainSettings(**settings),
            lambda: self.counts,
            self._close_idle_upstream,
            lambda: self.calls.append("close_idle_downstream") or 0,
            self._abort,
            self.states.append,
        )

    def _close_idle_upstream(self, linger: int) -> int:
        self.lingers.append(linger)
        return 2

    def _abort(self) -> int:
        self.calls.append("abort")
        return self.busy_at_grace


def test_drains_once_work_and_connections_are_gone(loop_name: str) -> None:
    async def main() -> None:
        w = World(grace=5.0, accept_period=0.1, linger=0.5)
        w.counts = Counts(inflight=1, connections=1)
        w.drain.start()
        w.drain.start(exit_when_drained=False)  # idempotent; cannot turn exit off
        assert w.drain.state is DrainState.DRAINING and w.drain.exit_when_drained
        assert w.lingers == [1]  # 500 ms rounds up: SO_LINGER 0 would mean RST
        assert w.drain.admit() is None  # accept period
        await asyncio.sleep(0.15)
        assert w.drain.admit() is None  # the app still holds a connection: served
        w.counts = Counts(inflight=0, connections=1)
        w.drain.check()
        assert w.drain.state is DrainState.DRAINING  # exit_on_zero_connections: wait for it
        w.counts = Counts()
        w.drain.check()
        assert w.drain.state is DrainState.DRAINED and w.drain.done.is_set()
        assert w.states == [DrainState.DRAINING, DrainState.DRAINED]
        assert w.drain.aborted == 0 and "abort" not in w.calls
        assert isinstance(w.drain.admit(), Draining)

    run(loop_name, main)


def test_after_accept_period_without_exit_on_zero_connections(loop_name: str) -> None:
    async def main() -> None:
        w = World(grace=5.0, accept_period=0.05, exit_on_zero_connections=False)
        w.counts = Counts(inflight=1, connections=3)
        w.drain.start()
        await asyncio.sleep(0.1)
        assert isinstance(w.drain.admit(), Draining)
        assert "close_idle_downstream" in w.calls
        w.counts = Counts(inflight=0, connections=3)
        w.drain.check()
        assert w.drain.state is DrainState.DRAINED

    run(loop_name, main)


def test_grace_aborts_and_counts(loop_name: str) -> None:
    async def main() -> None:
        w = World(grace=0.1, accept_period=0.05)
        w.counts = Counts(inflight=2, connections=2)
        w.drain.start()
        await asyncio.wait_for(w.drain.done.wait(), 2)
        assert w.drain.aborted == 3 and w.calls[0] == "abort"
        assert w.drain.status()["aborted"] == 3

    run(loop_name, main)


def test_exit_false_then_a_signal(loop_name: str) -> None:
    async def main() -> None:
        w = World(grace=5.0, accept_period=0.0)
        w.drain.start(exit_when_drained=False)
        assert w.drain.state is DrainState.DRAINED and not w.drain.exit_when_drained
        w.drain.done.clear()  # what App.run does while it stays up
        w.drain.start(exit_when_drained=True)  # SIGTERM, or a plain POST /drain
        assert w.drain.done.is_set() and w.drain.exit_when_drained
        w.drain.done.clear()
        w.drain.abort_now()  # a second signal: still exits, nothing left to abort
        assert w.drain.done.is_set() and w.drain.state is DrainState.DRAINED

    run(loop_name, main)


def test_second_signal_aborts_at_once(loop_name: str) -> None:
    async def main() -> None:
        w = World(grace=30.0, accept_period=5.0)
        w.counts = Counts(inflight=4, connections=4)
        w.drain.start()
        w.drain.abort_now()
        assert w.drain.state is DrainState.DRAINED and w.drain.aborted == 3

    run(loop_name, main)


def test_settings_update_only_before_a_drain(loop_name: str) -> None:
    async def main() -> None:
        w = World(grace=25.0)
        assert w.drain.update(DrainSettings(grace=40.0, accept_period=5.0))
        assert w.drain.status()["grace"] == 40.0
        w.counts = Counts(inflight=1)
        w.drain.start()
        assert not w.drain.update(DrainSettings(grace=1.0))
        assert w.drain.settings.grace == 40.0

    run(loop_name, main)


def test_linger_seconds(loop_name: str) -> None:
    assert [linger_seconds(x) for x in (0.0, 0.001, 0.5, 1.0, 1.2, 5.0)] == [0, 1, 1, 1, 2, 5]
