"""HTTP/2 through the sidecar and through Envoy, side by side (issue 15; a benchmark, not a test).

    python bench/h2load.py                      # 2 s warm-up + 10 s per case, ~2 minutes
    python bench/h2load.py --duration 3 --warmup 1
    python bench/h2load.py --memory --before ../old-checkout --before-label 'commit abc'

Upstream: nginx (1 worker) serving a 100-byte file over h2c (`listen PORT http2;`, prior
knowledge) and, for the direct HTTP/1.1 row, over plain HTTP/1.1. Load: h2load (apt
`nghttp2-client`), one thread. Targets:

- `direct`: h2load straight to nginx (the h2c port; the plain port for the HTTP/1.1 case);
- `envoy`: `--concurrency 1`, one listener with `codec_type: AUTO` (h2c by prior knowledge and
  HTTP/1.1 on one port, as the sidecar's `protocol: http` listeners do), one cluster speaking
  h2c to nginx (`explicit_http_config: {http2_protocol_options: {}}`);
- `sidecar`: one `protocol: http` listener with a fixed cluster whose `protocol: http2`.

Cases: h2c `-c 4 -m 32` (few connections, many streams each: a gRPC channel's shape) and h2c
`-c 64 -m 1`; and `h1-to-h2`: h2load `--h1 -c 64 -m 1` through the proxy to the h2c upstream
(an HTTP/1.1 app given multiplexing by the proxy). Each row: rps (h2load's req/s over the
measured time), p50/p99 from h2load's per-request log (h2load prints only min/mean/max), the
proxy's CPU share of its core and its RSS / peak RSS, and the ratio to Envoy's rps.

Pinning as bench/run.py: the proxy alone on core 0 (`harness.pick_cores`), nginx, h2load and
this script on core 1. A target that cannot do a case is a row with the reason, never a hang:
before each case one bounded probe (3 s) checks that the target answers h2c (the server
preface is a SETTINGS frame) or HTTP/1.1, and h2load runs under a timeout. Until the HTTP/2
helpers of issue 15 are merged the sidecar rows read "not supported", with what failed: the
config rejecting `protocol: http2`, or no h2c answer on the listener.

Memory (issue 15: RSS under the h2 load): the proxy's RSS is sampled every 0.1 s while h2load
runs (the peak of the case, not only the process's peak since start, which the cases share),
read before the first case (idle after start), and read again `--settle` seconds after each case
(idle after the load: what the connections and streams left behind). `--before CHECKOUT` also
runs the sidecar of another checkout (e.g. the commit before a change, built the same way) as
`sidecar-before`; `--loop` picks the sidecars' event loop. `--memory` runs the sidecars only and
records the memory table alone (no rps: a figure to quote from a machine others share), as
bench/results/h2mem-<stamp>.json, which docs/benchmarks.md shows after the HTTP/2 table.

Results: bench/results/h2load-<UTC stamp>.json (with the Markdown table), and, when a full run
of bench/run.py is on record, docs/benchmarks.md regenerated with this table in its "other
benchmarks" sections (bench/report.py OTHER_BENCHMARKS). Every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.harness import _version, pick_cores, pin_self, sidecar_build  # noqa: E402
from bench.procs import (  # noqa: E402
    BenchError,
    Proc,
    Procs,
    core_busy_pct,
    core_times,
    free_port,
    http_request,
    pinned_run,
    port_open,
    wait_ready,
    workspace,
)
from bench.targets import (  # noqa: E402
    REPO,
    _envoy_cluster,
    _envoy_listener,
    _yaml,
    envoy_binary,
    envoy_bootstrap,
    sidecar_available,
)
from bench.upstream import Nginx, nginx_binary, nginx_head, run_nginx, serve_files  # noqa: E402

PATH = "/100b"
SIZE = 100
PROBE_TIMEOUT = 3.0  # seconds a target has to show it speaks the case's protocol
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, stream 0
H2_SETTINGS = 0x4


@dataclass(frozen=True)
class Case:
    name: str
    h1: bool  # the app speaks HTTP/1.1 (the upstream is h2c all the same)
    conns: int
    streams: int  # h2load -m: concurrent streams per connection (pipelining depth with --h1)


CASES = (
    Case("h2c c4 m32", False, 4, 32),
    Case("h2c c64 m1", False, 64, 1),
    Case("h1-to-h2 c64", True, 64, 1),
)
TARGETS = ("direct", "envoy", "sidecar")
RSS_SAMPLE_S = 0.1  # how often the proxy's RSS is read while h2load runs


@dataclass
class Target:
    name: str
    h2_port: int  # where h2load sends h2c
    h1_port: int  # where h2load --h1 sends HTTP/1.1
    proc: Proc | None = None  # the proxy; None for direct
    unsupported: str | None = None  # why this target cannot run the cases at all


# --- the upstream -------------------------------------------------------------------------------


def nginx_h2c_conf(workdir: Path, h2_port: int, h1_port: int) -> str:
    www = workdir / "www"
    return nginx_head(workdir, "bench/h2load.py") + f"""    default_type application/octet-stream;
    # sendfile off: with it, nginx's HTTP/2 writes a 100-byte file's DATA apart from its
    # HEADERS and each one-stream-at-a-time request waits out a 40 ms delayed ACK
    # (h2load -c 64 -m 1: 1,400 rps with sendfile, 22,000 without).
    sendfile off;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    http2_max_concurrent_streams 1024;
    open_file_cache max=16 inactive=600s;
    server {{
        listen 127.0.0.1:{h2_port} http2 backlog=4096;
        root {www};
    }}
    server {{
        listen 127.0.0.1:{h1_port} backlog=4096;
        root {www};
    }}
}}
"""


def start_nginx_h2c(procs: Procs, cores: frozenset[int]) -> tuple[Nginx, int]:
    """(nginx with `port` = its h2c port, its plain HTTP/1.1 port)."""
    nginx_binary()  # before anything is written
    workdir = procs.workdir
    serve_files(workdir, {SIZE: PATH})
    h2_port, h1_port = free_port(), free_port()
    proc = run_nginx(procs, "nginx-h2c.conf", nginx_h2c_conf(workdir, h2_port, h1_port), cores,
                     h1_port, PATH)
    problem = probe_h2c(h2_port)
    if problem:
        raise BenchError(f"nginx does not answer h2c on its http2 port: {problem}")
    return Nginx(proc, h2_port), h1_port


# --- probes: does a port speak what the case needs? ---------------------------------------------


def probe_h2c(port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when `port` answers the HTTP/2 client preface with a server preface (a SETTINGS
    frame), else what came back instead. Bounded by `timeout`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(PREFACE + EMPTY_SETTINGS)
            got = b""
            deadline = time.monotonic() + timeout
            while len(got) < 9 and time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
    except OSError as exc:
        return f"no h2c answer ({exc.__class__.__name__}: {exc})"
    return h2c_answer_problem(got)


def h2c_answer_problem(got: bytes) -> str | None:
    """What is wrong with `got` as the start of a server's HTTP/2 preface (None: nothing)."""
    if len(got) >= 9:
        length = int.from_bytes(got[:3], "big")
        kind, _flags, stream = struct.unpack("!BBI", got[3:9])
        if kind == H2_SETTINGS and stream & 0x7FFFFFFF == 0 and length % 6 == 0:
            return None
    if not got:
        return "no h2c answer (the connection closed or stayed silent)"
    first = got.split(b"\r\n", 1)[0][:60].decode("latin-1", "replace")
    if got.startswith(b"HTTP/"):
        return f"no h2c: the preface was answered as HTTP/1.1 ({first!r})"
    return f"no h2c: not a SETTINGS frame ({got[:16]!r})"


