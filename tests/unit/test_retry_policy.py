"""Retry policy: request eligibility, failure classification, jittered backoff, Retry-After,
deadlines and per-request attempts."""

from __future__ import annotations

import calendar
import random

import pytest
import tenacity

from sidecar.config import BackoffConfig, RetryConfig
from sidecar.errors import BadUpstreamResponse, ConnectFailed, UpstreamReset, UpstreamTimeout
from sidecar.policy.retry import RetryPolicy, parse_retry_after


def policy(**kw: object) -> RetryPolicy:
    params: dict[str, object] = dict(
        attempts=3,
        on=["connect-failure", "reset", "timeout", "502", "503", "504"],
        backoff_base=0.025,
        backoff_max=1.0,
        max_body_bytes=1024,
        min_try_time=0.05,
    )
    params.update(kw)
    return RetryPolicy(**params)  # type: ignore[arg-type]


# --- which requests ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
def test_idempotent_methods_are_retryable(method: bytes) -> None:
    assert policy().is_retryable_request(method, False, 0)


@pytest.mark.parametrize("method", [b"POST", b"PATCH", b"CONNECT", b"get", b"FOO"])
def test_other_methods_need_an_idempotency_key(method: bytes) -> None:
    p = policy()
    assert not p.is_retryable_request(method, False, 0)
    assert p.is_retryable_request(method, True, 0)


def test_idempotent_only_false_retries_any_method() -> None:
    assert policy(idempotent_only=False).is_retryable_request(b"POST", False, 10)


def test_body_size_boundary_and_unknown_length() -> None:
    p = policy()
    assert p.is_retryable_request(b"PUT", False, 1024)
    assert not p.is_retryable_request(b"PUT", False, 1025)
    assert p.is_retryable_request(b"PUT", False, None)  # chunked: decided while buffering


# --- which failures ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        ("connect_failed", "connect-failure"),
        ("upstream_reset", "reset"),
        ("upstream_timeout", "timeout"),
        ("ConnectionRefusedError", "connect-failure"),
        ("stale", "stale"),
        (ConnectFailed("tls"), "connect-failure"),
        (UpstreamReset(), "reset"),
        (UpstreamTimeout(), "timeout"),
        (ConnectionResetError(), "reset"),
        (BrokenPipeError(), "reset"),
        (TimeoutError(), "timeout"),
        (ConnectionRefusedError(), "connect-failure"),
        (BadUpstreamResponse(), None),
        (ValueError(), None),
        ("bad_upstream_response", None),
        (502, "502"),
        (503, "503"),
        (504, "504"),
        (500, None),
        (429, None),
        (200, None),
    ],
)
def test_classify(outcome: int | str | BaseException, reason: str | None) -> None:
    assert policy().classify(outcome) == reason


def test_classify_only_what_on_lists() -> None:
    p = policy(on=["503"])
    assert p.classify("connect_failed") is None
    assert p.classify(ConnectionResetError()) is None
    assert p.classify(502) is None
    assert p.classify(503) == "503"
    assert p.classify("stale") == "stale"  # the pooled-connection race is always retried


def test_5xx_and_gateway_error() -> None:
    p = policy(on=["5xx", "503"])
    assert p.classify(503) == "503"  # the exact code wins
    assert p.classify(500) == "5xx"
    assert p.classify(599) == "5xx"
    assert p.classify(499) is None
    g = policy(on=["gateway-error"])
    assert [g.classify(s) for s in (500, 502, 503, 504)] == [None, "502", "503", "504"]


def test_unknown_condition_is_refused() -> None:
    with pytest.raises(ValueError):
        policy(on=["sometimes"])
    with pytest.raises(ValueError):
        policy(on=["700"])
    with pytest.raises(ValueError):
        policy(attempts=0)
    with pytest.raises(ValueError):
        policy(attempts=11)


# --- how many tries ------------------------------------------------------------------------------
def test_attempts_exhausted() -> None:
    p = policy(attempts=3)
    assert p.next_delay(1) is not None
    assert p.next_delay(2) is not None
    assert p.next_delay(3) is None  # three tries made: that was the last
    one = policy(attempts=1)
    assert one.next_delay(1) is None


def test_per_request_attempts_override_next_delay() -> None:
    p = policy(attempts=3)
    assert p.next_delay(3, attempts=5) is not None
    assert p.next_delay(5, attempts=5) is None
    assert p.next_delay(1, attempts=1) is None
    assert p.next_delay(9, attempts=10) is not None
    assert p.next_delay(10, attempts=10) is None


