"""One clock seam: which product modules still read the event loop's clock (`loop.time()`).

ruff's banned-api rule (pyproject.toml, TID251) keeps `time.monotonic`, `time.time` and the
like out of sidecar/, but it cannot name an instance method, so `loop.time()` is guarded here:
a source scan of sidecar/ for `.time` read on anything named like a loop (`loop`, `self._loop`,
`ctx.loop`, `asyncio.get_running_loop()`...). A module not listed below that starts reading it
fails; so does a listed one that no longer does (take it off the list). The list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sidecar"

# Modules that may read loop.time(), and why. Everything else reads a Clock (sidecar/clock.py).
LOOP_TIME_ALLOWED: dict[str, str] = {
    # The loop's own time base is the point: the lag of the loop, measured by the loop.
    "sidecar/observe/loop_lag.py": "measures the event loop's lag with the loop's own clock",
    # The pool takes a Clock; without one (production) it reads the loop's, its timers' base.
    "sidecar/upstream/pool.py": "the loop's clock is the default Clock (its timers run on it)",
    # The wheel files loop timers: deadlines on any other base would fire at the wrong time.
    "sidecar/timers.py": "the wheel's timers are the loop's own (call_at)",
    # Not converted yet (issue 14, finding 7 names the pool, the exchange and the wheel only).
    "sidecar/downstream/protocol.py": "not converted yet: header/idle deadlines, access log",
    "sidecar/downstream/tcp.py": "not converted yet: tunnel duration",
    "sidecar/downstream/listener.py": "not converted yet: accept backoff",
    "sidecar/upstream/cluster.py": "not converted yet: last_used",
    "sidecar/upstream/registry.py": "not converted yet: negative cache of unknown names",
    "sidecar/discovery/kubernetes.py": "not converted yet: watch restart pacing",
    "sidecar/lifecycle.py": "not converted yet: accept period and drain timing",
    "sidecar/app.py": "not converted yet: prewarm wait",
}


def _is_loop(node: ast.expr) -> bool:
    """An expression that names an event loop: `loop`, `self._loop`, `ctx.loop`, or a call of
    `get_running_loop()` / `get_event_loop()`."""
    if isinstance(node, ast.Name):
        return "loop" in node.id
    if isinstance(node, ast.Attribute):
        return "loop" in node.attr
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        return name in ("get_running_loop", "get_event_loop")
    return False


def loop_time_reads(source: str) -> list[int]:
    """Line numbers where `source` reads `<loop>.time` (called or not: `clock = loop.time`)."""
    return sorted(
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr == "time" and _is_loop(node.value)
    )


def _readers() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = loop_time_reads(path.read_text(encoding="utf-8"))
        if lines:
            found[path.relative_to(ROOT).as_posix()] = lines
    return found


@pytest.mark.parametrize(
    ("source", "lines"),
    [
        ("now = self._loop.time()", [1]),
        ("now = self.proto.loop.time()", [1]),
        ("x = ctx.loop.time() - started", [1]),
        ("import asyncio\nt = asyncio.get_running_loop().time()", [2]),
        ("clock = loop.time", [1]),
        ("ok = session.time + session.timeout > wall", []),  # an SSL session's stamp
        ("import time\nt = time.time()", []),  # ruff's rule, not this one
        ("t = self.clock.now()", []),
    ],
)
def test_the_scan_finds_loop_time_reads(source: str, lines: list[int]) -> None:
    assert loop_time_reads(source) == lines


def test_only_the_listed_modules_read_the_loop_clock() -> None:
    readers = _readers()
    new = {path: lines for path, lines in readers.items() if path not in LOOP_TIME_ALLOWED}
    assert not new, (
        f"loop.time() read outside the clock seam: {new}. Read the time through a Clock "
        "(sidecar/clock.py; tests pass a FakeClock) instead"
    )
    stale = sorted(set(LOOP_TIME_ALLOWED) - set(readers))
    assert not stale, f"no longer read loop.time(): take them off LOOP_TIME_ALLOWED: {stale}"
