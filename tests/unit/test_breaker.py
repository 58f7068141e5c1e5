"""Circuit breaker: every transition of its table, thresholds at the boundary, window rolling."""

from __future__ import annotations

import pytest

from sidecar.clock import FakeClock
from sidecar.config import CircuitBreakerConfig
from sidecar.policy.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    TRANSITIONS,
    CircuitBreaker,
)


def make(clock: FakeClock, seen: list[str] | None = None, **kw: float) -> CircuitBreaker:
    params: dict[str, float] = dict(
        failure_rate_threshold=0.5,
        minimum_requests=10,
        window=10.0,
        open_duration=30.0,
        half_open_max_requests=3,
        max_concurrent_requests=100,
    )
    params.update(kw)
    return CircuitBreaker(
        failure_rate_threshold=params["failure_rate_threshold"],
        minimum_requests=int(params["minimum_requests"]),
        window=params["window"],
        open_duration=params["open_duration"],
        half_open_max_requests=int(params["half_open_max_requests"]),
        max_concurrent_requests=int(params["max_concurrent_requests"]),
        clock=clock,
        on_transition=None if seen is None else seen.append,
    )


def run(b: CircuitBreaker, successes: int, failures: int) -> None:
    for ok in [True] * successes + [False] * failures:
        assert b.admit() is None
        b.record(ok)


def trip(b: CircuitBreaker) -> None:
    for _ in range(100):
        if b.state is OPEN:
            return
        assert b.admit() is None
        b.record(False)
    raise AssertionError("the breaker never opened")


def test_table_is_the_documented_one() -> None:
    expected = {
        CLOSED: frozenset({OPEN}),
        OPEN: frozenset({HALF_OPEN}),
        HALF_OPEN: frozenset({CLOSED, OPEN}),
    }
    assert expected == TRANSITIONS


def test_starts_closed_and_admits() -> None:
    b = make(FakeClock())
    assert b.state is CLOSED and b.state_code == 0
    assert b.admit() is None
    assert b.inflight == 1
    b.record(True)
    assert b.inflight == 0


def test_exactly_at_threshold_stays_closed_one_more_failure_opens() -> None:
    seen: list[str] = []
    b = make(FakeClock(), seen)
    run(b, 5, 5)  # 5/10 == 0.5: not above the threshold
    assert b.state is CLOSED
    run(b, 0, 1)  # 6/11 > 0.5
    assert b.state is OPEN and b.state_code == 1
    assert seen == ["open"]


def test_below_minimum_requests_never_opens() -> None:
    b = make(FakeClock())
    run(b, 0, 9)  # 100% failures but only 9 verdicts
    assert b.state is CLOSED
    run(b, 0, 1)  # the 10th reaches minimum_requests
    assert b.state is OPEN


def test_a_success_reaching_minimum_with_a_high_rate_opens() -> None:
    b = make(FakeClock())
    run(b, 0, 9)
    run(b, 1, 0)  # 9/10 failed
    assert b.state is OPEN


def test_open_rejects_until_open_duration_then_half_open_lazily() -> None:
    clock = FakeClock()
    seen: list[str] = []
    b = make(clock, seen)
    trip(b)
    assert b.admit() == "open"
    clock.advance(29.999)
    assert b.admit() == "open"
    assert b.state is OPEN
    clock.advance(0.001)  # exactly open_duration
    assert b.state is HALF_OPEN and b.state_code == 2
    assert seen == ["open", "half_open"]


def test_admit_itself_moves_open_to_half_open() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(30)
    assert b.admit() is None  # the first probe
    assert b.state is HALF_OPEN


def test_half_open_admits_at_most_max_probes() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(30)
    assert [b.admit() for _ in range(4)] == [None, None, None, "open"]


def test_half_open_all_probes_succeed_closes_with_a_clean_window() -> None:
    clock = FakeClock()
    seen: list[str] = []
    b = make(clock, seen)
    run(b, 4, 0)
    trip(b)
    clock.advance(30)
    for _ in range(3):
        assert b.admit() is None
    b.record(True)
    b.record(True)
    assert b.state is HALF_OPEN
    b.record(True)
    assert b.state is CLOSED
    assert seen == ["open", "half_open", "closed"]
    # The window was reset: 9 failures are below minimum_requests again.
    run(b, 0, 9)
    assert b.state is CLOSED