def probe_h1(port: int) -> str | None:
    try:
        got = http_request(port, PATH, timeout=PROBE_TIMEOUT)
    except (OSError, BenchError) as exc:
        return f"no HTTP/1.1 answer ({exc})"
    if got.status != 200 or len(got.body) != SIZE:
        detail = got.headers.get("x-sidecar-error", "")
        return f"HTTP/1.1 {got.status} with {len(got.body)} bytes {detail}".strip()
    return None


# --- the proxies --------------------------------------------------------------------------------


def envoy_h2c_bootstrap(admin: int, port: int, upstream: int) -> dict[str, Any]:
    listener = _envoy_listener("h2c", port, "nginx-h2c")
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["codec_type"] = "AUTO"  # HTTP/1.1 or h2c prior knowledge, by the first bytes
    cluster = _envoy_cluster("nginx-h2c", upstream)
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    options["explicit_http_config"] = {"http2_protocol_options": {}}
    return envoy_bootstrap(admin, [listener], [cluster])


def start_envoy_h2c(procs: Procs, nginx: Nginx, cores: frozenset[int]) -> Target:
    binary = envoy_binary()
    admin, port = free_port(), free_port()
    path = procs.workdir / "envoy-h2c.json"
    path.write_text(json.dumps(envoy_h2c_bootstrap(admin, port, nginx.port), indent=2))
    cmd = [binary, "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
           "-l", "warning", "--base-id", str(admin)]
    proc = procs.start("envoy", cmd, cores)
    wait_ready(proc, lambda: http_request(admin, "/ready").status == 200, timeout=30)
    return Target("envoy", port, port, proc)


