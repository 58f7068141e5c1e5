"""The benchmark table prints memory per target: idle after start, after the c64 case, peak."""

from __future__ import annotations

from typing import Any

from bench import report


def _row(case: str, target: str, rss: int, hwm: int) -> dict[str, Any]:
    return {"kind": "throughput", "case": case, "target": target, "rps": 1000.0, "error": None,
            "warnings": [], "proxy": {"rss_kib": rss, "hwm_kib": hwm, "cpu_pct": 99}}


def test_memory_rows_table_and_goals() -> None:
    rows = [_row("c16-100B", "sidecar", 40 * 1024, 41 * 1024),
            _row("c64-100B", "sidecar", 44 * 1024, 46 * 1024),
            _row("c64-100B", "envoy", 66 * 1024, 67 * 1024),
            _row("c64-100B", "sidecar-fwd", 45 * 1024, 47 * 1024)]
    idle = {"sidecar": {"rss_kib": 34 * 1024, "hwm_kib": 34 * 1024},
            "sidecar-fwd": {"rss_kib": 36 * 1024, "hwm_kib": 36 * 1024},
            "envoy": {"rss_kib": 60 * 1024, "hwm_kib": 61 * 1024}}
    memory = report.memory_rows(rows, idle)
    by = {m["target"]: m for m in memory}
    assert by["sidecar"] == {"target": "sidecar", "idle_rss_kib": 34 * 1024,
                             "loaded_rss_kib": 44 * 1024, "peak_hwm_kib": 46 * 1024}
    assert by["envoy"]["loaded_rss_kib"] == 66 * 1024
    goals = {g["goal"]: g for g in report.goal_checks(rows, memory)}
    assert goals["sidecar peak RSS under load"]["met"] is True  # 46 <= 50
    assert goals["sidecar-fwd idle RSS after start"]["met"] is False  # 36 > 35
    assert goals["sidecar-fwd idle RSS after start"]["value"] == 36
    text = report.markdown({"meta": _meta(), "rows": rows, "memory": memory})
    assert "| envoy | 60.0 | 66.0 | 67.0 |  |" in text
    assert "| sidecar | 34.0 | 44.0 | 46.0 |  |" in text
    assert "envoy" in report.terminal({"meta": _meta(), "rows": rows, "memory": memory})


def _meta() -> dict[str, Any]:
    return {
        "date": "2026-01-01 00:00 UTC", "command": "python bench/run.py",
        "machine": {"nproc": 2, "cpu_model": "Test CPU", "kernel": "6.1", "mem_total_mib": 1024},
        "pinning": {"proxy_core": 0, "load_core": 1},
        "loadavg": {"start": "0.1 0.1 0.1", "end": "0.2 0.1 0.1"},
        "params": {"duration_s": 10, "warmup_s": 2, "wrk_threads": 1},
        "versions": {}, "notes": [],
    }


def test_import_floor_probes_a_fresh_interpreter_and_tables_the_steps() -> None:
    """bench/import_floor.py: a real interpreter per step (its RSS read from /proc), the table
    shows each step's cost against the one before."""
    import os

    from bench import import_floor

    env = {**os.environ, "PYTHONPATH": str(import_floor.ROOT)}
    bare = import_floor.probe([], env)
    more = import_floor.probe(["asyncio", "ssl", "json"], env)
    assert 0 < bare["anon"] <= bare["rss"]
    assert more["rss"] > bare["rss"]  # importing costs memory, and the probe sees it
    result = {"date": "2026-01-01 00:00 UTC", "python": "3.11.7", "build": "pure Python",
              "rows": [{"step": "interpreter", "rss": 13.8, "anon": 7.1, "added": None,
                        "added_anon": None},
                       {"step": "aiohttp.web", "rss": 27.1, "anon": 17.1, "added": 13.3,
                        "added_anon": 10.0}]}
    text = import_floor.markdown(result)
    assert "| interpreter | 13.8 (7.1) |  |" in text
    assert "| aiohttp.web | 27.1 (17.1) | +13.3 (+10.0) |" in text
