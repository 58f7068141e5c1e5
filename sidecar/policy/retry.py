"""The per-cluster retry policy: what may be retried, on which failures, after how long.

Built once per cluster; every method is a synchronous decision, the exchange does the waiting.
tenacity is the policy engine but never runs the loop: its `stop_after_attempt` and
`wait_random_exponential` (full jitter) are evaluated on a `RetryCallState` that is built only
when a try has failed, so the success path costs nothing.

Decisions:

* Replayable requests (may be sent again after a try that reached the endpoint): idempotent
  methods of RFC 9110 section 9.2.2 (GET HEAD OPTIONS TRACE PUT DELETE; methods are
  case-sensitive), or any method carrying `Idempotency-Key`, when `idempotent_only`; and only
  when the body can be replayed: a declared length over `max_body_bytes` is refused up front,
  an unknown length (chunked) is admitted and the exchange must stop retrying once it has
  buffered more than `max_body_bytes`.
* Which tries may go again (`failed_try`, SPEC section 5), for a try that failed before any
  response byte reached the app:
  - `unsent`: the failure is of a kind that happens before the request is written (the error's
    `before_write`: connect refused or timed out, TLS handshake, `local_resources_exhausted`)
    and the try wrote nothing. The endpoint never saw it: any method, any body size (the
    exchange still holds all of the body: nothing was written, and the app's socket is not
    read while no connection is attached), through the budget.
  - `stale`: a reused connection closed or reset before any response byte within
    `STALE_WINDOW` of the request being written (`is_keepalive_race`): the endpoint closed an
    idle connection as our request crossed its FIN. Replayable requests go again once, on a
    fresh connection, free of the budget and of the endpoint's failure counts.
  - anything later (`reset`, timeouts, 5xx): replayable requests only, through the budget,
    and the try counts as the endpoint's failure.
* Reasons: failures map to the `reason` labels of SPEC section 8. Status codes match an exact
  code in `on` first ("503"), then "5xx", then "gateway-error" (502/503/504, as Envoy).
  The sidecar's own failures follow the status it would answer with: a try that timed out
  (per_try_timeout) is retried when `on` names "timeout" or "504" (so the default list,
  which has "504" and no "timeout", makes `per_try_timeout` useful), and "5xx" covers
  connect failures, resets and timeouts as in Envoy.
  "stale" (the keep-alive race above) is always retryable, whatever `on` says: the app must
  never see that race. `local_resources_exhausted` (the sidecar could not open a socket) is
  counted under "connect-failure": it is a failure to connect, though not the endpoint's.
* Backoff: try n (1-based) failed -> wait uniform(0, min(max, base * 2**(n-1))).
* Retry-After, when the response carries one, replaces the jittered backoff (the server said
  when). It is honoured up to the remaining deadline: if waiting it would leave less than
  `min_try_time` for the next try, there is no retry. Without a deadline, a Retry-After over
  `max_retry_after` means no retry rather than a request parked for minutes.
* Deadline too short: a retry needs `min_try_time` (50 ms by default) left after its backoff.
  A jittered backoff is shortened to fit rather than dropped (it is random anyway), so the
  decision is deterministic: retry iff remaining >= min_try_time.
* Per-request attempts (`x-sidecar-retry-attempts`) are clamped to [1, 10]; garbage is ignored.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable
from email.utils import parsedate_tz
from typing import Final

import tenacity

from sidecar.config import GRPC_STATUS_CODES, RetryConfig

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

MIN_ATTEMPTS = 1
MAX_ATTEMPTS = 10

STALE: Final = "stale"
UNSENT: Final = "unsent"
REPLAY: Final = "replay"

# How soon after a reused connection's request was written its close still counts as the
# keep-alive race rather than the endpoint failing mid-request. Measured on loopback under
# load (bench/keepalive_race.py, docs/retries.md): the close of a race is seen within a few ms
# of the write (one loop iteration, a few under load); a request the endpoint had started to
# work on and then dropped (a crash, a kill) is seen much later. 50 ms leaves room for event
# loop lag and an RTT across a cluster while staying far below the run time of any request
# whose failure matters.
STALE_WINDOW: Final = 0.05

# Failure codes (SPEC section 5 error codes and exception class names) -> retry reason. Reason
# names map to themselves so callers may pass either.
_FAILURE_REASONS: dict[str, str] = {
    "connect_failed": "connect-failure",
    "connect-failure": "connect-failure",
    "ConnectFailed": "connect-failure",
    "ConnectionRefusedError": "connect-failure",
    "upstream_reset": "reset",
    "reset": "reset",
    "UpstreamReset": "reset",
    "ConnectionResetError": "reset",
    "ConnectionAbortedError": "reset",
    "BrokenPipeError": "reset",
    "local_resources_exhausted": "connect-failure",
    "LocalResourcesExhausted": "connect-failure",
    "upstream_timeout": "timeout",
    "timeout": "timeout",
    "UpstreamTimeout": "timeout",
    "TimeoutError": "timeout",
}
_NAMED_TOKENS = frozenset({"connect-failure", "reset", "timeout", "5xx", "gateway-error"})
_GATEWAY_ERRORS = (502, 503, 504)


def is_keepalive_race(reused: bool, response_started: bool, since_written: float) -> bool:
    """A try ended by a close or reset: was it the keep-alive race (`stale`)? Only on a reused
    connection (one that waited idle in the pool before this request), before any response
    byte, and within `STALE_WINDOW` (loop time) of the request being written. Anything later
    is the endpoint failing mid-request: a `reset`."""
    return reused and not response_started and since_written <= STALE_WINDOW


def failed_try(
    *, before_write: bool, wrote: bool, replayable: bool, stale: bool,
    never_processed: bool = False,
) -> str | None:
    """How a try that failed before any response byte reached the app may go again: UNSENT
    (nothing of it left the sidecar, or the endpoint says it never processed it: an HTTP/2
    REFUSED_STREAM or GOAWAY; any method, budgeted), STALE (the keep-alive race: once, free,
    replayable requests only), REPLAY (replayable requests, budgeted), or None."""
    if never_processed or (before_write and not wrote):
        return UNSENT
    if not replayable:
        return None
    return STALE if stale else REPLAY


def parse_retry_after(value: bytes | str, wall_now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or HTTP-date), or None.

    A date in the past gives 0. `wall_now` is the wall-clock (epoch) time an HTTP-date is
    measured against; it defaults to the real one (dates are wall time, not monotonic time).
    """
    raw = value.decode("latin-1") if isinstance(value, bytes) else value
    raw = raw.strip(" \t")
    if not raw:
        return None
    if raw.isascii() and raw.isdigit():
        return float(int(raw))
    parsed = parsedate_tz(raw)  # IMF-fixdate, RFC 850 and asctime forms
    if parsed is None:
        return None
    try:
        # HTTP-dates are always GMT; asctime carries no zone at all.
        when = calendar.timegm(parsed[:9]) - (parsed[9] or 0)
    except (ValueError, OverflowError):
        return None
    if wall_now is None:
        wall_now = time.time()
    return max(0.0, float(when) - wall_now)


