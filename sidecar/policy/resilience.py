"""The policies of one cluster wired together: breaker, outlier detection, retries, budget,
health. The exchange asks it synchronous questions; nothing here does I/O except the health
checker's own task.

What counts as a failure (SPEC section 5): connect failures, resets, timeouts, bad upstream
responses and 5xx answers. The breaker sees one verdict per request (its final outcome), the
outlier detector exactly one per try and endpoint: a try that is retried is judged when the
retry is decided, the last try when the request ends (`policy_token` is 1 + the number of tries
already judged, so no try is counted twice). Sidecar-local refusals (no route, pool full,
breaker open, and the sidecar's own shortage of descriptors or ports,
`local_resources_exhausted`) are verdicts on nobody.

Per-try timeout: it applies only to a try that another try could follow (attempts left, the
request replayable) and only until the response starts to reach the app. Abandoning the last
possible try would merely turn a late success into a 504; that try runs to the request
deadline instead. So with the defaults (3 attempts, per_try_timeout 2s, request 15s) a
hanging upstream costs 2s + 2s + the rest of the 15s, not 6s.

No panic mode. When every endpoint is unhealthy (active health checks) or otherwise out of
service, requests get 503 `no_healthy_endpoints` at once, without touching any upstream.
Reasons: (1) the health check is the operator's explicit statement of "can serve"; balancing
over endpoints that fail it would hide a real outage behind slow, failing requests, while a
fast, labelled 503 (counted in `sidecar_local_errors_total{code="no_healthy_endpoints"}`) lets
the app degrade on purpose and makes a wrong health-check path obvious at once; (2) the cases
panic mode exists for in Envoy are covered elsewhere: endpoints start healthy (no 503s after a
scale-up or at start), outlier detection never ejects the last endpoint still in service
(`in_service` below: healthy and not ejected), and a cluster failing as a whole is the
circuit breaker's job, which fails fast and probes for recovery.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import mypyc_attr, trait

from sidecar.clock import Clock
from sidecar.errors import CircuitOpen, SidecarError, UpstreamError
from sidecar.http.parser import RequestHead, ResponseHead
from sidecar.observe.stats import ClusterStats
from sidecar.policy.breaker import CircuitBreaker
from sidecar.policy.budget import RetryBudget
from sidecar.policy.health import HealthChecker
from sidecar.policy.outlier import OutlierDetector
from sidecar.policy.retry import RetryPolicy, parse_retry_after

# gRPC statuses that are the endpoint's failure (SPEC section 5): unknown, deadline_exceeded,
# internal, unavailable.
_GRPC_FAILURES: Final = frozenset({2, 4, 13, 14})


@trait
@mypyc_attr(allow_interpreted_subclasses=True)
class Attempt:
    """A request as the policies see it, between its tries (the exchange implements it). A
    mypyc trait, so that compiled policies read these at fixed offsets; code that is not
    compiled (tests' stand-ins) subclasses `AttemptBase`."""

    attempt: int  # the current try, from 1
    max_attempts: int
    replayable: bool
    keep_body: bool  # its body is still held (for a gRPC retry: `retry.grpc_on`)
    deadline: float  # the request's, loop time (inf: none)
    policy_token: int | None  # what `start` gave; see the module docstring

    def endpoint_key(self) -> str | None:
        """The current try's endpoint (`ip:port`), None before the first."""
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class AttemptBase(Attempt):
    attempt: int = 0
    max_attempts: int = 1
    replayable: bool = False
    keep_body: bool = False
    deadline: float = math.inf
    policy_token: int | None = None

    def endpoint_key(self) -> str | None:
        return None


class ClusterPolicies:
    def __init__(
        self,
        name: str,
        cfg: Any,
        stats: ClusterStats,
        clock: Clock,
        on_endpoints_changed: Callable[[], None],
        ssl_context: Any = None,
        server_hostname: str | None = None,
    ) -> None:
        self.name = name
        self.stats = stats
        self.clock = clock
        self._changed = on_endpoints_changed
        self.breaker = CircuitBreaker.from_config(
            cfg.circuit_breaker, clock, on_transition=self._on_transition
        )
        self.outlier = OutlierDetector.from_config(
            cfg.outlier_detection, clock, on_eject=self._on_eject, in_service=self.endpoint_healthy
        )
        self.budget = RetryBudget.from_config(cfg.retry.budget, clock)
        self.retry = RetryPolicy.from_config(cfg.retry)
        self.per_try_timeout = self.retry.per_try_timeout  # read per request
        self.max_body_bytes = int(cfg.retry.max_body_bytes)
        self.health: HealthChecker | None = None
        if cfg.health_check.type != "none":
            self.health = HealthChecker.from_config(
                name,
                cfg.health_check,
                on_change=lambda key, healthy: self._changed(),
                stats=stats.health_checks,
                ssl_context=ssl_context,
                server_hostname=server_hostname,
            )
        self._ejected_any = False

    # --- callbacks from the state machines --------------------------------------------------------
    def _on_transition(self, to: str) -> None:
        self.stats.breaker_transitions[to] = self.stats.breaker_transitions.get(to, 0) + 1

    def _on_eject(self, key: str) -> None:
        self.stats.outlier_ejections += 1
        self._ejected_any = True
        self._changed()

    def tick(self) -> None:
        """Called about once a second: ejections end lazily, so re-read who is usable."""
        if self._ejected_any:
            self._ejected_any = self.outlier.ejected_count > 0
            self._changed()

    # --- endpoints --------------------------------------------------------------------------------
    def set_endpoints(self, endpoints: list[tuple[str, str, int]]) -> None:
        """The whole endpoint set (after a Reset): each endpoint is (key, ip, port)."""
        self.outlier.set_endpoints(k for k, _, _ in endpoints)
        if self.health is not None:
            self.health.set_endpoints(endpoints)

    def endpoints_added(self, endpoints: list[tuple[str, str, int]]) -> None:
        """New endpoints, or new conditions for known ones (their state is kept)."""
        for key, ip, port in endpoints:
            self.outlier.add(key)
            if self.health is not None:
                self.health.add_target(key, ip, port)

    def endpoints_removed(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            self.outlier.forget(key)
            if self.health is not None:
                self.health.remove_target(key)

    def endpoint_healthy(self, key: str) -> bool:
        return self.health is None or self.health.is_healthy(key)

    def endpoint_ejected(self, key: str) -> bool:
        return self.outlier.is_ejected(key)

    def endpoint_usable(self, key: str) -> bool:
        return self.endpoint_healthy(key) and not self.outlier.is_ejected(key)

    def breaker_state_code(self) -> int:
        return self.breaker.state_code

    def breaker_state_name(self) -> str:
        return str(self.breaker.state.value)

    # --- per request ------------------------------------------------------------------------------
    def start(self, head: RequestHead) -> tuple[int, bool, int]:
        """A request begins: (its tries, whether it may be replayed, its policy token once
        admitted): the three calls below in one, for the hot path. Plain values in and out, so
        that compiled code looks up nothing by name. Raises CircuitOpen."""
        replayable = self.retry.is_retryable_request(
            head.method, head.idempotency_key, head.content_length
        )
        return self.max_attempts(head), replayable, self.admit()

    def max_attempts(self, head: RequestHead) -> int:
        n = head.retry_attempts
        if n is None:
            return self.retry.attempts
        return min(max(int(n), 1), 10)

    def admit(self) -> int:
        """Raises CircuitOpen when the breaker (or its concurrency cap) refuses."""
        refusal = self.breaker.admit()
        if refusal is not None:
            detail = (
                "circuit breaker is open"
                if refusal == "open"
                else "max_concurrent_requests reached"
            )
            raise CircuitOpen(detail, self.name)
        self.budget.record_request()
        return 1  # the policy token: 1 + tries judged by outlier detection so far

    def try_deadline(self, ex: Attempt) -> float:
        """The deadline of the try `ex.attempt` that starts now (see the module docstring)."""
        per_try = self.per_try_timeout
        if per_try is None or ex.attempt >= ex.max_attempts or not ex.replayable:
            return math.inf
        return float(self.clock.now() + per_try)

    def _judge_try(self, ex: Attempt, endpoint_failed: bool) -> None:
        """The try that just failed is being retried: its endpoint's verdict, once. A failure
        that was not the endpoint's (the sidecar's own shortage) is a verdict on nobody, but
        the try is still marked judged."""
        token = ex.policy_token
        endpoint = ex.endpoint_key()
        if endpoint is not None and token and token <= ex.attempt:
            if endpoint_failed:
                self.outlier.record(endpoint, False)
            ex.policy_token = ex.attempt + 1

    def _retry_delay(
        self, ex: Attempt, reason: str, retry_after: float | None, endpoint_failed: bool = True,
    ) -> float | None:
        if ex.attempt >= ex.max_attempts:
            return None
        remaining = ex.deadline - self.clock.now() if ex.deadline != math.inf else None
        delay = self.retry.next_delay(
            ex.attempt, retry_after, remaining, attempts=ex.max_attempts
        )
        if delay is None:
            return None
        if not self.budget.try_spend():
            self.stats.retry_budget_exhausted += 1
            return None
        self.stats.retried(reason)
        self._judge_try(ex, endpoint_failed)
        return delay

    def _grpc_retry_delay(self, ex: Attempt, code: int) -> float | None:
        """A gRPC Trailers-Only answer (no message reached the app): retried when
        `retry.grpc_on` names its status, within attempts and the budget, and only if the
        request body is still here to send again (SPEC section 11). Whatever the method: a
        gRPC call is a POST, and the status says the server would take it again."""
        if code not in self.retry.grpc_on or not ex.keep_body:
            return None
        return self._retry_delay(ex, "grpc", None, code in _GRPC_FAILURES)

    def retry_delay(self, ex: Attempt, exc: SidecarError, stale: bool = False) -> float | None:
        """After a failed try (no response byte sent to the app): the backoff, or None. When
        None, the request ends with `exc` and `on_done` judges the try. The exchange has
        already decided that the request may go again (policy/retry.py `failed_try`).
        `stale`: a keep-alive race (not the endpoint's failure) that could not go again for
        free."""
        upstream = isinstance(exc, UpstreamError)
        if not upstream and not exc.before_write:
            return None  # a local refusal (pool_timeout...): not the upstream's doing
        reason = self.retry.classify("stale" if stale else exc)
        if reason is None:
            return None
        return self._retry_delay(ex, reason, None, upstream and not stale)

    def status_retry_delay(self, ex: Attempt, head: ResponseHead) -> float | None:
        """A response head arrived: retry instead of relaying it? Only before anything
        reached the app, and only for statuses `on` names."""
        if head.grpc_status > 0:
            return self._grpc_retry_delay(ex, head.grpc_status)
        status = head.status
        if status < 500 and str(status) not in self.retry.on:
            return None
        if not ex.replayable:
            return None
        reason = self.retry.classify(status)
        if reason is None:
            return None
        retry_after = None
        for name, value in head.headers:
            if name.lower() == b"retry-after":
                retry_after = parse_retry_after(value)
                break
        return self._retry_delay(ex, reason, retry_after)

    def on_done(
        self,
        token: int,
        status: int,
        attempt: int,
        endpoint: str | None,
        error: SidecarError | None,
    ) -> None:
        """The request ended: `token` is what `start` gave (its holder clears it, so this
        runs once), `attempt` the last try's number, `endpoint` the key of its endpoint."""
        if not token:
            return
        if error is None:
            success = status < 500
        elif isinstance(error, UpstreamError):
            success = False
        else:
            self.breaker.release_without_record()
            return
        self.breaker.record(success)
        # The last try, unless it was already judged (the deadline passed during a backoff).
        if endpoint is not None and token <= attempt:
            self.outlier.record(endpoint, success)

    def on_abandon(self, ex: Attempt) -> None:
        if ex.policy_token:
            ex.policy_token = None
            self.breaker.release_without_record()
