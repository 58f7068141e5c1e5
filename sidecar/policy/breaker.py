"""The per-cluster circuit breaker: closed -> open -> half-open, on a rolling failure rate.

Theory of operation:

* CLOSED: every request is admitted (up to `max_concurrent_requests` in flight). Each verdict
  goes into a rolling window (`window` seconds in 10 buckets). When the window holds at least
  `minimum_requests` verdicts and failures / total > `failure_rate_threshold` (strictly), the
  breaker opens. Exactly at the threshold it stays closed.
* OPEN: nothing is admitted (the caller answers 503 `circuit_open`) until `open_duration` has
  passed since it opened. There is no timer: the move to HALF_OPEN is made lazily by the next
  `admit()` or `state` read, so an idle cluster costs nothing.
* HALF_OPEN: at most `half_open_max_requests` probes are admitted in total. When that many
  probes have succeeded the breaker closes with an empty window; the first failure reopens it
  for another `open_duration`. A probe released without a verdict gives its slot back.

Verdicts of requests admitted before the breaker opened may arrive later: in OPEN they are
ignored (only their concurrency slot is released); in HALF_OPEN they count like probes, as in
resilience4j. Telling them apart would need a token per request, i.e. an allocation per request;
a late failure only reopens the breaker, which errs on the side of protecting the upstream.

`admit()` returns None when the request may go, else the reason as a constant string
("open" or "concurrency"); both become 503 `circuit_open` (SPEC section 5). Every admitted
request must end in exactly one `record()` or `release_without_record()`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

from sidecar.clock import Clock
from sidecar.config import CircuitBreakerConfig
from sidecar.policy.window import RollingCounts


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED: Final = BreakerState.CLOSED
OPEN: Final = BreakerState.OPEN
HALF_OPEN: Final = BreakerState.HALF_OPEN

# The only moves the breaker may make; `_transition` refuses anything else.
TRANSITIONS: Final[dict[BreakerState, frozenset[BreakerState]]] = {
    CLOSED: frozenset({OPEN}),
    OPEN: frozenset({HALF_OPEN}),
    HALF_OPEN: frozenset({CLOSED, OPEN}),
}

STATE_CODES: Final[dict[BreakerState, int]] = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}  # SPEC section 8

REJECT_OPEN: Final = "open"
REJECT_CONCURRENCY: Final = "concurrency"


class CircuitBreaker:
    """One cluster's breaker. Synchronous, O(1) per call, no allocation on the request path."""

    __slots__ = (
        "_clock",
        "_on_transition",
        "_threshold",
        "_minimum",
        "_open_duration",
        "_half_open_max",
        "_max_concurrent",
        "_window",
        "_state",
        "_opened_at",
        "_inflight",
        "_probes",
        "_probe_successes",
    )

    def __init__(
        self,
        *,
        clock: Clock,  # first: mypyc cannot describe a required keyword after defaults
        failure_rate_threshold: float = 0.5,
        minimum_requests: int = 20,
        window: float = 10.0,
        open_duration: float = 30.0,
        half_open_max_requests: int = 5,
        max_concurrent_requests: int = 1000,
        on_transition: Callable[[str], None] | None = None,
        buckets: int = 10,
    ) -> None:
        if not 0.0 <= failure_rate_threshold <= 1.0:
            raise ValueError("failure_rate_threshold must be within [0, 1]")
        if minimum_requests < 1 or half_open_max_requests < 1 or max_concurrent_requests < 1:
            raise ValueError("minimum_requests, half_open_max_requests and "
                             "max_concurrent_requests must be >= 1")
        if open_duration < 0:
            raise ValueError("open_duration must be >= 0")
        self._clock = clock
        self._on_transition = on_transition
        self._threshold = failure_rate_threshold
        self._minimum = minimum_requests
        self._open_duration = open_duration
        self._half_open_max = half_open_max_requests
        self._max_concurrent = max_concurrent_requests
        self._window = RollingCounts(window, buckets)  # a = total verdicts, b = failures
        self._state = CLOSED
        self._opened_at = 0.0
        self._inflight = 0
        self._probes = 0  # probes admitted in this HALF_OPEN period
        self._probe_successes = 0

    @classmethod
    def from_config(
        cls,
        cfg: CircuitBreakerConfig,
        clock: Clock,
        on_transition: Callable[[str], None] | None = None,
    ) -> CircuitBreaker:
        """From a cluster's `circuit_breaker` section."""
        return cls(
            failure_rate_threshold=cfg.failure_rate_threshold,
            minimum_requests=cfg.minimum_requests,
            window=cfg.window,
            open_duration=cfg.open_duration,
            half_open_max_requests=cfg.half_open_max_requests,
            max_concurrent_requests=cfg.max_concurrent_requests,
            clock=clock,
            on_transition=on_transition,
        )

    # --- the request path ---------------------------------------------------------------------
    def admit(self) -> str | None:
        """None: go ahead (a concurrency slot is now held). Else "open" or "concurrency"."""
        state = self._state
        if state is not CLOSED:
            if state is OPEN:
                if self._clock.now() - self._opened_at < self._open_duration:
                    return REJECT_OPEN
                self._transition(HALF_OPEN)
            if self._probes >= self._half_open_max:
                return REJECT_OPEN
            if self._inflight >= self._max_concurrent:
                return REJECT_CONCURRENCY
            self._probes += 1
            self._inflight += 1
            return None
        if self._inflight >= self._max_concurrent:
            return REJECT_CONCURRENCY
        self._inflight += 1
        return None

    def record(self, success: bool) -> None:
        """The verdict of an admitted request; releases its concurrency slot."""
        if self._inflight > 0:
            self._inflight -= 1
        state = self._state
        if state is CLOSED:
            w = self._window
            w.add(self._clock.now(), 1, 0 if success else 1)
            # Evaluated on successes too: a success can lift the total to `minimum_requests`
            # while the rate is already over the threshold.
            total = w.a
            if total >= self._minimum and w.b / total > self._threshold:
                self._transition(OPEN)
        elif state is HALF_OPEN:
            if not success:
                self._transition(OPEN)
                return
            self._probe_successes += 1
            if self._probe_successes >= self._half_open_max:
                self._transition(CLOSED)
        # OPEN: a late verdict of a request admitted before the breaker opened; ignored.

    def release_without_record(self) -> None:
        """An admitted request ended without a verdict (e.g. the app went away)."""
        if self._inflight > 0:
            self._inflight -= 1
        if self._state is HALF_OPEN and self._probes > self._probe_successes:
            self._probes -= 1  # let another probe take its place

    # --- reading ------------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """The current state, after applying a due OPEN -> HALF_OPEN move."""
        if self._state is OPEN and self._clock.now() - self._opened_at >= self._open_duration:
            self._transition(HALF_OPEN)
        return self._state

    @property
    def state_code(self) -> int:
        """0 closed, 1 open, 2 half-open (`sidecar_circuit_breaker_state`)."""
        return STATE_CODES[self.state]

    @property
    def inflight(self) -> int:
        return self._inflight

    # --- the state machine --------------------------------------------------------------------
    def _transition(self, to: BreakerState) -> None:
        if to not in TRANSITIONS[self._state]:
            raise RuntimeError(f"circuit breaker: illegal transition {self._state.value} -> "
                               f"{to.value}")
        self._state = to
        if to is OPEN:
            self._opened_at = self._clock.now()
        elif to is HALF_OPEN:
            self._probes = 0
            self._probe_successes = 0
        else:  # CLOSED: start from a clean window, old failures no longer describe the upstream
            self._window.clear()
        if self._on_transition is not None:
            self._on_transition(to.value)

    def __repr__(self) -> str:
        w = self._window
        w.roll(self._clock.now())
        return (f"<CircuitBreaker {self.state.value} inflight={self._inflight} "
                f"failed={w.b}/{w.a} probes={self._probes}>")
