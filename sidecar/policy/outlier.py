"""Passive outlier detection: eject an endpoint after consecutive failures, for a growing time.

Theory of operation (after Envoy's consecutive-5xx detector):

* Each endpoint key ("ip:port") has a consecutive-failure counter; a success resets it. When it
  reaches `consecutive_failures`, the endpoint is ejected for
  `min(base_ejection_time * times_ejected, max_ejection_time)`.
* `times_ejected` decays like Envoy's per-interval decrement, computed lazily instead of on a
  timer: every full `base_ejection_time` an endpoint spends back in service takes one off.
* Ejections end lazily: `is_ejected()` (and the next ejection decision) notice that the time has
  passed. No timers, no tasks.
* Verdicts that arrive while an endpoint is ejected (requests that were in flight) are ignored:
  they say nothing new, and counting them would re-eject it the moment it returns.

The ejection cap: at most `floor(known * max_ejection_percent / 100)` endpoints are ejected at
once, but at least one when the percentage is > 0 (as Envoy does, so small clusters still
benefit), and never all of them: at least one known endpoint always stays in service, whatever
the percentage. Outlier detection is a relative judgement ("worse than its peers"); with no peer
left it would turn a partial signal into a full outage of 503 `no_healthy_endpoints`, so a
cluster failing as a whole is left to the circuit breaker. Consequence: the only endpoint of a
one-endpoint cluster is never ejected. "In service" also takes the optional `in_service`
predicate into account (the active health checks): an endpoint is not ejected when no other
endpoint would be left that is both in service and not ejected. An endpoint refused by the cap
keeps its count and is ejected by its next failure if room has freed up by then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sidecar.clock import Clock
from sidecar.config import OutlierConfig


class _Host:
    __slots__ = ("failures", "ejected_until", "times_ejected", "returned_at")

    def __init__(self) -> None:
        self.failures = 0
        self.ejected_until: float | None = None  # set while ejected
        self.times_ejected = 0
        self.returned_at: float | None = None  # when the last ejection ended


class OutlierDetector:
    """Per-cluster consecutive-failure ejection. Synchronous; O(1) per verdict and per check."""

    __slots__ = (
        "_consecutive",
        "_base",
        "_max_time",
        "_percent",
        "_clock",
        "_on_eject",
        "_in_service",
        "_hosts",
        "_ejected",
    )

    def __init__(
        self,
        *,
        clock: Clock,  # first: mypyc cannot describe a required keyword after defaults
        consecutive_failures: int = 5,
        base_ejection_time: float = 30.0,
        max_ejection_time: float = 300.0,
        max_ejection_percent: float = 10.0,
        on_eject: Callable[[str], None] | None = None,
        in_service: Callable[[str], bool] | None = None,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if base_ejection_time <= 0 or max_ejection_time < base_ejection_time:
            raise ValueError("need 0 < base_ejection_time <= max_ejection_time")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be within [0, 100]")
        self._consecutive = consecutive_failures
        self._base = base_ejection_time
        self._max_time = max_ejection_time
        self._percent = max_ejection_percent
        self._clock = clock
        self._on_eject = on_eject
        self._in_service = in_service
        self._hosts: dict[str, _Host] = {}
        self._ejected: set[str] = set()  # keys ejected, possibly with their time already up

    @classmethod
    def from_config(
        cls,
        cfg: OutlierConfig,
        clock: Clock,
        on_eject: Callable[[str], None] | None = None,
        in_service: Callable[[str], bool] | None = None,
    ) -> OutlierDetector:
        """From a cluster's `outlier_detection` section."""
        return cls(
            consecutive_failures=cfg.consecutive_failures,
            base_ejection_time=cfg.base_ejection_time,
            max_ejection_time=cfg.max_ejection_time,
            max_ejection_percent=float(cfg.max_ejection_percent),
            clock=clock,
            on_eject=on_eject,
            in_service=in_service,
        )

    # --- endpoints ------------------------------------------------------------------------
    def set_endpoints(self, keys: Iterable[str]) -> None:
        """The current endpoint set: new keys start clean, missing keys are forgotten."""
        wanted = set(keys)
        hosts = self._hosts
        for key in [k for k in hosts if k not in wanted]:
            self.forget(key)
        for key in wanted:
            if key not in hosts:
                hosts[key] = _Host()

    def add(self, key: str) -> None:
        """One endpoint joined (a known one keeps its state)."""
        if key not in self._hosts:
            self._hosts[key] = _Host()

    def forget(self, key: str) -> None:
        self._hosts.pop(key, None)
        self._ejected.discard(key)

    # --- the request path -----------------------------------------------------------------
    def record(self, key: str, success: bool) -> None:
        host = self._hosts.get(key)
        if host is None:
            # A verdict for an endpoint we were not told about (e.g. a race with discovery):
            # start tracking it; `set_endpoints` will drop it again if it is gone.
            host = self._hosts[key] = _Host()
        until = host.ejected_until
        if until is not None:
            if self._clock.now() < until:
                return  # in flight before the ejection: says nothing new
            self._return(key, host, until)
        if success:
            host.failures = 0
            return
        host.failures += 1
        if host.failures >= self._consecutive:
            self._try_eject(key, host)

    def is_ejected(self, key: str) -> bool:
        if not self._ejected:
            return False  # the common case: one truthiness test
        host = self._hosts.get(key)
        if host is None:
            return False
        until = host.ejected_until
        if until is None:
            return False
        if self._clock.now() < until:
            return True
        self._return(key, host, until)
        return False

    @property
    def ejected_count(self) -> int:
        """Endpoints ejected right now."""
        self._expire(self._clock.now())
        return len(self._ejected)

    # --- decisions --------------------------------------------------------------------------
    def _max_ejected(self) -> int:
        known = len(self._hosts)
        if self._percent <= 0 or known < 2:
            return 0
        cap = int(known * self._percent // 100)
        return min(max(cap, 1), known - 1)

    def _try_eject(self, key: str, host: _Host) -> None:
        now = self._clock.now()
        self._expire(now)
        if len(self._ejected) >= self._max_ejected():
            return
        in_service = self._in_service
        if in_service is not None and not any(
            k != key and k not in self._ejected and in_service(k) for k in self._hosts
        ):
            return  # it is the last endpoint in service: keep it (O(n), ejections only)
        if host.times_ejected and host.returned_at is not None:
            # Lazy form of Envoy's per-interval decay of the ejection multiplier.
            decay = int((now - host.returned_at) // self._base)
            host.times_ejected = max(0, host.times_ejected - decay)
        host.times_ejected += 1
        host.ejected_until = now + min(self._base * host.times_ejected, self._max_time)
        host.failures = 0
        self._ejected.add(key)
        if self._on_eject is not None:
            self._on_eject(key)

    def _expire(self, now: float) -> None:
        # Rare (only when an ejection is considered or the count is read) and over the ejected
        # set only, which the cap keeps small.
        hosts = self._hosts
        for key in list(self._ejected):
            host = hosts[key]
            until = host.ejected_until
            if until is None or now >= until:
                self._return(key, host, now if until is None else until)

    def _return(self, key: str, host: _Host, at: float) -> None:
        host.ejected_until = None
        host.returned_at = at
        host.failures = 0
        self._ejected.discard(key)

    def __repr__(self) -> str:
        return (f"<OutlierDetector endpoints={len(self._hosts)} "
                f"ejected={self.ejected_count}>")
