"""Retry budget: the arithmetic exactly, the floor, spending before backoff, the rolling window."""

from __future__ import annotations

import pytest

from sidecar.clock import FakeClock
from sidecar.config import BudgetConfig
from sidecar.policy.budget import RetryBudget


def spend_all(b: RetryBudget, limit: int = 10_000) -> int:
    n = 0
    while n < limit and b.try_spend():
        n += 1
    return n


def test_floor_alone_is_min_per_second_times_window() -> None:
    b = RetryBudget(0.2, 10, FakeClock())
    assert b.available == 100
    assert spend_all(b) == 100
    assert not b.try_spend()
    assert b.available == 0


def test_floor_and_ratio_add_up() -> None:
    b = RetryBudget(0.2, 10, FakeClock())
    for _ in range(1000):
        b.record_request()
    assert b.available == 300  # 100 + 0.2 * 1000
    assert spend_all(b) == 300


@pytest.mark.parametrize(
    ("ratio", "requests", "allowed"),
    [(0.2, 4, 0), (0.2, 5, 1), (0.2, 9, 1), (0.2, 10, 2), (0.1, 30, 3), (0.1, 29, 2),
     (0.3, 10, 3), (1.0, 7, 7), (0.0, 100, 0), (2.5, 2, 5)],
)
def test_ratio_boundaries_are_exact(ratio: float, requests: int, allowed: int) -> None:
    b = RetryBudget(ratio, 0, FakeClock())
    for _ in range(requests):
        b.record_request()
    assert spend_all(b) == allowed


def test_fractional_floor() -> None:
    b = RetryBudget(0.0, 0.25, FakeClock())  # 2.5 retries per 10 s window: 2 whole ones
    assert spend_all(b) == 2


def test_spending_counts_at_once_as_retries_wait_in_backoff() -> None:
    # A burst of failures: every retry asks before sleeping; none has been sent yet.
    clock = FakeClock()
    b = RetryBudget(0.2, 1, clock)  # floor 10
    decisions = [b.try_spend() for _ in range(12)]
    assert decisions == [True] * 10 + [False] * 2
    assert b.retries_in_window == 10


def test_retries_do_not_fund_retries() -> None:
    b = RetryBudget(0.5, 0, FakeClock())
    b.record_request()
    b.record_request()
    assert b.try_spend()
    assert not b.try_spend()  # only record_request deposits


def test_window_rolls_retries_and_requests_out() -> None:
    clock = FakeClock(1000.0)  # on a 1 s bucket boundary
    b = RetryBudget(0.5, 0, clock)
    for _ in range(4):
        b.record_request()
    assert spend_all(b) == 2
    clock.advance(9.999)  # still the last bucket of the 10 s window
    assert b.requests_in_window == 4
    assert b.retries_in_window == 2
    assert not b.try_spend()
    clock.advance(0.001)  # the first bucket leaves
    assert b.requests_in_window == 0
    assert b.retries_in_window == 0
    assert not b.try_spend()  # deposits left with the requests


def test_partial_roll_keeps_recent_buckets() -> None:
    clock = FakeClock(1000.0)
    b = RetryBudget(0.5, 0, clock)
    for _ in range(2):
        b.record_request()  # bucket at t=1000
    assert b.try_spend()
    clock.advance(5)
    for _ in range(4):
        b.record_request()  # bucket at t=1005
    assert spend_all(b) == 2  # 0.5 * 6 = 3, one spent already
    clock.advance(5)  # t=1010: the t=1000 bucket leaves, with 2 requests and 1 retry
    assert b.requests_in_window == 4
    assert b.retries_in_window == 2
    assert not b.try_spend()  # 0.5 * 4 = 2, two spent
    clock.advance(5)
    assert b.available == 0
    assert b.requests_in_window == 0


def test_long_idle_clears_everything() -> None:
    clock = FakeClock()
    b = RetryBudget(0.2, 10, clock)
    for _ in range(500):
        b.record_request()
    spend_all(b)
    clock.advance(3600)
    assert b.available == 100
    assert "available=100" in repr(b)


def test_from_config_and_validation() -> None:
    b = RetryBudget.from_config(BudgetConfig(ratio=0.2, min_per_second=10), FakeClock())
    assert b.available == 100
    with pytest.raises(ValueError):
        RetryBudget(-0.1, 10, FakeClock())
