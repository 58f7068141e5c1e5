"""ClusterPolicies, the wiring of breaker, outlier detection, retries and budget, driven the way
the exchange drives it, with a fake clock and stand-in exchanges: one outlier verdict per try,
per-try deadlines only where another try can follow, the last endpoint in service kept."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

from sidecar.clock import FakeClock
from sidecar.config import ClusterConfig
from sidecar.errors import ConnectFailed, PoolTimeout, UpstreamTimeout
from sidecar.http.parser import ResponseHead
from sidecar.observe.stats import ClusterStats
from sidecar.policy.outlier import OutlierDetector
from sidecar.policy.resilience import AttemptBase, ClusterPolicies
from sidecar.policy.retry import RetryPolicy

A, B, C = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"


def policies(**cluster: Any) -> tuple[ClusterPolicies, FakeClock]:
    cfg = ClusterConfig.model_validate(
        {"name": "c", "discovery": {"type": "static", "endpoints": [A, B, C]}, **cluster}
    )
    clock = FakeClock()
    p = ClusterPolicies("c", cfg, ClusterStats("c"), clock, lambda: None)
    p.set_endpoints([(k, k.split(":")[0], 80) for k in (A, B, C)])
    return p, clock


class StandIn(AttemptBase):
    """An exchange as the policies see it."""

    def __init__(self, max_attempts: int, replayable: bool) -> None:
        self.max_attempts = max_attempts
        self.replayable = replayable
        self.pool: Any = None
        self.status = 0

    def endpoint_key(self) -> str | None:
        return self.pool.key if self.pool is not None else None


def exchange(p: ClusterPolicies, max_attempts: int = 3, replayable: bool = True) -> Any:
    ex = StandIn(max_attempts, replayable)
    ex.policy_token = p.admit()
    return ex


def done(p: ClusterPolicies, ex: Any, error: Any) -> None:
    """What the exchange does when a request ends."""
    token, ex.policy_token = ex.policy_token, None
    p.on_done(token, ex.status, ex.attempt, ex.pool.key if ex.pool else None, error)


def start_try(ex: Any, key: str) -> None:
    ex.attempt += 1
    ex.pool = SimpleNamespace(key=key)


def head(status: int, *headers: tuple[bytes, bytes]) -> ResponseHead:
    h = ResponseHead()
    h.status = status
    h.headers = h.forward = list(headers)
    return h


def failures(p: ClusterPolicies, key: str) -> int:
    return p.outlier._hosts[key].failures


def test_a_relayed_5xx_is_one_verdict_when_the_budget_refuses_the_retry() -> None:
    p, _ = policies(retry={"budget": {"ratio": 0, "min_per_second": 0}},
                    outlier_detection={"consecutive_failures": 2})
    ex = exchange(p)
    start_try(ex, A)
    assert p.status_retry_delay(ex, head(503)) is None  # no budget
    ex.status = 503
    done(p, ex, None)
    assert failures(p, A) == 1
    assert not p.endpoint_ejected(A)
    assert p.stats.retry_budget_exhausted == 1


def test_an_unretried_connect_failure_is_one_verdict() -> None:
    p, _ = policies(outlier_detection={"consecutive_failures": 2})
    ex = exchange(p, max_attempts=1)
    start_try(ex, A)
    exc = ConnectFailed("refused")
    assert p.retry_delay(ex, exc) is None
    done(p, ex, exc)
    assert failures(p, A) == 1


def test_each_try_is_judged_once_across_retries() -> None:
    p, _ = policies(outlier_detection={"consecutive_failures": 5})
    ex = exchange(p)
    start_try(ex, A)
    assert p.status_retry_delay(ex, head(503)) is not None
    start_try(ex, B)
    assert p.retry_delay(ex, ConnectFailed("refused")) is not None
    start_try(ex, C)
    ex.status = 200
    done(p, ex, None)
    assert (failures(p, A), failures(p, B), failures(p, C)) == (1, 1, 0)
    assert p.stats.retries["503"] == 1 and p.stats.retries["connect-failure"] == 1
    assert p.breaker.inflight == 0


def test_deadline_during_backoff_does_not_judge_the_last_try_again() -> None:
    p, _ = policies(outlier_detection={"consecutive_failures": 5})
    ex = exchange(p)
    start_try(ex, A)
    assert p.status_retry_delay(ex, head(503)) is not None  # judged; now in backoff
    done(p, ex, UpstreamTimeout("request timeout"))  # the deadline passed while waiting
    assert failures(p, A) == 1


def test_local_refusals_judge_nobody() -> None:
    p, _ = policies()
    ex = exchange(p)
    start_try(ex, A)
    assert p.retry_delay(ex, PoolTimeout("full")) is None
    done(p, ex, PoolTimeout("full"))
    assert failures(p, A) == 0
    assert p.breaker.inflight == 0


def test_per_try_deadline_only_when_another_try_can_follow() -> None:
    p, clock = policies(retry={"per_try_timeout": "300ms", "attempts": 2})
    ex = exchange(p, max_attempts=2)
    start_try(ex, A)
    assert p.try_deadline(ex) == clock.now() + 0.3
    start_try(ex, B)
    assert p.try_deadline(ex) == math.inf  # the last try runs to the request deadline
    post = exchange(p, max_attempts=2, replayable=False)
    start_try(post, A)
    assert p.try_deadline(post) == math.inf


def test_504_in_on_covers_the_sidecars_own_timeouts() -> None:
    assert RetryPolicy(on=["504"]).classify(UpstreamTimeout()) == "timeout"
    assert RetryPolicy(on=["503"]).classify(UpstreamTimeout()) is None
    five = RetryPolicy(on=["5xx"])
    assert [five.classify(e) for e in (ConnectFailed(), UpstreamTimeout())] == [
        "connect-failure", "timeout"]


def test_the_last_endpoint_in_service_is_not_ejected() -> None:
    clock = FakeClock()
    healthy = {A: False, B: False, C: True}
    d = OutlierDetector(consecutive_failures=1, max_ejection_percent=100, clock=clock,
                        in_service=lambda k: healthy[k])
    d.set_endpoints([A, B, C])
    d.record(C, False)
    assert not d.is_ejected(C)  # A and B fail their health checks: C is all there is
    healthy[B] = True
    d.record(C, False)
    assert d.is_ejected(C)
    d.record(B, False)
    assert not d.is_ejected(B)  # C is ejected, A unhealthy: B stays