def test_half_open_any_probe_failure_reopens_for_a_full_open_duration() -> None:
    clock = FakeClock()
    seen: list[str] = []
    b = make(clock, seen)
    trip(b)
    clock.advance(30)
    assert b.admit() is None
    assert b.admit() is None
    b.record(True)
    b.record(False)
    assert b.state is OPEN
    assert seen == ["open", "half_open", "open"]
    clock.advance(29.9)
    assert b.admit() == "open"
    clock.advance(0.1)
    assert b.state is HALF_OPEN
    # A fresh half-open period: the full probe allowance again.
    assert [b.admit() for _ in range(4)] == [None, None, None, "open"]


def test_probe_released_without_verdict_gives_its_slot_back() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(30)
    for _ in range(3):
        assert b.admit() is None
    assert b.admit() == "open"
    b.release_without_record()
    assert b.admit() is None
    for _ in range(3):
        b.record(True)
    assert b.state is CLOSED
    assert b.inflight == 0


def test_verdicts_arriving_while_open_are_ignored() -> None:
    clock = FakeClock()
    b = make(clock)
    for _ in range(5):
        assert b.admit() is None  # in flight when the breaker opens
    trip(b)
    for _ in range(5):
        b.record(True)
    assert b.state is OPEN
    assert b.inflight == 0


def test_max_concurrent_requests() -> None:
    b = make(FakeClock(), max_concurrent_requests=2)
    assert b.admit() is None
    assert b.admit() is None
    assert b.admit() == "concurrency"
    b.record(True)
    assert b.admit() is None
    b.release_without_record()
    assert b.admit() is None
    assert b.admit() == "concurrency"
    assert b.state is CLOSED  # rejections for concurrency are not failures


def test_concurrency_limit_holds_in_half_open_without_spending_probes() -> None:
    clock = FakeClock()
    b = make(clock, max_concurrent_requests=1)
    for _ in range(10):
        assert b.admit() is None
        b.record(False)
    assert b.state is OPEN
    clock.advance(30)
    assert b.admit() is None
    assert b.admit() == "concurrency"
    b.record(True)
    assert b.admit() is None
    b.record(True)
    assert b.admit() is None
    b.record(True)
    assert b.state is CLOSED


def test_release_never_goes_negative() -> None:
    b = make(FakeClock())
    b.release_without_record()
    b.record(True)
    assert b.inflight == 0


def test_window_rolls_old_failures_out() -> None:
    clock = FakeClock()
    b = make(clock)
    run(b, 0, 9)
    clock.advance(10.0)  # every bucket of the 10 s window is now newer than those failures
    run(b, 0, 1)
    assert b.state is CLOSED
    run(b, 0, 8)  # 9 in the window
    assert b.state is CLOSED
    run(b, 0, 1)
    assert b.state is OPEN


def test_window_keeps_failures_within_it() -> None:
    clock = FakeClock()
    b = make(clock)
    run(b, 0, 5)
    clock.advance(9.0)  # still inside the 10 s window (bucketed by 1 s)
    run(b, 0, 5)
    assert b.state is OPEN


def test_partial_roll_drops_only_expired_buckets() -> None:
    clock = FakeClock()
    b = make(clock)
    run(b, 0, 4)  # bucket 0
    clock.advance(5)
    run(b, 6, 0)  # bucket 5
    clock.advance(5)  # bucket 0's failures leave; the 6 successes stay
    run(b, 0, 4)  # 4 failures / 10
    assert b.state is CLOSED
    run(b, 0, 1)  # 5 / 11
    assert b.state is CLOSED
    run(b, 0, 2)  # 7 / 13 > 0.5
    assert b.state is OPEN


def test_from_config_takes_the_config_model() -> None:
    clock = FakeClock()
    cfg = CircuitBreakerConfig(
        failure_rate_threshold=0.5,
        minimum_requests=2,
        window="10s",
        open_duration="1s",
        half_open_max_requests=1,
        max_concurrent_requests=5,
    )
    seen: list[str] = []
    b = CircuitBreaker.from_config(cfg, clock, seen.append)
    run(b, 0, 2)
    assert b.state is OPEN
    clock.advance(1)
    assert b.admit() is None
    b.record(True)
    assert b.state is CLOSED
    assert seen == ["open", "half_open", "closed"]
    assert "closed" in repr(b)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        make(FakeClock(), failure_rate_threshold=1.5)
    with pytest.raises(ValueError):
        make(FakeClock(), minimum_requests=0)
