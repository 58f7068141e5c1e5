"""`log.Throttled`: a line that can flood is written at most once per interval per site, and
the next line carries how many were held back (the internal-error and DNS-failure logs)."""

from __future__ import annotations

import logging

import pytest

from sidecar.log import Throttled


def test_once_per_interval_per_site_with_the_count_held(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttled = Throttled(logging.getLogger("t.throttled"), interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="t.throttled")
    written = [throttled.log("a", logging.ERROR, "boom", ValueError("x")) for _ in range(50)]
    assert written == [True] + [False] * 49
    assert throttled.log("b", logging.WARNING, "other site") is True
    now[0] += 10.0
    assert throttled.log("a", logging.ERROR, "boom", ValueError("y")) is True
    records = [r for r in caplog.records if r.name == "t.throttled"]
    assert [r.getMessage() for r in records] == ["boom", "other site", "boom"]
    assert [r.fields["suppressed"] for r in records] == [0, 0, 49]  # type: ignore[attr-defined]
    assert records[0].exc_info is not None and records[1].exc_info is None
