"""One benchmark run: start nginx and the targets pinned, measure every case, stop, report.

The proxy under test runs on one core, everything that makes or serves the load (wrk,
bench/loadgen.py, nginx with one worker, this runner) on the other, so a proxy can use at most
one core and the figures compare proxies at equal CPU. Cases run case by case across all
targets (every target is started once and left idle between its cases) so that the rows a
ratio compares were measured close together in time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report, targets
from bench.procs import (
    BenchError,
    Proc,
    Procs,
    core_busy_pct,
    core_times,
    http_request,
    pinned_run,
    set_child_priority,
)
from bench.targets import Target
from bench.upstream import BODIES, Nginx, make_tls_files, start_nginx
from bench.wrk import THREADS, lua_script, run_wrk

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ALL_TARGETS = ("direct", "sidecar", "sidecar-fwd", "envoy", "pproxy")
SIZE_LABEL = {100: "100B", 16384: "16KiB"}


@dataclass
class Plan:
    targets: list[str]
    conns: list[int]
    sizes: list[int]
    duration: float
    warmup: float
    rate: float
    rate_conns: int
    tls: bool
    tls_conns: int
    profile: bool
    profile_duration: float
    max_time: float
    keep_awake: bool = False
    rounds: int = 1


def plan_from_args(args: argparse.Namespace) -> Plan:
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    chosen = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else []
    unknown = sorted(set(chosen) - set(ALL_TARGETS))
    if unknown:
        raise SystemExit(f"--only: unknown target(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(ALL_TARGETS)}")
    return Plan(
        targets=[t for t in ALL_TARGETS if t in chosen] if chosen else list(ALL_TARGETS),
        conns=[int(c) for c in args.conns.split(",")],
        sizes=[int(s) for s in args.sizes.split(",")],
        duration=duration,
        warmup=warmup,
        rate=args.rate,
        rate_conns=args.rate_connections,
        tls=args.tls,
        tls_conns=16,
        profile=args.profile,
        profile_duration=max(10.0, duration),
        max_time=args.max_time,
        keep_awake=args.keep_awake,
        rounds=max(1, args.rounds),
    )


def pick_cores() -> tuple[frozenset[int], frozenset[int], list[str]]:
    """(proxy core, load core, notes): cores 0 and 1 when we may use them."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2:
        proxy, load = (0, 1) if {0, 1} <= set(allowed) else (allowed[0], allowed[1])
        return frozenset({proxy}), frozenset({load}), []
    only = frozenset(allowed[:1])
    return only, only, ["only one CPU available: proxy and load generator share it"]


def pin_runner(priority: int = 0) -> tuple[frozenset[int], frozenset[int], list[str]]:
    """Pick the cores once (`pick_cores`), then move this runner onto the load core(s) at
    `priority`: the Runner must get these cores, not pick again, since by then this process
    sees only the load core and would put the proxy on it too."""
    cores = pick_cores()
    pin_self(cores[1], priority)
    return cores


def pin_self(load_cores: frozenset[int], priority: int = 0) -> None:
    """This script's own process, before it starts any other: the nice value `priority` for
    it and for every process it starts (0: unchanged; not allowed: it stops here), and the
    load core(s), off the proxy's."""
    if priority:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, priority)
        except OSError as exc:
            raise SystemExit(f"--priority {priority}: {exc}") from exc
        set_child_priority(priority)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, load_cores)


