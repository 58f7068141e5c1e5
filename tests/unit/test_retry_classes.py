"""The classes of a failed try (SPEC section 5, issue 19): unsent (nothing left the sidecar: any
method, budgeted), stale (the keep-alive race: free, replayable requests only), and everything
later (replayable requests only, budgeted, the endpoint's failure). Pure decisions and the
policy wiring, with a fake clock and stand-in exchanges."""

from __future__ import annotations

import pytest

from sidecar.errors import (
    BadUpstreamResponse,
    ConnectFailed,
    PoolTimeout,
    SidecarError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.policy.retry import (
    REPLAY,
    STALE,
    STALE_WINDOW,
    UNSENT,
    RetryPolicy,
    failed_try,
    is_keepalive_race,
)
from tests.unit.test_resilience_wiring import A, B, done, exchange, failures, policies, start_try


class Shortage(SidecarError):
    """Stands in for the sidecar's own shortage of sockets (`local_resources_exhausted`, which
    another change adds): not an upstream error, and it joins the unsent class by its flag."""

    code = "local_resources_exhausted"
    status = 503
    before_write = True


# --- which failures happen before the request is written ---------------------------------------
def test_connect_failures_are_before_write_and_the_rest_are_not() -> None:
    assert ConnectFailed("refused").before_write  # refused, timed out, TLS handshake
    for exc in (UpstreamReset("x"), UpstreamTimeout("x"), BadUpstreamResponse("x"),
                PoolTimeout("x"), SidecarError("x")):
        assert not exc.before_write, exc


# --- the keep-alive race ------------------------------------------------------------------------
def test_a_close_right_after_the_write_on_a_reused_connection_is_the_race() -> None:
    assert is_keepalive_race(True, False, 0.0)
    assert is_keepalive_race(True, False, STALE_WINDOW)
    assert not is_keepalive_race(True, False, STALE_WINDOW + 0.001)
    assert not is_keepalive_race(True, False, 0.3)  # the endpoint dropped a request it had
    assert not is_keepalive_race(False, False, 0.0)  # a new connection: no idle close to cross
    assert not is_keepalive_race(True, True, 0.0)  # a response had begun


def test_the_window_is_a_moment() -> None:
    """Tens of ms: above the race's detection latency measured on loopback under load (39 ms
    at most, bench/keepalive_race.py), far below a request that ran and was dropped."""
    assert 0.01 <= STALE_WINDOW <= 0.1


# --- which tries may go again --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("before_write", "wrote", "replayable", "stale", "kind"),
    [
        (True, False, False, False, UNSENT),  # keyless POST, connect refused: any method
        (True, False, True, False, UNSENT),
        (True, True, False, False, None),  # a TLS alert after the request went out
        (True, True, True, False, REPLAY),
        (False, True, True, True, STALE),
        (False, True, False, True, None),  # keyless POST crossing a keep-alive close
        (False, True, True, False, REPLAY),  # reset, timeout, 5xx
        (False, True, False, False, None),
        (False, False, False, False, None),  # e.g. pool_timeout: never retried as unsent
    ],
)
def test_failed_try(before_write: bool, wrote: bool, replayable: bool, stale: bool,
                    kind: str | None) -> None:
    assert failed_try(before_write=before_write, wrote=wrote, replayable=replayable,
                      stale=stale) == kind


def test_replayable_still_means_idempotent_or_keyed() -> None:
    p = RetryPolicy()
    assert not p.is_retryable_request(b"POST", False, 10)
    assert p.is_retryable_request(b"POST", True, 10)


def test_local_resources_exhausted_counts_as_a_connect_failure() -> None:
    p = RetryPolicy()
    assert p.classify("local_resources_exhausted") == "connect-failure"
    assert p.classify(Shortage("EMFILE")) == "connect-failure"
    assert RetryPolicy(on=["503"]).classify(Shortage("EMFILE")) is None


# --- the policy wiring: budget and verdicts -------------------------------------------------------
def test_an_unsent_keyless_post_is_retried_within_the_budget_and_judged() -> None:
    p, _ = policies(outlier_detection={"consecutive_failures": 5})
    ex = exchange(p, replayable=False)  # a keyless POST
    start_try(ex, A)
    assert p.retry_delay(ex, ConnectFailed("refused")) is not None
    assert {k: v for k, v in p.stats.retries.items() if v} == {"connect-failure": 1}
    assert failures(p, A) == 1  # a connect failure is the endpoint's


def test_an_unsent_try_is_refused_once_the_budget_is_spent() -> None:
    p, _ = policies(retry={"budget": {"ratio": 0, "min_per_second": 0}})
    ex = exchange(p, replayable=False)
    start_try(ex, A)
    assert p.retry_delay(ex, ConnectFailed("refused")) is None
    assert p.stats.retry_budget_exhausted == 1


def test_the_sidecars_own_shortage_is_retried_but_judges_no_endpoint() -> None:
    p, _ = policies(outlier_detection={"consecutive_failures": 1, "max_ejection_percent": 50})
    ex = exchange(p, replayable=False)
    start_try(ex, A)
    assert p.retry_delay(ex, Shortage("EMFILE")) is not None
    assert failures(p, A) == 0 and not p.endpoint_ejected(A)
    start_try(ex, B)
    ex.status = 200
    done(p, ex, None)
    assert failures(p, A) == 0  # the first try was judged (on nobody), not again at the end


def test_a_reset_is_budgeted_and_the_endpoints_failure() -> None:
    p, _ = policies(outlier_detection={"consecutive_failures": 1, "max_ejection_percent": 50})
    ex = exchange(p)
    start_try(ex, A)
    assert p.retry_delay(ex, UpstreamReset("lost")) is not None
    assert {k: v for k, v in p.stats.retries.items() if v} == {"reset": 1}
    assert p.endpoint_ejected(A)


def test_a_second_race_in_one_request_is_budgeted_but_not_the_endpoints_failure() -> None:
    p, _ = policies(outlier_detection={"consecutive_failures": 1, "max_ejection_percent": 50})
    ex = exchange(p)
    start_try(ex, A)
    assert p.retry_delay(ex, UpstreamReset("lost"), stale=True) is not None
    assert {k: v for k, v in p.stats.retries.items() if v} == {"stale": 1}
    assert not p.endpoint_ejected(A) and failures(p, A) == 0
