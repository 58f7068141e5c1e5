"""Outlier detection: ejection at the threshold, growing and capped times, the ejection cap."""

from __future__ import annotations

import pytest

from sidecar.clock import FakeClock
from sidecar.config import OutlierConfig
from sidecar.policy.outlier import OutlierDetector


def make(
    clock: FakeClock,
    keys: list[str],
    ejected: list[str] | None = None,
    *,
    consecutive: int = 3,
    base: float = 30.0,
    max_time: float = 100.0,
    percent: float = 50.0,
) -> OutlierDetector:
    d = OutlierDetector(
        consecutive_failures=consecutive,
        base_ejection_time=base,
        max_ejection_time=max_time,
        max_ejection_percent=percent,
        clock=clock,
        on_eject=None if ejected is None else ejected.append,
    )
    d.set_endpoints(keys)
    return d


def fail(d: OutlierDetector, key: str, n: int) -> None:
    for _ in range(n):
        d.record(key, False)


KEYS = [f"10.0.0.{i}:80" for i in range(1, 11)]


def test_ejects_exactly_at_consecutive_failures() -> None:
    seen: list[str] = []
    d = make(FakeClock(), KEYS, seen)
    fail(d, KEYS[0], 2)
    assert not d.is_ejected(KEYS[0])
    fail(d, KEYS[0], 1)
    assert d.is_ejected(KEYS[0])
    assert seen == [KEYS[0]]
    assert d.ejected_count == 1
    assert not d.is_ejected(KEYS[1])


def test_a_success_resets_the_streak() -> None:
    d = make(FakeClock(), KEYS)
    fail(d, KEYS[0], 2)
    d.record(KEYS[0], True)
    fail(d, KEYS[0], 2)
    assert not d.is_ejected(KEYS[0])


def test_ejection_ends_lazily_at_base_time() -> None:
    clock = FakeClock()
    d = make(clock, KEYS)
    fail(d, KEYS[0], 3)
    clock.advance(29.999)
    assert d.is_ejected(KEYS[0])
    clock.advance(0.001)
    assert not d.is_ejected(KEYS[0])
    assert d.ejected_count == 0


def test_ejection_time_grows_with_times_ejected_and_is_capped() -> None:
    clock = FakeClock()
    d = make(clock, KEYS, base=30.0, max_time=100.0)
    durations = []
    for _ in range(5):
        fail(d, KEYS[0], 3)
        start = clock.now()
        assert d.is_ejected(KEYS[0])
        # Advance in steps of 1 s until it returns; re-eject at once (no decay time).
        while d.is_ejected(KEYS[0]):
            clock.advance(1.0)
        durations.append(round(clock.now() - start))
    assert durations == [30, 60, 90, 100, 100]


def test_times_ejected_decays_one_per_base_time_back_in_service() -> None:
    clock = FakeClock()
    d = make(clock, KEYS, base=30.0, max_time=1000.0)
    fail(d, KEYS[0], 3)  # 1st: 30 s
    clock.advance(30)
    fail(d, KEYS[0], 3)  # 2nd: 60 s
    clock.advance(60)
    assert not d.is_ejected(KEYS[0])
    clock.advance(30)  # one base time healthy: multiplier 2 -> 1
    fail(d, KEYS[0], 3)  # so this is ejection number 2 again: 60 s
    clock.advance(59.9)
    assert d.is_ejected(KEYS[0])
    clock.advance(0.1)
    assert not d.is_ejected(KEYS[0])
    clock.advance(300)  # long healthy: back to the base time
    fail(d, KEYS[0], 3)
    clock.advance(30)
    assert not d.is_ejected(KEYS[0])


def test_verdicts_while_ejected_are_ignored() -> None:
    clock = FakeClock()
    seen: list[str] = []
    d = make(clock, KEYS, seen)
    fail(d, KEYS[0], 3)
    fail(d, KEYS[0], 10)  # late failures of requests that were in flight
    d.record(KEYS[0], True)  # a late success does not end the ejection either
    assert d.is_ejected(KEYS[0])
    assert seen == [KEYS[0]]
    clock.advance(30)
    fail(d, KEYS[0], 2)  # back in service with a fresh streak
    assert not d.is_ejected(KEYS[0])


def test_max_ejection_percent_caps_simultaneous_ejections() -> None:
    clock = FakeClock()
    d = make(clock, KEYS, percent=50.0)  # 10 endpoints -> at most 5
    for key in KEYS[:6]:
        fail(d, key, 3)
    assert [d.is_ejected(k) for k in KEYS[:6]] == [True] * 5 + [False]
    assert d.ejected_count == 5
    clock.advance(30)  # the five return
    fail(d, KEYS[5], 1)  # its streak was kept: the next failure ejects it
    assert d.is_ejected(KEYS[5])
    assert d.ejected_count == 1


def test_cap_rounds_down() -> None:
    d = make(FakeClock(), KEYS[:5], percent=50.0)  # 2.5 -> 2
    for key in KEYS[:5]:
        fail(d, key, 3)
    assert d.ejected_count == 2


def test_at_least_one_ejection_when_percent_is_positive() -> None:
    d = make(FakeClock(), KEYS[:3], percent=10.0)  # 0.3 -> floor 0, but at least 1
    for key in KEYS[:3]:
        fail(d, key, 3)
    assert d.ejected_count == 1


@pytest.mark.parametrize(("n", "percent", "expected"), [(1, 100.0, 0), (2, 100.0, 1),
                                                       (4, 100.0, 3), (1, 50.0, 0)])
def test_never_ejects_every_endpoint(n: int, percent: float, expected: int) -> None:
    d = make(FakeClock(), KEYS[:n], percent=percent)
    for key in KEYS[:n]:
        fail(d, key, 3)
    assert d.ejected_count == expected


def test_zero_percent_disables_ejection() -> None:
    d = make(FakeClock(), KEYS, percent=0.0)
    fail(d, KEYS[0], 10)
    assert not d.is_ejected(KEYS[0])


def test_set_endpoints_and_forget() -> None:
    clock = FakeClock()
    d = make(clock, KEYS[:4])
    fail(d, KEYS[0], 3)
    fail(d, KEYS[1], 2)
    assert d.is_ejected(KEYS[0])
    d.set_endpoints(KEYS[1:5])  # KEYS[0] left discovery
    assert not d.is_ejected(KEYS[0])
    assert d.ejected_count == 0
    fail(d, KEYS[1], 1)  # KEYS[1] kept its streak
    assert d.is_ejected(KEYS[1])
    d.forget(KEYS[1])
    assert not d.is_ejected(KEYS[1])
    assert d.ejected_count == 0


def test_unknown_key_is_tracked_on_first_verdict() -> None:
    d = make(FakeClock(), KEYS[:4])
    assert not d.is_ejected("10.9.9.9:80")
    fail(d, "10.9.9.9:80", 3)
    assert d.is_ejected("10.9.9.9:80")


def test_from_config_defaults_max_ejection_time() -> None:
    clock = FakeClock()
    cfg = OutlierConfig(consecutive_failures=1, base_ejection_time="200s", max_ejection_percent=50)
    d = OutlierDetector.from_config(cfg, clock)
    d.set_endpoints(KEYS[:2])
    d.record(KEYS[0], False)  # 200 s
    clock.advance(200)
    d.record(KEYS[0], False)  # 2nd in a row: 400 s, capped at the default 300 s
    clock.advance(299)
    assert d.is_ejected(KEYS[0])
    clock.advance(1)
    assert not d.is_ejected(KEYS[0])
    assert "endpoints=2" in repr(d)
