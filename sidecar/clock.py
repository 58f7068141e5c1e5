"""The one seam through which the sidecar reads time, so tests can drive it by hand."""

from __future__ import annotations

import time
from typing import Final, Protocol


class Clock(Protocol):
    """Monotonic seconds. Production code reads `loop.time()`-compatible time through this."""

    def now(self) -> float: ...


class MonotonicClock:
    """The real clock: `time.monotonic`, the same source asyncio's loop uses."""

    __slots__ = ()

    # The C function itself, not a method wrapping it: policies read the clock several times
    # per request, and a Python frame per read is most of what the read costs.
    now = staticmethod(time.monotonic)


class FakeClock:
    """A clock tests move by hand; nothing sleeps."""

    __slots__ = ("t",)

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


MONOTONIC: Final = MonotonicClock()
