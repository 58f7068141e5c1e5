"""The benchmark's pure parts: wrk output parsing, ratios, goal checks and the markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.procs import BenchError
from bench.wrk import parse_wrk

WRK_TEXT = """\
Running 2s test @ http://127.0.0.1:8080/100b
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.00us  100.00us   5.00ms   90.00%
    Req/Sec    30.00k     1.00k   32.00k    70.00%
  Latency Distribution
     50%  490.00us
     75%  600.00us
     90%  700.00us
     99%    1.20ms
  60000 requests in 2.00s, 12.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  30000.00
Transfer/sec:      6.00MB
"""


def test_wrk_text_output_is_parsed_when_the_lua_line_is_missing() -> None:
    got = parse_wrk(WRK_TEXT)
    assert got["rps"] == 30000.0
    assert got["requests"] == 60000
    assert got["p50_ms"] == pytest.approx(0.49)
    assert got["p99_ms"] == pytest.approx(1.2)
    assert got["non_2xx"] == 5
    assert got["errors"] == {"connect": 0, "read": 2, "write": 0, "timeout": 1}


def test_wrk_lua_line_wins_and_is_exact() -> None:
    line = ('BENCH_JSON {"requests":1000,"duration_us":2000000,"bytes":100000,"p50_us":250,'
            '"p90_us":400,"p99_us":900,"p999_us":1500,"max_us":3000,"mean_us":260.5,'
            '"err_connect":0,"err_read":0,"err_write":0,"err_status":0,"err_timeout":0}')
    got = parse_wrk(WRK_TEXT + line + "\n")
    assert got["rps"] == 500.0
    assert got["p50_ms"] == 0.25
    assert got["p99_ms"] == 0.9
    assert got["non_2xx"] == 5  # only the text says how many were not 2xx


def test_unparseable_wrk_output_is_a_bench_error() -> None:
    with pytest.raises(BenchError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def _row(kind: str, case: str, target: str, rps: float, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "case": case, "target": target, "rps": rps, "error": None,
            "warnings": [], "p50_ms": 0.2, "p99_ms": 0.9, **extra}


def test_ratios_and_goals_skip_failed_rows() -> None:
    rows = [
        _row("throughput", "c64-100B", "direct", 40000),
        _row("throughput", "c64-100B", "sidecar", 30000,
             proxy={"rss_kib": 40 * 1024, "hwm_kib": 50 * 1024, "cpu_pct": 99}),
        _row("throughput", "c64-100B", "envoy", 15000),
        {**_row("throughput", "c64-16KiB", "envoy", 0), "error": "failed to start"},
        _row("throughput", "c64-16KiB", "sidecar", 26000),
        _row("fixed_rate", "rate2000-100B", "sidecar", 2000, added_p50_ms=0.1,
             added_p99_ms=1.5),
    ]
    ratios = {(r["case"], r["ratio"]): r["value"] for r in report.compute_ratios(rows)}
    assert ratios[("c64-100B", "sidecar/envoy")] == 2.0
    assert ratios[("c64-100B", "sidecar/direct")] == 0.75
    assert ("c64-16KiB", "sidecar/envoy") not in ratios
    goals = {g["goal"]: g["met"] for g in report.goal_checks(rows)}
    assert goals["sidecar rps / Envoy rps, 64 conns, 100 B"] is True
    assert goals["sidecar rps, 64 conns, 16 KiB"] is True
    assert goals["sidecar added p50 at 2 000 req/s"] is True
    assert goals["sidecar added p99 at 2 000 req/s"] is False
    assert goals["sidecar peak RSS under load"] is True
    assert goals["naive TLS app: through sidecar / direct"] is None


def _meta() -> dict[str, Any]:
    return {
        "date": "2026-01-01 00:00 UTC", "command": "python bench/run.py",
        "machine": {"nproc": 2, "cpu_model": "Test CPU", "kernel": "6.1",
                    "mem_total_mib": 1024},
        "pinning": {"proxy_core": 0, "load_core": 1},
        "loadavg": {"start": "0.1 0.1 0.1", "end": "0.2 0.1 0.1"},
        "params": {"duration_s": 10, "warmup_s": 2, "wrk_threads": 1},
        "versions": {"wrk": "4.1.0"}, "notes": ["a note"],
    }


def test_markdown_has_machine_command_and_a_table() -> None:
    result = {
        "meta": _meta(),
        "rows": [_row("throughput", "c16-100B", "direct", 1000),
                 {**_row("throughput", "c16-100B", "pproxy", 0), "error": "boom|x"}],
    }
    result["ratios"] = report.compute_ratios(result["rows"])
    result["goals"] = report.goal_checks(result["rows"])
    text = report.markdown(result)
    assert "Test CPU" in text and "`python bench/run.py`" in text
    assert "| c16-100B | direct | 1,000 |" in text
    assert "ERROR: boom/x" in text  # a pipe in an error must not break the table
    assert "a note" in text
    assert report.terminal(result)


def _run(date: str, duration: float, rps: dict[tuple[str, str], float]) -> dict[str, Any]:
    return {
        "meta": {"date": date, "params": {"duration_s": duration}},
        "rows": [{"kind": "throughput", "case": case, "target": target, "rps": value,
                  "error": None} for (case, target), value in rps.items()],
    }


def test_history_lists_full_runs_newest_first_with_ratios(tmp_path: Any) -> None:
    full = {("c64-100B", "direct"): 50000, ("c64-100B", "sidecar"): 40000,
            ("c64-100B", "envoy"): 20000, ("c64-16KiB", "sidecar"): 30000,
            ("c64-16KiB", "envoy"): 12000}
    runs = {
        "20261101T000000Z.json": _run("old", 10, full),
        "20261102T000000Z.json": _run("quick", 3, full),  # a smoke run: left out
        "20261103T000000Z.json": _run("no envoy", 10, {
            k: v for k, v in full.items() if k[1] != "envoy"}),
        "20261104T000000Z.json": _run("new", 10, {**full, ("c64-100B", "sidecar"): 30000}),
        "latest.json": _run("latest", 10, full),  # a copy of one of the others
    }
    for name, data in runs.items():
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "20261105T000000Z.json").write_text("{not json")
    rows = report.history(tmp_path)
    assert [r[0] for r in rows] == ["new", "old"]
    assert rows[0][1:] == ["50,000", "30,000", "20,000", "30,000", "12,000", "1.50 x", "2.50 x"]
    text = report.markdown({"meta": _meta(), "rows": []}, rows)
    assert "## Earlier runs" in text and "| new | 50,000 |" in text


def test_other_benchmarks_show_their_newest_result(tmp_path: Path) -> None:
    (tmp_path / "discovery-20260101T000000Z.json").write_text(json.dumps({"markdown": "old"}))
    (tmp_path / "discovery-20261207T000000Z.json").write_text(json.dumps({"markdown": "| new |"}))
    (tmp_path / "20261207T000000Z.json").write_text("{}")  # a full run: not this section's
    sections = report.other_benchmarks(tmp_path)
    text = report.markdown({"meta": _meta(), "rows": []}, None, sections)
    assert "## Discovery at scale" in text
    assert "| new |" in text and "old" not in text
    assert "discovery-20261207T000000Z.json" in text