class RetryPolicy:
    """Built once per cluster from its `retry` config; shared by all its requests."""

    __slots__ = (
        "attempts",
        "on",
        "idempotent_only",
        "per_try_timeout",
        "backoff_base",
        "backoff_max",
        "max_body_bytes",
        "grpc_on",
        "min_try_time",
        "max_retry_after",
        "_by_status",
        "_by_code",
        "_wait",
        "_stops",
        "_retrying",
    )

    def __init__(
        self,
        *,
        attempts: int = 3,
        on: Iterable[str] = ("connect-failure", "reset", "502", "503", "504"),
        idempotent_only: bool = True,
        per_try_timeout: float | None = 2.0,
        backoff_base: float = 0.025,
        backoff_max: float = 1.0,
        max_body_bytes: int = 64 * 1024,
        grpc_on: Iterable[int] = (14,),
        min_try_time: float = 0.05,
        max_retry_after: float = 60.0,
    ) -> None:
        if not MIN_ATTEMPTS <= attempts <= MAX_ATTEMPTS:
            raise ValueError(f"attempts must be within [{MIN_ATTEMPTS}, {MAX_ATTEMPTS}]")
        if backoff_base <= 0 or backoff_max < backoff_base:
            raise ValueError("need 0 < backoff base <= backoff max")
        tokens = tuple(str(t) for t in on)
        for token in tokens:
            if token not in _NAMED_TOKENS and not (
                len(token) == 3 and token.isdigit() and 100 <= int(token) <= 599
            ):
                raise ValueError(f"unknown retry condition {token!r}")
        self.attempts = attempts
        self.on = frozenset(tokens)
        self.idempotent_only = idempotent_only
        self.per_try_timeout = per_try_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_body_bytes = max_body_bytes
        # gRPC status codes retried from a Trailers-Only answer (SPEC section 11; 14: unavailable).
        self.grpc_on = frozenset(grpc_on)
        self.min_try_time = min_try_time
        self.max_retry_after = max_retry_after

        # Every decision below is a table lookup, built here once.
        by_status: dict[int, str] = {}
        for status in range(100, 600):
            if str(status) in self.on:
                by_status[status] = str(status)
            elif status >= 500 and "5xx" in self.on:
                by_status[status] = "5xx"
            elif status in _GATEWAY_ERRORS and "gateway-error" in self.on:
                by_status[status] = str(status)
        self._by_status = by_status
        # The sidecar's own failures: a timeout is what it would answer 504 for, so "504" (and
        # "gateway-error") covers it; "5xx" covers every failure it would answer with a 5xx.
        enabled = set(self.on)
        if enabled & {"504", "gateway-error"}:
            enabled.add("timeout")
        if "5xx" in enabled:
            enabled.update(("connect-failure", "reset", "timeout"))
        self._by_code = {k: v for k, v in _FAILURE_REASONS.items() if v in enabled}
        self._by_code["stale"] = STALE

        self._wait = tenacity.wait_random_exponential(multiplier=backoff_base, max=backoff_max)
        # One stop object per possible attempts value, so a per-request override allocates none.
        self._stops = [tenacity.stop_after_attempt(n) for n in range(MAX_ATTEMPTS + 1)]
        # RetryCallState wants its owner; it is never asked to run anything.
        self._retrying = tenacity.Retrying(stop=self._stops[attempts], wait=self._wait)

    @classmethod
    def from_config(cls, cfg: RetryConfig) -> RetryPolicy:
        """From a cluster's `retry` section."""
        return cls(
            attempts=cfg.attempts,
            on=cfg.on,
            idempotent_only=cfg.idempotent_only,
            per_try_timeout=cfg.per_try_timeout,
            backoff_base=cfg.backoff.base,
            backoff_max=cfg.backoff.max,
            max_body_bytes=cfg.max_body_bytes,
            grpc_on=[GRPC_STATUS_CODES[name] for name in cfg.grpc_on],
        )

    # --- before the first try -----------------------------------------------------------------
    def is_retryable_request(
        self, method: bytes, has_idempotency_key: bool, body_len: int | None
    ) -> bool:
        """May this request be sent again once a try of it reached the endpoint (replayed)?
        `body_len` None: unknown yet (chunked). A try that wrote nothing may go again whatever
        this says (`failed_try`)."""
        if self.idempotent_only and not has_idempotency_key and method not in IDEMPOTENT_METHODS:
            return False
        return body_len is None or body_len <= self.max_body_bytes

    # --- after a failed try -------------------------------------------------------------------
    def classify(self, outcome: int | str | BaseException) -> str | None:
        """The retry reason of a failure if `on` covers it, else None.

        `outcome`: an upstream status code, an error code ("connect_failed", "upstream_reset",
        "upstream_timeout", "stale") or exception class name, or the exception itself.
        """
        if isinstance(outcome, int):
            return self._by_status.get(outcome)
        if isinstance(outcome, str):
            return self._by_code.get(outcome)
        code = getattr(outcome, "code", None)  # sidecar.errors carry their SPEC code
        if isinstance(code, str) and code in self._by_code:
            return self._by_code[code]
        for cls in type(outcome).__mro__:
            reason = self._by_code.get(cls.__name__)
            if reason is not None:
                return reason
        return None

    def next_delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        remaining_deadline: float | None = None,
        attempts: int | None = None,
    ) -> float | None:
        """Seconds to wait before the next try, or None: do not retry.

        `attempt` is the number of the try that just failed (1 for the first); `attempts` the
        per-request total (`x-sidecar-retry-attempts`; default: the configured one).
        """
        state = tenacity.RetryCallState(self._retrying, None, (), {})
        state.attempt_number = attempt
        total = self.attempts if attempts is None else min(max(attempts, 1), MAX_ATTEMPTS)
        stop = self._stops[total]
        if stop(state):
            return None
        min_try = self.min_try_time
        if retry_after is not None:
            if remaining_deadline is None:
                return retry_after if retry_after <= self.max_retry_after else None
            return retry_after if retry_after + min_try <= remaining_deadline else None
        delay = self._wait(state)
        if remaining_deadline is None:
            return delay
        room = remaining_deadline - min_try
        if room < 0:
            return None
        return delay if delay <= room else room

    def __repr__(self) -> str:
        return (f"<RetryPolicy attempts={self.attempts} on={sorted(self.on)} "
                f"backoff={self.backoff_base:g}..{self.backoff_max:g}s>")
