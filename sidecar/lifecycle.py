"""The drain: serving -> draining -> drained, with one deadline (SPEC section 6).

Written as a sequence, like uvicorn's `Server.shutdown`: readiness off; idle upstream
connections closed gracefully (SO_LINGER `linger`); the app keeps being served during
`accept_period` and, with `exit_on_zero_connections`, for as long as it holds connections to
us, because an app shutting down still needs its outbound calls (Linkerd refusing them is the
bug we exist to avoid); we never add `Connection: close` to anything of the app's. Drained
when nothing is in flight and (with exit_on_zero_connections) the app has no connection left.
At `grace`, whatever is still busy is aborted with SO_LINGER 0 (RST, no TIME_WAIT), counted
and logged.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.errors import Draining, SidecarError

log = logging.getLogger("sidecar.drain")


class DrainState(enum.IntEnum):
    SERVING = 0
    DRAINING = 1
    DRAINED = 2


_TRANSITIONS = {
    DrainState.SERVING: {DrainState.DRAINING},
    DrainState.DRAINING: {DrainState.DRAINED},
    DrainState.DRAINED: set(),
}


def linger_seconds(linger: float) -> int:
    """SO_LINGER takes whole seconds, and 0 means abort (RST): a graceful `linger` below a
    second rounds up to 1 s, never down to 0; only `linger: 0` asks for RST."""
    return 0 if linger <= 0 else max(1, math.ceil(linger))


@dataclass
class DrainSettings:
    grace: float = 25.0
    accept_period: float = 5.0
    linger: float = 5.0
    exit_on_zero_connections: bool = True


@dataclass
class Counts:
    inflight: int = 0
    connections: int = 0  # the app's connections to us (tunnels included)
    upstream_active: int = 0


class Drain:
    """The state machine. `counts()` reads the live numbers; `actions` do the I/O."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: DrainSettings,
        counts: Callable[[], Counts],
        close_idle_upstream: Callable[[int], int],
        close_idle_downstream: Callable[[], int],
        abort_everything: Callable[[], int],
        on_state: Callable[[DrainState], None],
    ) -> None:
        self._loop = loop
        self.settings = settings
        self._counts = counts
        self._close_idle_upstream = close_idle_upstream
        self._close_idle_downstream = close_idle_downstream
        self._abort_everything = abort_everything
        self._on_state = on_state
        self.state = DrainState.SERVING
        self.accept_ended = False
        self.started_at: float | None = None
        self.exit_when_drained = True
        self.aborted = 0
        self.done = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []

    def _transition(self, new: DrainState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"drain: {self.state.name} -> {new.name}")
        self.state = new
        self._on_state(new)

    # --- admission (the data path asks this for every new request) --------------------------------
    def admit(self) -> SidecarError | None:
        if self.state is DrainState.SERVING:
            return None
        if self.state is DrainState.DRAINED:
            return Draining("the sidecar has drained")
        if not self._accept_over():
            return None
        if self.settings.exit_on_zero_connections:
            return None  # the app still holds a connection (we are asked on it): serve
        return Draining("the sidecar is draining; accept_period is over")

    def update(self, settings: DrainSettings) -> bool:
        """New settings (a reload, `grace: auto` resolved); only before a drain starts."""
        if self.state is not DrainState.SERVING:
            return False
        self.settings = settings
        return True

    # --- the sequence --------------------------------------------------------------------------
    def start(self, exit_when_drained: bool = True) -> None:
        """Idempotent. A later call may only turn exit on, not off."""
        if self.state is not DrainState.SERVING:
            self.exit_when_drained = self.exit_when_drained or exit_when_drained
            if self.state is DrainState.DRAINED and self.exit_when_drained:
                self.done.set()  # drained earlier with exit=false: now the process may go
            return
        self.exit_when_drained = exit_when_drained
        self.started_at = self._loop.time()
        self._transition(DrainState.DRAINING)
        closed = self._close_idle_upstream(linger_seconds(self.settings.linger))
        log.info(
            "drain started",
            extra={"fields": {"grace_s": self.settings.grace,
                              "accept_period_s": self.settings.accept_period,
                              "idle_upstream_closed": closed, **self._counts().__dict__}},
        )
        self._timers.append(
            self._loop.call_later(self.settings.accept_period, self._after_accept_period)
        )
        self._timers.append(self._loop.call_later(self.settings.grace, self._at_grace))
        self.check()

    def _accept_over(self) -> bool:
        """The accept period has ended: its timer fired, or the clock says so. The timer is
        the authority: loop timers have millisecond resolution and may fire a hair before
        `started_at + accept_period` by `loop.time()`, and a check refused then would not run
        again until grace (seen: a 5 s exit instead of 0.2 s)."""
        if self.accept_ended:
            return True
        assert self.started_at is not None
        return self._loop.time() - self.started_at >= self.settings.accept_period

    def _after_accept_period(self) -> None:
        self.accept_ended = True
        if self.state is not DrainState.DRAINING:
            return
        if not self.settings.exit_on_zero_connections:
            # New requests are refused from now on; idle app connections can go.
            self._close_idle_downstream()
        self.check()

    def check(self) -> None:
        """Called whenever in-flight work or connections change."""
        if self.state is not DrainState.DRAINING:
            return
        if not self._accept_over():
            return
        c = self._counts()
        if c.inflight > 0:
            return
        if self.settings.exit_on_zero_connections and c.connections > 0:
            return
        self._finish()

    def _at_grace(self) -> None:
        if self.state is not DrainState.DRAINING:
            return
        c = self._counts()
        self.aborted = self._abort_everything()
        log.warning(
            "drain grace passed: aborting what is left",
            extra={"fields": {"aborted": self.aborted, **c.__dict__}},
        )
        self._finish()

    def _finish(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._close_idle_downstream()
        self._transition(DrainState.DRAINED)
        elapsed = self._loop.time() - (self.started_at or self._loop.time())
        log.info("drained", extra={"fields": {"elapsed_s": round(elapsed, 3),
                                               "aborted": self.aborted}})
        self.done.set()

    def abort_now(self) -> None:
        """A second signal: everything goes, now."""
        if self.state is DrainState.SERVING:
            self.started_at = self._loop.time()
            self._transition(DrainState.DRAINING)
        self.exit_when_drained = True
        if self.state is DrainState.DRAINING:
            self.aborted += self._abort_everything()
            self._finish()
        else:
            self.done.set()  # already drained (exit=false): exit now

    def status(self) -> dict[str, object]:
        c = self._counts()
        elapsed = 0.0 if self.started_at is None else self._loop.time() - self.started_at
        return {
            "state": self.state.name.lower(),
            "inflight": c.inflight,
            "connections": c.connections,
            "upstream_active": c.upstream_active,
            "elapsed": round(elapsed, 3),
            "aborted": self.aborted,
            "grace": self.settings.grace,
            "accept_period": self.settings.accept_period,
        }