def sidecar_h2c_config(upstream: int) -> tuple[dict[str, Any], dict[str, int]]:
    admin, status, listen = free_port(), free_port(), free_port()
    config: dict[str, Any] = {
        "admin": {"address": f"127.0.0.1:{admin}"},
        "status": {"address": f"127.0.0.1:{status}"},
        "access_log": False,
        "drain": {"grace": "2s", "accept_period": "0s"},  # the bench's SIGTERM ends it at once
        "listeners": [{"name": "bench", "address": f"127.0.0.1:{listen}", "protocol": "http",
                       "cluster": "nginx-h2c"}],
        "clusters": [{
            "name": "nginx-h2c",
            "protocol": "http2",  # SPEC section 11: h2c to the endpoint, whatever the app speaks
            "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{upstream}"]},
            "pool": {"max_connections": 256, "max_idle": 256},
        }],
    }
    return config, {"main": listen, "admin": admin, "status": status}


def start_sidecar_h2c(procs: Procs, nginx: Nginx, cores: frozenset[int], loop: str = "uvloop",
                      checkout: Path | None = None, name: str = "sidecar") -> Target:
    """The sidecar of this checkout, or (`checkout`) of another one, on `loop`."""
    config, ports = sidecar_h2c_config(nginx.port)
    tree = checkout or REPO
    try:
        reason = sidecar_available() if checkout is None else None
        if reason:
            raise BenchError(f"sidecar not runnable: {reason}")
        path = procs.workdir / f"{name}.yaml"
        path.write_text(_yaml(config))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(tree), None if checkout else env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "sidecar", "run", "--config", str(path), "--loop", loop]
        proc = procs.start(name, cmd, cores, env=env, cwd=tree)
        wait_ready(proc, lambda: http_request(ports["admin"], "/readyz").status == 200,
                   timeout=20)
    except BenchError as exc:
        log = procs.workdir / f"{name}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        if "protocol" in text and ("unknown key" in text or "Extra inputs" in text):
            return Target(name, 0, 0, unsupported="not supported: the config rejects "
                          "`protocol: http2` on a cluster (SPEC section 4 key not there yet)")
        return Target(name, 0, 0, unsupported=f"did not start: {exc}")
    return Target(name, ports["main"], ports["main"], proc)


# --- h2load -------------------------------------------------------------------------------------


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_CODES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def parse_h2load(text: str) -> dict[str, Any]:
    """rps and request counts from h2load's summary."""
    finished = _FINISHED.search(text)
    requests = _REQUESTS.search(text)
    if not finished or not requests:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise BenchError(f"h2load gave no summary: {tail[:300]}")
    out: dict[str, Any] = {"rps": float(finished.group(3))}
    keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    out.update({k: int(v) for k, v in zip(keys, requests.groups(), strict=True)})
    codes = _CODES.search(text)
    if codes:
        out["non_2xx"] = sum(int(x) for x in codes.groups()[1:])
    return out