class Runner:
    def __init__(self, plan: Plan, workdir: Path, verbose: bool = True,
                 cores: tuple[frozenset[int], frozenset[int], list[str]] | None = None) -> None:
        self.plan = plan
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.proxy_cores, self.load_cores, self.notes = cores or pick_cores()
        self.rows: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.deadline = self.started + plan.max_time
        self.verbose = verbose
        self.nginx: Nginx | None = None
        self.targets: dict[str, Target | str] = {}  # name -> Target, or why it is not running
        self.profile_out = BENCH / "results" / "profile.svg"
        self.tls_error: str | None = None
        self.spinner: Proc | None = None  # --keep-awake
        self.idle_memory: dict[str, dict[str, int]] = {}  # target -> memory after start

    # -- small helpers ------------------------------------------------------------------

    def log(self, message: str) -> None:
        if self.verbose:
            elapsed = time.monotonic() - self.started
            print(f"[{elapsed:5.0f}s] {message}", file=sys.stderr, flush=True)

    def out_of_time(self, needed: float) -> bool:
        return time.monotonic() + needed > self.deadline

    def _start(self, name: str, starter: Any) -> None:
        if self.out_of_time(30):
            self.targets[name] = "skipped: --max-time reached"
            return
        try:
            target = starter()
            self.targets[name] = target
            self.log(f"started {name}" + (f" (pid {target.proc.pid})" if target.proc else ""))
        except Exception as exc:  # noqa: BLE001 - any failure becomes this target's error rows
            self.targets[name] = f"failed to start: {_describe(exc)}"
            self.log(f"{name}: {self.targets[name]}")

    def _usable(self, name: str) -> Target:
        target = self.targets.get(name)
        if target is None:
            raise BenchError(f"{name} was not started")
        if isinstance(target, str):
            raise BenchError(target)
        if target.proc is not None and not target.proc.alive():
            raise BenchError(target.proc.describe_exit())
        return target

    # -- the run ------------------------------------------------------------------------

    def run(self) -> None:
        plan = self.plan
        self.log(f"proxy core {set(self.proxy_cores)}, load core {set(self.load_cores)}; "
                 f"targets {', '.join(plan.targets)}; workdir {self.workdir}")
        tls = None
        if plan.tls:
            try:
                tls = make_tls_files(self.workdir)
            except Exception as exc:  # noqa: BLE001 - the plain cases still run
                self.tls_error = f"no TLS upstream: {_describe(exc)}"
        self.nginx = start_nginx(self.procs, self.load_cores, tls)
        self.log(f"nginx on {self.nginx.port} (pid {self.nginx.proc.pid})")
        if plan.keep_awake:
            # A SCHED_IDLE busy loop: any runnable proxy thread preempts it at once, but the
            # core never goes idle, so a request does not pay for waking a halted (v)CPU.
            self.spinner = self.procs.start(
                "keep-awake", [sys.executable, "-c", "while True: pass"], self.proxy_cores,
                idle=True)
        self.start_targets()
        for conns in plan.conns:
            for size in plan.sizes:
                case = f"c{conns}-{SIZE_LABEL.get(size, f'{size}B')}"
                for _ in range(plan.rounds):
                    for name in plan.targets:
                        self.throughput(case, name, conns, size)
                if plan.rounds > 1:
                    self._keep_median_rounds(case)
        for name in plan.targets:
            self.fixed_rate(name)
        self.added_latency()
        if plan.profile:
            self.profile()
        if plan.tls:
            self.tls_cases()

    def start_targets(self) -> None:
        nginx = self.nginx
        assert nginx is not None
        cores = self.proxy_cores
        starters = {
            "direct": lambda: targets.direct(nginx),
            "sidecar": lambda: self._sidecar("sidecar", forward=False),
            "sidecar-fwd": lambda: self._sidecar("sidecar-fwd", forward=True),
            "envoy": lambda: targets.start_envoy(self.procs, nginx, cores),
            "pproxy": lambda: targets.start_pproxy(self.procs, nginx, cores),
        }
        for name in self.plan.targets:
            self._start(name, starters[name])
            target = self.targets[name]
            if isinstance(target, Target) and target.proc is not None:
                # Idle RSS after start, before any request (issue 17: per-pod cost).
                self.idle_memory[name] = settled_memory(target.proc)
            if isinstance(target, Target):
                try:
                    targets.check_bodies(target)
                except Exception as exc:  # noqa: BLE001
                    self.targets[name] = f"wrong response: {_describe(exc)}"
                    self.log(f"{name}: {self.targets[name]}")

    def _sidecar(self, name: str, forward: bool) -> Target:
        assert self.nginx is not None
        config, ports = targets.sidecar_config(self.nginx, forward=forward)
        mode = "forward" if forward else "route"
        target = targets.start_sidecar(self.procs, name, config, ports, self.nginx,
                                       self.proxy_cores, mode=mode)
        if forward:
            target.notes.append("forward proxy (absolute-form), the job pproxy is compared on")
        return target

    def _row(self, kind: str, case: str, target: str, **extra: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"kind": kind, "case": case, "target": target, "error": None,
                               "warnings": [], **extra}
        self.rows.append(row)
        return row

    def _wrk_case(self, row: dict[str, Any], target: Target, listener: str, path: str,
                  conns: int, headers: tuple[str, ...] = ()) -> None:
        """Warm up, then measure with wrk; fills `row` with figures and the proxy's RSS/CPU."""
        forward = target.mode == "forward"
        script = lua_script(
            self.workdir, f"{target.name}-{row['case']}-{listener}",
            target.request_target(path) if forward else None,
            target.host_header(listener) if forward else None,
        )
        url = target.url(path, listener)
        if self.plan.warmup > 0:
            run_wrk(url, connections=conns, duration=self.plan.warmup, script=script,
                    cores=self.load_cores, headers=headers)
        probe = self._probe(target.proc)
        local_before = _sidecar_local_errors(target)
        figures = run_wrk(url, connections=conns, duration=self.plan.duration, script=script,
                          cores=self.load_cores, headers=headers)
        self._record_usage(row, target.proc, probe)
        row.update(figures)
        local_after = _sidecar_local_errors(target)
        if local_before is not None and local_after is not None:
            # Which of the sidecar's own answers (SPEC section 5 codes) the failures were.
            local = {code: n - local_before.get(code, 0.0) for code, n in local_after.items()}
            row["sidecar_local_errors"] = {code: n for code, n in local.items() if n}
        _judge(row)

    def _probe(self, proc: Proc | None) -> tuple[float, float, float, dict[int, tuple[int, int]]]:
        spin = self.spinner.cpu_seconds() if self.spinner else 0.0
        return (proc.cpu_seconds() if proc else 0.0), spin, time.monotonic(), core_times()

    def _record_usage(self, row: dict[str, Any], proc: Proc | None,
                      probe: tuple[float, float, float, dict[int, tuple[int, int]]]) -> None:
        """The proxy's CPU share and memory, and how busy both cores were (anything else
        running on the proxy's core shows up as `other_on_proxy_core_pct`; the --keep-awake
        loop does not count)."""
        cpu0, spin0, t0, cores0 = probe
        wall = time.monotonic() - t0
        cores1 = core_times()
        spin_pct = 0.0
        if self.spinner is not None:
            spin_pct = 100 * (self.spinner.cpu_seconds() - spin0) / wall
            row["cores"] = {"keep_awake_pct": round(spin_pct, 1)}
        proxy_core, load_core = min(self.proxy_cores), min(self.load_cores)
        busy = core_busy_pct(cores0, cores1, proxy_core)
        row.setdefault("cores", {}).update({
            "proxy_core_busy_pct": busy,
            "load_core_busy_pct": core_busy_pct(cores0, cores1, load_core)})
        cpu_pct = 0.0
        if proc is not None:
            if not proc.alive():
                raise BenchError(proc.describe_exit())
            cpu_pct = round(100 * (proc.cpu_seconds() - cpu0) / wall, 1)
            row["proxy"] = {**proc.memory_kib(), "pid": proc.pid, "cpu_pct": cpu_pct}
        if busy is not None:
            row["cores"]["other_on_proxy_core_pct"] = round(max(0.0, busy - cpu_pct - spin_pct),
                                                            1)

    def throughput(self, case: str, name: str, conns: int, size: int) -> None:
        row = self._row("throughput", case, name, conns=conns, body_bytes=size)
        self._guarded(row, lambda: self._wrk_case(row, self._usable(name), "main",
                                                  BODIES[size], conns))

    def _keep_median_rounds(self, case: str) -> None:
        """--rounds N: the targets ran N times in turn; keep, per target, the row of the round
        with the median rps (a real run, so its latencies belong to it) and record all N."""
        mine = [r for r in self.rows if r["kind"] == "throughput" and r["case"] == case]
        self.rows = [r for r in self.rows if not any(r is m for m in mine)]
        for name in self.plan.targets:  # in the order the tables list targets
            rounds = [r for r in mine if r["target"] == name]
            if not rounds:
                continue
            measured = sorted((r for r in rounds if not r["error"] and r.get("rps")),
                              key=lambda r: r["rps"])
            keep = measured[(len(measured) - 1) // 2] if measured else rounds[0]
            keep["rounds_rps"] = [round(r["rps"]) if r.get("rps") else None for r in rounds]
            self.rows.append(keep)

    def _guarded(self, row: dict[str, Any], measure: Any) -> None:
        needed = self.plan.warmup + self.plan.duration + 5
        if self.out_of_time(needed):
            row["error"] = "skipped: --max-time reached"
            return
        try:
            measure()
        except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
            row["error"] = _describe(exc)
        self.log(_progress(row))

    # -- fixed rate ---------------------------------------------------------------------

    def fixed_rate(self, name: str) -> None:
        case = f"rate{self.plan.rate:g}-100B"
        row = self._row("fixed_rate", case, name, conns=self.plan.rate_conns, body_bytes=100,
                        rate=self.plan.rate)
        self._guarded(row, lambda: self._fixed_rate(row, self._usable(name)))

    def _fixed_rate(self, row: dict[str, Any], target: Target) -> None:
        plan = self.plan
        cmd = [
            sys.executable, str(BENCH / "loadgen.py"), "--port", str(target.port),
            "--target", target.request_target(BODIES[100]),
            "--host-header", target.host_header(), "--rate", f"{plan.rate:g}",
            "--connections", str(plan.rate_conns), "--duration", f"{plan.duration:g}",
            "--warmup", f"{plan.warmup:g}",
        ]
        probe = self._probe(target.proc)
        done = pinned_run(cmd, self.load_cores, timeout=plan.duration + plan.warmup + 30)
        self._record_usage(row, target.proc, probe)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise BenchError(f"loadgen exited {done.returncode}: "
                             f"{(lines[-1] if lines else done.stderr.strip()[-300:])}")
        data = json.loads(lines[-1])
        if "error" in data:
            raise BenchError(f"loadgen: {data['error']}")
        service, queued = data.get("service", {}), data.get("with_queue", {})
        row.update({
            "rps": data["achieved_rps"], "requests": data["completed"], "sent": data["sent"],
            "errors": data["errors"], "p50_ms": service.get("p50_ms"),
            "p90_ms": service.get("p90_ms"), "p99_ms": service.get("p99_ms"),
            "p999_ms": service.get("p999_ms"), "max_ms": service.get("max_ms"),
            "p99_incl_queue_ms": queued.get("p99_ms"),
        })
        if data["completed"] < 0.95 * plan.rate * plan.duration:
            row["warnings"].append(f"only {data['completed']} of "
                                   f"{plan.rate * plan.duration:.0f} requests completed")
        _judge(row)

    def added_latency(self) -> None:
        rows = [r for r in self.rows if r["kind"] == "fixed_rate"]
        base = next((r for r in rows if r["target"] == "direct" and not r["error"]), None)
        for row in rows:
            if base is None or row["error"] or row is base:
                continue
            for pct in ("p50", "p99"):
                if row.get(f"{pct}_ms") is not None and base.get(f"{pct}_ms") is not None:
                    row[f"added_{pct}_ms"] = round(row[f"{pct}_ms"] - base[f"{pct}_ms"], 4)

    # -- profile ------------------------------------------------------------------------

    def profile(self) -> None:
        """py-spy record on the sidecar during an extra (unrecorded) 64-connection case."""
        out = self.profile_out
        row = self._row("profile", "c64-100B", "sidecar", output=str(out))
        try:
            target = self._usable("sidecar")
            assert target.proc is not None
            pyspy = shutil.which("py-spy")
            if not pyspy:
                raise BenchError("py-spy not found (pip install py-spy)")
            seconds = self.plan.profile_duration
            out.parent.mkdir(parents=True, exist_ok=True)
            spy = self.procs.start("py-spy", [
                pyspy, "record", "-o", str(out), "--pid", str(target.proc.pid),
                "--duration", f"{seconds:.0f}", "--rate", "200"], self.load_cores)
            time.sleep(0.5)
            script = lua_script(self.workdir, "profile", None, None)
            figures = run_wrk(target.url(BODIES[100]), connections=64, duration=seconds,
                              script=script, cores=self.load_cores)
            try:
                spy.popen.wait(30)
            finally:
                self.procs.stop(spy)
            if spy.popen.returncode != 0 or not out.exists():
                raise BenchError(f"py-spy failed: {spy.tail(5)}")
            row["rps_while_profiled"] = figures["rps"]
            self.log(f"profile written to {out}")
        except Exception as exc:  # noqa: BLE001
            row["error"] = _describe(exc)
            self.log(f"profile: {row['error']}")

    # -- TLS ----------------------------------------------------------------------------

    def tls_cases(self) -> None:
        nginx = self.nginx
        assert nginx is not None
        wanted = {"direct": "direct-tls", "sidecar": "sidecar-tls", "envoy": "envoy-tls"}
        names = [wanted[t] for t in self.plan.targets if t in wanted]
        if nginx.tls_port is None:
            for name in names:
                self.targets[name] = self.tls_error or "no TLS upstream"
                self._row("tls_naive", f"c{self.plan.tls_conns}-close-100B", name,
                          error=self.targets[name])
            return
        if "direct-tls" in names:
            # wrk resumes TLS sessions when it reconnects (checked with nginx's
            # $ssl_session_reused); the -full twin goes to a server that cannot resume.
            for name, port in (("direct-tls", nginx.tls_port),
                               ("direct-tls-full", nginx.tls_noresume_port)):
                assert port is not None
                self.targets[name] = Target(
                    name, "route", {"main": port, "tls-keepalive": port},
                    ("127.0.0.1", port), scheme="https")
            names.insert(1, "direct-tls-full")
        if "sidecar-tls" in names:
            def sidecar_tls() -> Target:
                config, ports = targets.sidecar_tls_config(nginx)
                ports["main"] = ports["tls-keepalive"]
                return targets.start_sidecar(self.procs, "sidecar-tls", config, ports, nginx,
                                             self.proxy_cores)
            self._start("sidecar-tls", sidecar_tls)
        if "envoy-tls" in names:
            def envoy_tls() -> Target:
                target = targets.start_envoy(self.procs, nginx, self.proxy_cores, tls=True)
                target.ports["main"] = target.ports["tls-keepalive"]
                return target
            self._start("envoy-tls", envoy_tls)
        conns = self.plan.tls_conns
        case = f"c{conns}-close-100B"
        for name in names:
            row = self._row("tls_naive", case, name, conns=conns, body_bytes=100)
            self._guarded(row, lambda row=row, name=name: self._wrk_case(
                row, self._usable(name), "tls-keepalive", BODIES[100], conns,
                headers=("Connection: close",)))
        variants = []
        if "sidecar-tls" in names:
            variants += [("sidecar-tls reuse", "sidecar-tls", "tls-close-reuse"),
                         ("sidecar-tls no-reuse", "sidecar-tls", "tls-close-noreuse")]
        if "envoy-tls" in names:
            variants.append(("envoy-tls reuse", "envoy-tls", "tls-close-reuse"))
        case = f"c{conns}-upstream-close-100B"
        for label, name, listener in variants:
            row = self._row("tls_handshake", case, label, conns=conns, body_bytes=100,
                            listener=listener)
            self._guarded(row, lambda row=row, name=name, listener=listener:
                          self._handshake_case(row, self._usable(name), listener, conns))

    def _handshake_case(self, row: dict[str, Any], target: Target, listener: str,
                        conns: int) -> None:
        sidecar = target.name.startswith("sidecar")
        if sidecar:
            cluster = {"tls-close-reuse": "nginx-tls-close-reuse",
                       "tls-close-noreuse": "nginx-tls-close-noreuse"}[listener]
            counter = _sidecar_handshakes
        else:
            cluster, counter = listener, _envoy_handshakes
        before = counter(target, cluster)
        self._wrk_case(row, target, listener, BODIES[100], conns)
        after = counter(target, cluster)
        if before is None or after is None:
            row["warnings"].append("no handshake counters (sidecar_tls_handshakes_total "
                                   "in /metrics, or Envoy's ssl.* stats)")
            return
        resumed = after[0] - before[0]
        full = after[1] - before[1]
        total = resumed + full
        row["handshakes"] = {
            "resumed": resumed, "full": full,
            "per_s_during_case": round(total / self.plan.duration, 1),
            "resumed_fraction": round(resumed / total, 4) if total else None,
        }
        if sidecar:
            row["tls_resumption_ratio"] = _resumption_ratio(target, cluster)


def _envoy_handshakes(target: Target, cluster: str) -> tuple[float, float] | None:
    """(resumed, full) from Envoy's cluster.<name>.ssl.handshake / ssl.session_reused."""
    if target.admin_port is None:
        return None
    try:
        text = http_request(target.admin_port, "/stats?filter=ssl").body.decode()
    except (OSError, BenchError):
        return None
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(f"cluster.{cluster}.ssl."):
            stats[name.rsplit(".", 1)[1]] = float(value)
    if "handshake" not in stats:
        return None
    resumed = stats.get("session_reused", 0.0)
    return resumed, stats["handshake"] - resumed


def _sidecar_metrics(target: Target) -> str | None:
    """The sidecar's /metrics text (None: no port to ask, or no answer)."""
    port = target.admin_port or target.status_port
    if port is None:
        return None
    try:
        return http_request(port, "/metrics").body.decode()
    except (OSError, BenchError):
        return None


def _sidecar_handshakes(target: Target, cluster: str) -> tuple[float, float] | None:
    """(resumed, full) from sidecar_tls_handshakes_total for `cluster` (cumulative, this run
    includes warm-up: callers take differences)."""
    text = _sidecar_metrics(target)
    if text is None:
        return None
    resumed = full = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith("sidecar_tls_handshakes_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if labels.get("cluster") != cluster:
            continue
        found = True
        value = float(line.rsplit(" ", 1)[1])
        if labels.get("resumed") == "true":
            resumed += value
        else:
            full += value
    return (resumed, full) if found else None


def settled_memory(proc: Proc, within: float = 10.0) -> dict[str, int]:
    """`proc.memory_kib()` once VmRSS has moved less than 64 KiB for a second (a process that
    has just said it is ready may still be finishing its start), or after `within` seconds."""
    deadline = time.monotonic() + within
    last = proc.memory_kib()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = proc.memory_kib()
        if abs(now["rss_kib"] - last["rss_kib"]) > 64:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            return now
    return proc.memory_kib()


def _sidecar_local_errors(target: Target) -> dict[str, float] | None:
    """sidecar_local_errors_total by code, all clusters summed (None: not a sidecar)."""
    if not target.name.startswith("sidecar"):
        return None
    text = _sidecar_metrics(target)
    if text is None:
        return None
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sidecar_local_errors_total{"):
            code = re.search(r'code="([^"]*)"', line)
            if code is not None:
                value = float(line.rsplit(" ", 1)[1])
                counts[code.group(1)] = counts.get(code.group(1), 0.0) + value
    return counts


def _resumption_ratio(target: Target, cluster: str) -> float | None:
    if target.admin_port is None:
        return None
    with contextlib.suppress(OSError, BenchError, ValueError, KeyError, TypeError):
        data = json.loads(http_request(target.admin_port, "/clusters").body)
        for item in data["clusters"]:
            if item["name"] == cluster:
                value = item.get("tls_resumption_ratio")
                return None if value is None else float(value)
    return None


def _judge(row: dict[str, Any]) -> None:
    """Turn error counts into warnings, or into an error when the figures can't be trusted."""
    requests = row.get("requests") or 0
    errors = {k: v for k, v in (row.get("errors") or {}).items() if v}
    bad = row.get("non_2xx", 0) + sum(v for k, v in errors.items() if k != "status")
    if not requests or not row.get("rps"):
        row["error"] = "no successful requests" + (f" (errors: {errors})" if errors else "")
    elif bad > 0.01 * requests:
        row["error"] = f"{bad} of {requests} requests failed ({errors}, non-2xx " \
                       f"{row.get('non_2xx', 0)})"
    elif bad:
        local = row.get("sidecar_local_errors")
        why = f"; the sidecar's own answers: {local}" if local else ""
        row["warnings"].append(f"{bad} failed requests ({errors}){why}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, BenchError) else f"{type(exc).__name__}: {text}"


def _progress(row: dict[str, Any]) -> str:
    head = f"{row['kind']:<13} {row['case']:<22} {row['target']:<20}"
    if row.get("error"):
        return f"{head} ERROR {row['error'][:200]}"
    cpu = (row.get("proxy") or {}).get("cpu_pct")
    return (f"{head} {row['rps']:>9,.0f} rps  p50 {row.get('p50_ms') or 0:.3f} ms  "
            f"p99 {row.get('p99_ms') or 0:.3f} ms" + (f"  cpu {cpu:.0f}%" if cpu else ""))


# -- metadata -----------------------------------------------------------------------------


def _version(cmd: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return "not found"
    m = re.search(pattern, done.stdout + done.stderr)
    return m.group(1) if m else "unknown"


def versions(plan: Plan) -> dict[str, str]:
    out = {"python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import uvloop

        out["uvloop"] = uvloop.__version__
    out["nginx"] = _version([shutil.which("nginx") or "nginx", "-v"], r"nginx/(\S+)")
    out["wrk"] = _version([shutil.which("wrk") or "wrk", "-v"], r"wrk (\S+)")
    if "envoy" in plan.targets:
        with contextlib.suppress(BenchError):
            out["envoy"] = _version([targets.envoy_binary(), "--version"],
                                    r"version: \S+?/(\d+\.\d+\.\d+)/")
    if "pproxy" in plan.targets:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out["pproxy"] = importlib.metadata.version("pproxy")
    if {"sidecar", "sidecar-fwd"} & set(plan.targets) and targets.sidecar_available() is None:
        version = _version([sys.executable, "-m", "sidecar", "--version"], r"sidecar (\S+)")
        out["sidecar"] = f"{version} ({sidecar_build()})"
    return out


def sidecar_build() -> str:
    """Which build of the request path the sidecar runs (setup.py): a figure is only worth
    quoting with it, since the pure-Python fallback costs about a quarter more CPU per request."""
    probe = "from sidecar._build import compiled; print(compiled())"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=60, check=False)
        answer = done.stdout.strip()
        if answer in ("True", "False"):
            return "mypyc-compiled" if answer == "True" else "pure Python, not compiled"
    return "build unknown"


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "mem_total_mib": mem}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# -- entry point --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Side-by-side benchmark: direct nginx, the sidecar, Envoy, pproxy.",
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 s per case, 1 s warm-up; docs untouched unless --docs")
    p.add_argument("--duration", type=float, help="measured seconds per case (default 10)")
    p.add_argument("--warmup", type=float,
                   help="warm-up seconds before each case (default 2, --quick 1; 0: none)")
    p.add_argument("--only", help=f"comma-separated targets among {','.join(ALL_TARGETS)}")
    p.add_argument("--tls", action="store_true", help="add the TLS cases (issue 4)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy record the sidecar during an extra 64-connection case "
                   "(max(10, duration) s at 200 Hz, not counted in the results)")
    p.add_argument("--profile-out", type=Path, default=BENCH / "results" / "profile.svg",
                   help="where --profile writes the flame graph")
    p.add_argument("--conns", default="16,64", help="wrk connection counts (default 16,64)")
    p.add_argument("--sizes", default="100,16384",
                   help=f"response sizes among {','.join(map(str, BODIES))}")
    p.add_argument("--rate", type=float, default=2000.0, help="fixed-rate req/s (default 2000)")
    p.add_argument("--rate-connections", type=int, default=16,
                   help="keep-alive connections of the fixed-rate run (default 16)")
    p.add_argument("--max-time", type=float, default=1800.0,
                   help="bound on the whole run in seconds; later cases become error rows")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    p.add_argument("--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md")
    p.add_argument("--docs", action="store_true", help="regenerate docs even with --quick")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep generated configs and process logs")
    p.add_argument("--keep-awake", action="store_true",
                   help="run a SCHED_IDLE busy loop on the proxy core so that it never idles "
                   "(on a VM, waking a halted vCPU adds milliseconds to a request)")
    p.add_argument("--priority", type=int, default=0,
                   help="nice value for every process started (e.g. -10 as root on a busy "
                   "machine; default 0)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run each throughput case N times, the targets taking turns, and "
                   "report per target the round with the median rps (this VM's speed swings "
                   "by up to 2x: 3 or 5 make the ratios trustworthy)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    bad_sizes = set(map(int, args.sizes.split(","))) - set(BODIES)
    if bad_sizes:
        p.error(f"--sizes: unsupported {sorted(bad_sizes)}; choose from {sorted(BODIES)}")
    return args


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_from_args(args)
    signal.signal(signal.SIGTERM, _sigterm)
    # This runner off the proxy's core, at --priority; the Runner uses the same cores.
    cores = pin_runner(args.priority)
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    workdir.chmod(0o755)  # nginx workers may run as another user
    runner = Runner(plan, workdir, verbose=not args.quiet, cores=cores)
    runner.profile_out = args.profile_out
    start_load = loadavg()
    started = dt.datetime.now(dt.UTC)
    status, fatal = 0, None
    try:
        runner.run()
    except KeyboardInterrupt:
        fatal, status = "interrupted", 130
    except SystemExit as exc:
        fatal, status = f"stopped by signal (exit {exc.code})", 1
    except Exception as exc:  # noqa: BLE001 - nginx failing to start ends the run, with a report
        fatal, status = _describe(exc), 1
    finally:
        runner.procs.stop_all()
        if args.keep_workdir:
            print(f"workdir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    notes = list(runner.notes)
    if fatal:
        notes.append(f"run ended early: {fatal}")
    for name, target in runner.targets.items():
        if isinstance(target, Target):
            notes += [f"{name}: {n}" for n in target.notes if not n.startswith("config:")]
    notes.append(f"wrk uses -t{THREADS}: it shares the load core with nginx, and a second "
                 "thread would only compete with nginx for it")
    notes.append(("wrk2 is not installed (nor packaged by apt here): " if not shutil.which("wrk2")
                  else "") + "the fixed-rate latency comes from bench/loadgen.py (uvloop, "
                 "keep-alive connections, time.perf_counter_ns per request)")
    result = {
        "meta": {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python bench/run.py" + (" " + shlex.join(argv if argv is not None
                                                                 else sys.argv[1:])).rstrip(),
            "machine": machine(),
            "pinning": {"proxy_core": min(runner.proxy_cores),
                        "load_core": min(runner.load_cores)},
            "loadavg": {"start": start_load, "end": loadavg()},
            "params": {"duration_s": plan.duration, "warmup_s": plan.warmup,
                       "wrk_threads": THREADS, "conns": plan.conns, "sizes": plan.sizes,
                       "rate": plan.rate, "rate_connections": plan.rate_conns,
                       "priority": args.priority, "keep_awake": plan.keep_awake,
                       "rounds": plan.rounds,
                       "targets": plan.targets, "tls": plan.tls, "quick": args.quick},
            "versions": versions(plan),
            "elapsed_s": round(time.monotonic() - runner.started, 1),
            "other_on_proxy_core_pct": _mean_other(runner.rows),
            "notes": notes,
        },
        "rows": runner.rows,
    }
    result["memory"] = report.memory_rows(runner.rows, runner.idle_memory)
    result["ratios"] = report.compute_ratios(runner.rows)
    result["goals"] = report.goal_checks(runner.rows, result["memory"])
    written = write_results(result, args.results_dir, started)
    print(report.terminal(result))
    print(f"\nresults: {written}")
    if not args.no_docs and (not args.quick or args.docs):
        docs = REPO / "docs" / "benchmarks.md"
        docs.parent.mkdir(exist_ok=True)
        docs.write_text(report.markdown(result, report.history(args.results_dir),
                                        report.other_benchmarks(args.results_dir)))
        print(f"docs:    {docs}")
    if fatal:
        print(f"run ended early: {fatal}", file=sys.stderr)
    return status


def _mean_other(rows: list[dict[str, Any]]) -> float | None:
    """Mean CPU share taken on the proxy's core by anything else while cases ran: the noise."""
    values = [r["cores"]["other_on_proxy_core_pct"] for r in rows
              if (r.get("cores") or {}).get("other_on_proxy_core_pct") is not None]
    return round(sum(values) / len(values), 1) if values else None


def write_results(result: dict[str, Any], results_dir: Path, started: dt.datetime) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    text = json.dumps(result, indent=2) + "\n"
    path.write_text(text)
    (results_dir / "latest.json").write_text(text)
    return path
