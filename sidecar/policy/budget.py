"""The per-cluster retry budget: retries may add at most `ratio` of traffic, plus a small floor.

Arithmetic (Finagle's RetryBudget / tower's TpsBudget, the one Linkerd uses), over a rolling
`window` of 10 s kept in 1 s buckets:

    a retry is allowed  <=>  retries_in_window + 1  <=  min_per_second * window
                                                        + ratio * requests_in_window

* Every original request deposits `ratio` of a retry; each retry withdraws one. The floor
  (`min_per_second * window`, 100 retries with the defaults) is *added*, not a `max()`: it lets
  a client that has just started, or that sends little traffic, retry at all. With the defaults
  (ratio 0.2, 10/s) and 1000 requests in the window: 100 + 200 = 300 retries.
* The floor is there from the first second (Finagle's "reserve"), not grown with uptime.
* `try_spend()` withdraws at decision time, before the backoff sleep, so retries waiting in
  backoff already count: a storm cannot queue up more retries than the budget while they all
  sleep (envoyproxy/envoy#10869).
* Only original requests deposit (`record_request()` once per app request, not per try), so
  retries never fund further retries.
* Exact arithmetic: balances are integers in thousandths of a retry, as in tower, so `ratio` is
  resolved to 0.001 and no float rounding decides a boundary.
* Granularity: events leave the window between 9 and 10 s after they happened (bucketed ring).
"""

from __future__ import annotations

from typing import Final

from sidecar.clock import Clock
from sidecar.config import BudgetConfig
from sidecar.policy.window import RollingCounts

_SCALE: Final = 1000  # milli-retries: one retry costs 1000


class RetryBudget:
    """Shared by every request of one cluster. O(1), no allocation, no timers."""

    __slots__ = ("_clock", "_deposit", "_reserve", "_counts", "ratio", "min_per_second", "window")

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        clock: Clock,
        *,
        window: float = 10.0,
        buckets: int = 10,
    ) -> None:
        if ratio < 0 or min_per_second < 0:
            raise ValueError("ratio and min_per_second must be >= 0")
        self._clock = clock
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._deposit = round(ratio * _SCALE)
        self._reserve = round(min_per_second * window * _SCALE)
        self._counts = RollingCounts(window, buckets)  # a = requests, b = retries

    @classmethod
    def from_config(cls, cfg: BudgetConfig, clock: Clock) -> RetryBudget:
        """From a cluster's `retry.budget` section (the window is not configurable)."""
        return cls(cfg.ratio, cfg.min_per_second, clock)

    def record_request(self) -> None:
        """An original request (not a retry) was sent: deposit `ratio` of a retry."""
        self._counts.add(self._clock.now(), 1, 0)

    def try_spend(self) -> bool:
        """Withdraw one retry if the budget allows it; False means: do not retry."""
        c = self._counts
        now = self._clock.now()
        c.roll(now)
        if (c.b + 1) * _SCALE > self._reserve + self._deposit * c.a:
            return False
        c.add(now, 0, 1)
        return True

    @property
    def available(self) -> int:
        """Whole retries the budget would allow right now."""
        c = self._counts
        c.roll(self._clock.now())
        return max(0, (self._reserve + self._deposit * c.a) // _SCALE - c.b)

    @property
    def requests_in_window(self) -> int:
        self._counts.roll(self._clock.now())
        return self._counts.a

    @property
    def retries_in_window(self) -> int:
        self._counts.roll(self._clock.now())
        return self._counts.b

    def __repr__(self) -> str:
        return (f"<RetryBudget requests={self.requests_in_window} "
                f"retries={self.retries_in_window} available={self.available}>")