def latency_ms(log_text: str, skip_first_s: float = 0.0) -> dict[str, float | None]:
    """p50/p99 in ms from h2load's --log-file (start µs since epoch, status, µs to the end of
    the response), failed streams (status -1) left out, and requests that started within
    `skip_first_s` of the first one (the warm-up) too."""
    rows = []
    for line in log_text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1] != "-1":
            with contextlib.suppress(ValueError):
                rows.append((int(parts[0]), int(parts[2])))
    if not rows:
        return {"p50_ms": None, "p99_ms": None}
    first = min(start for start, _ in rows)
    kept = sorted(d for start, d in rows if start - first >= skip_first_s * 1e6) or sorted(
        d for _, d in rows)
    return {
        "p50_ms": round(kept[len(kept) // 2] / 1000, 3),
        "p99_ms": round(kept[min(len(kept) - 1, int(len(kept) * 0.99))] / 1000, 3),
    }


def h2load_cmd(case: Case, port: int, args: argparse.Namespace, log: Path) -> list[str]:
    cmd = ["h2load", "-t", "1", "-c", str(case.conns), "-m", str(case.streams),
           "-D", f"{round(args.duration * 1000)}ms",
           "--warm-up-time", f"{round(args.warmup * 1000)}ms",
           "-N", "5s", "--log-file", str(log)]
    if case.h1:
        cmd.append("--h1")
    return [*cmd, f"http://127.0.0.1:{port}{PATH}"]


def run_case(case: Case, target: Target, args: argparse.Namespace, load: frozenset[int],
             proxy_core: int, workdir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case.name, "target": target.name,
                           "h2load": f"-c {case.conns} -m {case.streams}"
                           + (" --h1" if case.h1 else "")}
    if target.unsupported:
        row["error"] = target.unsupported
        return row
    if target.proc is not None and not target.proc.alive():
        row["error"] = target.proc.describe_exit()
        return row
    port = target.h1_port if case.h1 else target.h2_port
    problem = probe_h1(port) if case.h1 else probe_h2c(port)
    if problem:
        row["error"] = f"not supported: {problem}" if target.name == "sidecar" else problem
        return row
    if case.h1 and target.name == "direct":
        row["notes"] = ["HTTP/1.1 end to end (nginx's plain port): the baseline for the proxies"]
    log = workdir / f"h2load-{case.name.replace(' ', '_')}-{target.name}.tsv"
    cmd = h2load_cmd(case, port, args, log)
    cpu0 = target.proc.cpu_seconds() if target.proc else 0.0
    cores0 = core_times()
    started = time.monotonic()
    with RssSampler(target.proc) as rss:
        done = pinned_run(cmd, load, timeout=args.warmup + args.duration + 30)
    elapsed = time.monotonic() - started
    cores1 = core_times()
    if done.returncode != 0:
        raise BenchError(f"h2load exited {done.returncode}: {done.stderr.strip()[-300:]}")
    row.update(parse_h2load(done.stdout))
    with contextlib.suppress(OSError):
        row.update(latency_ms(log.read_text(), skip_first_s=args.warmup))
        log.unlink()
    if target.proc is not None:
        # CPU over the whole h2load run (warm-up included): the proxy's share of its core.
        cpu = target.proc.cpu_seconds() - cpu0
        row["proxy"] = {**target.proc.memory_kib(), "cpu_pct": round(100 * cpu / elapsed, 1),
                        "case_peak_kib": rss.peak_kib}
        row["other_on_proxy_core_pct"] = _other_pct(cores0, cores1, proxy_core,
                                                    row["proxy"]["cpu_pct"])
        time.sleep(args.settle)  # the load's connections are closed: what stays behind
        row["proxy"]["after_kib"] = target.proc.memory_kib()["rss_kib"]
    if row.get("failed") or row.get("non_2xx"):
        row.setdefault("notes", []).append(
            f"{row.get('failed', 0)} failed, {row.get('non_2xx', 0)} non-2xx")
    return row


class RssSampler:
    """The peak of a process's RSS while a `with` block runs, read every RSS_SAMPLE_S (VmHWM
    is the peak since the process started, which the cases of a run share)."""

    def __init__(self, proc: Proc | None) -> None:
        self.proc = proc
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        assert self.proc is not None
        while True:
            self.peak_kib = max(self.peak_kib, self.proc.memory_kib()["rss_kib"])
            if self._stop.wait(RSS_SAMPLE_S):
                return

    def __enter__(self) -> RssSampler:
        if self.proc is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self._stop.set()
            self._thread.join()
            self.peak_kib = max(self.peak_kib, self.proc.memory_kib()["rss_kib"])


def _other_pct(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
               core: int, proxy_pct: float) -> float | None:
    busy = core_busy_pct(before, after, core)
    return None if busy is None else round(max(0.0, busy - proxy_pct), 1)


# --- the table ----------------------------------------------------------------------------------


def add_ratios(rows: list[dict[str, Any]]) -> None:
    by = {(r["case"], r["target"]): r for r in rows}
    for row in rows:
        envoy = by.get((row["case"], "envoy"))
        if row.get("rps") and envoy and envoy.get("rps") and row["target"] != "envoy":
            row["vs_envoy"] = round(row["rps"] / envoy["rps"], 3)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"- **Command:** `{meta['command']}` ({meta['date']})",
        f"- **Pinning:** proxy on core {meta['proxy_core']}; nginx (1 worker, h2c by "
        f"`listen ... http2`), h2load (`-t 1`) and the script on core {meta['load_core']}; "
        f"{meta['warmup_s']:g} s warm-up + {meta['duration_s']:g} s measured per case",
        "- **Versions:** " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "- rps: h2load's req/s over the measured time; p50/p99 from its per-request log; "
        "proxy CPU: share of its core over the run; other CPU on core: what else ran on the "
        "proxy's core meanwhile (other processes, steal): where it is high the proxy was "
        "starved, so compare rows of one run; RSS: the proxy's peak during the case / "
        f"{meta.get('settle_s', 0):g} s after it (idle after the load)",
    ]
    others = [r["other_on_proxy_core_pct"] for r in rows
              if r.get("other_on_proxy_core_pct") is not None]
    if others and max(others) >= 20:
        lines.append(
            f"- **Noisy run:** up to {max(others):.0f}% of the proxy's core went to other work; "
            "the absolute proxy figures are low by about that much"
        )
    lines += [
        "",
        "| case | target | rps | p50 ms | p99 ms | vs Envoy | proxy CPU | other CPU on core "
        "| RSS peak / after MiB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        proxy = r.get("proxy") or {}
        mem = (f"{_mib(proxy.get('case_peak_kib'))} / {_mib(proxy.get('after_kib'))}"
               if proxy else "-")
        notes = "; ".join(r.get("notes", []))
        if r.get("error"):
            notes = str(r["error"]).replace("|", "/").replace("\n", " ")[:200]
        lines.append(
            f"| {r['case']} | {r['target']} | {_cell(r.get('rps'), '{:,.0f}')} "
            f"| {_cell(r.get('p50_ms'), '{:.3f}')} | {_cell(r.get('p99_ms'), '{:.3f}')} "
            f"| {_cell(r.get('vs_envoy'), '{:.2f}x')} | {_cell(proxy.get('cpu_pct'), '{:.0f}%')} "
            f"| {_cell(r.get('other_on_proxy_core_pct'), '{:.0f}%')} | {mem} | {notes} |"
        )
    return "\n".join(lines)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def memory_markdown(rows: list[dict[str, Any]], meta: dict[str, Any],
                    start_kib: dict[str, int]) -> str:
    """The memory table alone (`--memory`): RSS figures, no rps."""
    lines = [
        f"- **Command:** `{meta['command']}` ({meta['date']})",
        f"- **Build:** sidecar {meta['versions']['sidecar']}, loop: {meta['loop']}; h2load "
        f"{meta['versions']['h2load']} (`-t 1`), nginx {meta['versions']['nginx']} h2c; "
        f"{meta['warmup_s']:g} s warm-up + {meta['duration_s']:g} s per case, the cases one "
        "after the other on one sidecar process",
        "- RSS of the sidecar process: idle after start (ready, before any case); the peak "
        f"during each case (sampled every {RSS_SAMPLE_S:g} s); idle {meta['settle_s']:g} s "
        "after the case (its connections closed); the process's peak since start (VmHWM)",
    ]
    if meta.get("before"):
        lines.append(f"- `sidecar-before`: the same config and build kind, run from "
                     f"{meta['before']}.")
    lines += ["", "| case | target | idle after start | peak during the case | idle after "
              "the case | process peak |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        proxy = r.get("proxy") or {}
        if r.get("error") or not proxy:
            error = str(r.get("error", "no figures")).replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['case']} | {r['target']} | {error[:120]} | | | |")
            continue
        lines.append(
            f"| {r['case']} | {r['target']} | {_mib(start_kib.get(r['target']))} MiB "
            f"| {_mib(proxy.get('case_peak_kib'))} MiB | {_mib(proxy.get('after_kib'))} MiB "
            f"| {_mib(proxy.get('hwm_kib'))} MiB |")
    measured = [r["proxy"] for r in rows if r.get("proxy") and not r.get("error")]
    if measured and all(p["after_kib"] >= p["case_peak_kib"] for p in measured):
        lines += ["", "Idle after a case reads as its peak: memory the load used stays mapped "
                  "once freed (glibc's heap and Python's object arenas keep it for the next "
                  "load), so the peak is what a pod's memory limit must allow for."]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {
        "h2load": _version(["h2load", "--version"], r"nghttp2/(\S+)"),
        "nginx": _version([shutil.which("nginx") or "nginx", "-v"], r"nginx/(\S+)"),
    }
    with contextlib.suppress(BenchError):
        out["envoy"] = _version([envoy_binary(), "--version"], r"version: \S+?/(\d+\.\d+\.\d+)/")
    version = _version([sys.executable, "-m", "sidecar", "--version"], r"sidecar (\S+)")
    out["sidecar"] = f"{version} ({sidecar_build()})"
    return out


def _named(name: str, loop: str, args: argparse.Namespace) -> str:
    return f"{name} {loop}" if len(args.loop) > 1 else name


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per case")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per case")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--workdir", type=Path, help="keep configs and logs here")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/...)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds after each case before the idle RSS is read")
    parser.add_argument("--loop", nargs="+", choices=("uvloop", "asyncio"), default=["uvloop"],
                        help="the sidecars' event loop (more than one: a sidecar on each)")
    parser.add_argument("--before", type=Path,
                        help="also run the sidecar of this checkout, as `sidecar-before`")
    parser.add_argument("--before-label", help="what --before is, for the table (e.g. a commit)")
    parser.add_argument("--memory", action="store_true",
                        help="the sidecars only, and the memory table alone (no rps), as "
                        "bench/results/h2mem-<stamp>.json")
    args = parser.parse_args(argv)
    if args.memory:
        args.targets = ["sidecar"]
    if shutil.which("h2load") is None:
        print("h2load not found: apt-get install -y nghttp2-client", file=sys.stderr)
        return 2
    proxy_cores, load_cores, notes = pick_cores()
    (proxy_core,) = sorted(proxy_cores)[:1]
    pin_self(load_cores)
    rows: list[dict[str, Any]] = []
    start_kib: dict[str, int] = {}
    with workspace("h2load-bench-", args.workdir) as procs:
        workdir = procs.workdir
        nginx, h1_port = start_nginx_h2c(procs, load_cores)
        targets: list[Target] = []
        for name in args.targets:
            if name == "direct":
                targets.append(Target("direct", nginx.port, h1_port))
            elif name == "envoy":
                try:
                    targets.append(start_envoy_h2c(procs, nginx, proxy_cores))
                except BenchError as exc:
                    targets.append(Target("envoy", 0, 0, unsupported=str(exc)))
            else:
                for loop in args.loop:
                    targets.append(start_sidecar_h2c(
                        procs, nginx, proxy_cores, loop, name=_named("sidecar", loop, args)))
                    if args.before:
                        targets.append(start_sidecar_h2c(
                            procs, nginx, proxy_cores, loop, args.before.resolve(),
                            _named("sidecar-before", loop, args)))
        time.sleep(args.settle)
        for target in targets:
            if target.proc is not None and target.proc.alive():
                start_kib[target.name] = target.proc.memory_kib()["rss_kib"]
        assert port_open(nginx.port)
        for case in CASES:
            for target in targets:
                try:
                    row = run_case(case, target, args, load_cores, proxy_core, workdir)
                except BenchError as exc:
                    row = {"case": case.name, "target": target.name, "error": str(exc)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    add_ratios(rows)
    meta = {
        "command": ("python bench/h2load.py " + shlex.join(
            argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "proxy_core": proxy_core,
        "load_core": sorted(load_cores)[0],
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "settle_s": args.settle,
        "loop": ", ".join(args.loop),
        "before": (args.before_label or str(args.before)) if args.before else None,
        "start_kib": start_kib,
        "versions": versions(),
        "notes": notes,
    }
    table = memory_markdown(rows, meta, start_kib) if args.memory else markdown(rows, meta)
    print()
    print(table)
    report.record_run(report.result_path("h2mem" if args.memory else "h2load", args.out),
                      {"meta": meta, "rows": rows, "markdown": table}, args.out is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