# --- how long to wait ----------------------------------------------------------------------------
@pytest.mark.parametrize("attempt", range(1, 10))
def test_full_jitter_bounds(attempt: int) -> None:
    random.seed(attempt)
    p = policy(attempts=10, backoff_base=0.025, backoff_max=1.0)
    cap = min(1.0, 0.025 * 2 ** (attempt - 1))
    samples = [p.next_delay(attempt) for _ in range(2000)]
    assert all(s is not None and 0.0 <= s <= cap for s in samples)
    values = [s for s in samples if s is not None]
    # Full jitter spreads over the whole interval, not just near its top.
    assert min(values) < cap * 0.05
    assert max(values) > cap * 0.95


def test_retry_after_replaces_backoff_within_the_deadline() -> None:
    p = policy()
    assert p.next_delay(1, retry_after=3.0, remaining_deadline=10.0) == 3.0
    assert p.next_delay(1, retry_after=0.0, remaining_deadline=10.0) == 0.0
    # Exactly enough left for the minimum useful try after waiting: still retried.
    assert p.next_delay(1, retry_after=3.0, remaining_deadline=3.05) == 3.0
    assert p.next_delay(1, retry_after=3.0, remaining_deadline=3.049) is None
    assert p.next_delay(1, retry_after=30.0, remaining_deadline=10.0) is None
    assert p.next_delay(3, retry_after=1.0, remaining_deadline=10.0) is None  # exhausted anyway


def test_retry_after_without_deadline_is_capped() -> None:
    p = policy(max_retry_after=60.0)
    assert p.next_delay(1, retry_after=60.0) == 60.0
    assert p.next_delay(1, retry_after=61.0) is None


def test_deadline_too_short() -> None:
    p = policy(min_try_time=0.05)
    assert p.next_delay(1, remaining_deadline=0.049) is None
    assert p.next_delay(1, remaining_deadline=0.0) is None
    assert p.next_delay(1, remaining_deadline=-1.0) is None
    assert p.next_delay(1, remaining_deadline=0.05) == 0.0  # fits, with no time to wait


def test_backoff_is_shortened_to_fit_the_deadline() -> None:
    random.seed(7)
    p = policy(attempts=10, backoff_base=1.0, backoff_max=1.0, min_try_time=0.05)
    delays = [p.next_delay(5, remaining_deadline=0.25) for _ in range(500)]
    assert all(d is not None and 0.0 <= d <= 0.2 for d in delays)


def test_success_path_builds_no_tenacity_state(monkeypatch: pytest.MonkeyPatch) -> None:
    p = policy()
    built: list[object] = []
    real = tenacity.RetryCallState

    def counting(*args: object, **kwargs: object) -> tenacity.RetryCallState:
        built.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tenacity, "RetryCallState", counting)
    p.is_retryable_request(b"GET", False, 0)
    p.classify(503)
    assert built == []
    p.next_delay(1)
    assert len(built) == 1


def test_from_config() -> None:
    cfg = RetryConfig(
        attempts=4,
        on=["connect-failure", 503],
        idempotent_only=True,
        per_try_timeout="2s",
        backoff=BackoffConfig(base="25ms", max=1),
        max_body_bytes=65536,
    )
    p = RetryPolicy.from_config(cfg)
    assert p.attempts == 4
    assert p.grpc_on == frozenset({14})  # retry.grpc_on's default: [unavailable]
    assert p.classify(503) == "503"
    assert p.per_try_timeout == 2.0
    assert p.backoff_base == 0.025
    assert "attempts=4" in repr(p)


# --- Retry-After parsing -------------------------------------------------------------------------
NOW = float(calendar.timegm((1994, 11, 6, 8, 49, 0, 0, 0, 0)))  # 37 s before the RFC's date


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"120", 120.0),
        (b"0", 0.0),
        (b" 5\t", 5.0),
        ("7", 7.0),
        (b"Sun, 06 Nov 1994 08:49:37 GMT", 37.0),  # IMF-fixdate
        (b"Sunday, 06-Nov-94 08:49:37 GMT", 37.0),  # obsolete RFC 850
        (b"Sun Nov  6 08:49:37 1994", 37.0),  # obsolete asctime
        (b"Sun, 06 Nov 1994 08:48:00 GMT", 0.0),  # in the past
        (b"", None),
        (b"-1", None),
        (b"1.5", None),
        (b"soon", None),
        (b"\xd9\xa3", None),  # non-ASCII digits are not digits here
    ],
)
def test_parse_retry_after(value: bytes | str, seconds: float | None) -> None:
    assert parse_retry_after(value, wall_now=NOW) == seconds


def test_parse_retry_after_uses_the_wall_clock_by_default() -> None:
    got = parse_retry_after(b"Sun, 06 Nov 1994 08:49:37 GMT")
    assert got == 0.0
