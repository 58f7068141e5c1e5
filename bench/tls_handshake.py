"""Upstream TLS handshakes per second: the sidecar and Envoy side by side (a benchmark, not a test).

    python bench/tls_handshake.py --duration 10 --rounds 3

The upstream is nginx (one worker) closing after every response (`keepalive_timeout 0`), with a
session cache and tickets on, so a client that offers its last session resumes. It listens
twice: TLS 1.3 only and TLS 1.2 only. Each proxy (the sidecar, as built in this checkout, and
`envoy --concurrency 1`) runs on core 0 with one listener per TLS version, routing to a
cluster of that nginx server; wrk (16 keep-alive HTTP/1.1 connections to the proxy) and nginx
share core 1. Since the upstream closes after every response, every request the proxy forwards
opens a new upstream connection: upstream handshakes/s = requests/s.

Per case (version x proxy, the proxies taking turns, `--rounds` times; the row shown is the
round with the median rate): requests/s (wrk); handshakes and the resumed share, counted by
nginx itself (`$ssl_session_reused` in an access log per server); the proxy's CPU per
handshake (its CPU time over the case / handshakes); its RSS after the case and its peak.
Results: bench/results/tls-handshake-<time>.json, and docs/benchmarks.md's "other benchmarks".
Every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report, targets  # noqa: E402
from bench.harness import pick_cores, pin_self, sidecar_build  # noqa: E402
from bench.procs import (  # noqa: E402
    Proc,
    Procs,
    core_busy_pct,
    core_times,
    free_port,
    http_request,
    wait_ready,
    workspace,
)
from bench.upstream import (  # noqa: E402
    BODIES,
    Nginx,
    TlsFiles,
    make_tls_files,
    nginx_binary,
    nginx_head,
    run_nginx,
    serve_files,
    tls_server,
)
from bench.wrk import lua_script, run_wrk  # noqa: E402

VERSIONS = ("TLSv1.3", "TLSv1.2")
PATH = BODIES[100]


def _server(port: int, version: str, tls: TlsFiles, www: Path, log: Path) -> str:
    """One TLS version only, closing after every response, its handshakes in `log`."""
    return tls_server(port, tls, www, close_each=True, protocols=version,
                      cache=f"SSL{version[-1]}", access_log=f"{log} handshake")


def start_origin(procs: Procs, cores: frozenset[int], tls: TlsFiles) -> tuple[Nginx, dict]:
    """nginx with a plain port (readiness) and one closing TLS server per version."""
    nginx_binary()  # before anything is written
    work = procs.workdir
    www = serve_files(work, {100: PATH})
    plain = free_port()
    servers = {v: {"port": free_port(), "log": work / f"access-{v}.log"} for v in VERSIONS}
    conf = nginx_head(work, "bench/tls_handshake.py") + f"""\
    log_format handshake '$ssl_protocol $ssl_session_reused';
    sendfile on;
    server {{
        listen 127.0.0.1:{plain} backlog=4096;
        location = /healthz {{ return 200 "ok\\n"; }}
    }}
{"".join(_server(s["port"], v, tls, www, s["log"]) for v, s in servers.items())}
}}
"""
    proc = run_nginx(procs, "nginx.conf", conf, cores, plain)
    return Nginx(proc, plain, tls=tls), servers


def start_sidecar(procs: Procs, nginx: Nginx, servers: dict, cores: frozenset[int],
                  checkout: Path | None = None, name: str = "sidecar") -> targets.Target:
    """The sidecar of this checkout, or (`checkout`) of another one, e.g. the code before a
    change, measured side by side in the same run."""
    assert nginx.tls is not None
    admin, status = free_port(), free_port()
    config = targets._sidecar_base(admin, status)
    tls = {"enabled": True, "ca_file": str(nginx.tls.ca_pem), "sni": nginx.tls.sni}
    ports = {"admin": admin, "status": status}
    config["listeners"], config["clusters"] = [], []
    for version, server in servers.items():
        ports[version] = free_port()
        config["clusters"].append(targets._static_cluster(version, server["port"], dict(tls)))
        config["listeners"].append({"name": version, "address": f"127.0.0.1:{ports[version]}",
                                    "protocol": "http", "cluster": version})
    if checkout is None:
        return targets.start_sidecar(procs, name, config, ports, nginx, cores)
    path = procs.workdir / f"{name}.yaml"
    path.write_text(targets._yaml(config))
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cmd = [sys.executable, "-m", "sidecar", "run", "--config", str(path)]
    proc = procs.start(name, cmd, cores, env=env, cwd=checkout)
    admin = ports.pop("admin")
    ports.pop("status")
    wait_ready(proc, lambda: http_request(admin, "/readyz").status == 200, timeout=20)
    return targets.Target(name, "route", ports, ("127.0.0.1", nginx.port), proc,
                          admin_port=admin)


def start_envoy(procs: Procs, nginx: Nginx, servers: dict, cores: frozenset[int]
                ) -> targets.Target:
    assert nginx.tls is not None
    # Envoy's upstream TLS stops at 1.2 unless told otherwise (tls_maximum_protocol_version).
    ctx = {"sni": nginx.tls.sni, "common_tls_context": {
        "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
        "validation_context": {"trusted_ca": {"filename": str(nginx.tls.ca_pem)}}}}
    admin = free_port()
    ports, listeners, clusters = {}, [], []
    for version, server in servers.items():
        name = version.replace(".", "")
        ports[version] = free_port()
        clusters.append(targets._envoy_cluster(name, server["port"], ctx))
        listeners.append(targets._envoy_listener(name, ports[version], name))
    path = procs.workdir / "envoy.json"
    path.write_text(json.dumps(targets.envoy_bootstrap(admin, listeners, clusters), indent=1))
    cmd = [targets.envoy_binary(), "-c", str(path), "--concurrency", "1",
           "--disable-hot-restart", "-l", "warning", "--base-id", str(admin)]
    proc = procs.start("envoy", cmd, cores)
    wait_ready(proc, lambda: http_request(admin, "/ready").status == 200, timeout=30)
    return targets.Target("envoy", "route", ports, ("127.0.0.1", nginx.port), proc,
                          admin_port=admin)


def _log_counts(log: Path, offset: int) -> tuple[int, int, int]:
    """(new offset, handshakes, resumed) from the access log lines after `offset`."""
    with log.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    lines = data[:end].splitlines()
    return offset + end, len(lines), sum(1 for line in lines if line.endswith(b" r"))


def measure(target: targets.Target, version: str, server: dict, args: argparse.Namespace,
            cores: tuple[frozenset[int], frozenset[int]], origin: Proc, work: Path
            ) -> dict[str, Any]:
    proxy, load = cores
    row: dict[str, Any] = {"target": target.name, "version": version}
    script = lua_script(work, f"{target.name}-{version}", None, None)
    url = target.url(PATH, version)
    if args.warmup > 0:
        run_wrk(url, connections=args.conns, duration=args.warmup, script=script, cores=load)
    log: Path = server["log"]
    offset = log.stat().st_size if log.exists() else 0
    proc: Proc | None = target.proc
    assert proc is not None
    cpu0, origin0, jiffies0 = proc.cpu_seconds(), origin.cpu_seconds(), core_times()
    figures = run_wrk(url, connections=args.conns, duration=args.duration, script=script,
                      cores=load)
    cpu, jiffies = proc.cpu_seconds() - cpu0, core_times()
    origin_cpu = origin.cpu_seconds() - origin0
    time.sleep(0.2)  # nginx writes its log line after the response: let the last ones land
    _, handshakes, resumed = _log_counts(log, offset)
    memory = proc.memory_kib()
    row.update(
        rps=round(figures["rps"], 1), p99_ms=figures["p99_ms"],
        errors=figures["errors"], non_2xx=figures["non_2xx"],
        handshakes=handshakes, resumed=resumed,
        resumed_share=round(resumed / handshakes, 4) if handshakes else None,
        cpu_us_per_handshake=round(1e6 * cpu / handshakes, 1) if handshakes else None,
        cpu_share=round(cpu / args.duration, 3),
        # What bounds a case where the proxy is not busy: nginx's TLS work, on the load core.
        origin_cpu_share=round(origin_cpu / args.duration, 3),
        proxy_core_busy_pct=core_busy_pct(jiffies0, jiffies, min(proxy)),
        load_core_busy_pct=core_busy_pct(jiffies0, jiffies, min(load)),
        rss_mib=round(memory["rss_kib"] / 1024, 1), peak_rss_mib=round(memory["hwm_kib"] / 1024, 1),
    )
    failed = figures["non_2xx"] + sum(figures["errors"].values())
    if failed:
        row["error"] = f"{failed} failed requests (non-2xx or socket errors)"
    return row


def _bound(row: dict[str, Any]) -> str:
    """What limited the case: the proxy's core (its CPU), else the load core (wrk and nginx,
    or other work on the machine), else latency. A rate ratio means something only between
    rows bound by the proxy; CPU/handshake compares in every case."""
    if row["cpu_share"] >= 0.9:
        return "proxy CPU"
    if (row.get("load_core_busy_pct") or 0) >= 90:
        return "load core"
    if (row.get("proxy_core_busy_pct") or 0) >= 90:
        return "proxy core (shared)"
    return "latency"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"{meta['date']}; sidecar {meta['build']}; {meta['conns']} app connections (HTTP/1.1 "
        f"keep-alive) to the proxy; nginx closes after every response; {meta['duration']} s per "
        f"case, median of {meta['rounds']} rounds; each proxy on one core.",
        "",
        "| TLS | proxy | handshakes/s | vs Envoy | resumed | CPU/handshake | proxy CPU "
        "| nginx CPU | load core busy | bound by | RSS | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for version in VERSIONS:
        envoy = next((r for r in rows if r["version"] == version and r["target"] == "envoy"), None)
        for row in (r for r in rows if r["version"] == version):
            ratio = (f"{row['rps'] / envoy['rps']:.2f} x" if envoy and envoy["rps"] else "")
            share = row["resumed_share"]
            if row.get("error"):
                lines.append(f"| {version} | {row['target']} | error: {row['error']} |||||||||||")
                continue
            lines.append(
                f"| {version} | {row['target']} | {row['rps']:,.0f} | {ratio} | "
                f"{'' if share is None else f'{100 * share:.1f} %'} | "
                f"{row['cpu_us_per_handshake'] or ''} µs | {100 * row['cpu_share']:.0f} % | "
                f"{100 * row['origin_cpu_share']:.0f} % | {row['load_core_busy_pct']} % | "
                f"{_bound(row)} | "
                f"{row['rss_mib']} MiB | "
                f"{row['peak_rss_mib']} MiB |")
    lines += [
        "",
        "Handshakes/s = requests/s (every request opens an upstream connection); resumed: "
        "nginx's `$ssl_session_reused`; CPU/handshake: the proxy's CPU time over the case / "
        "handshakes; proxy CPU: its share of its core; nginx CPU and load core busy: what bounds "
        "a case where the proxy's share is well under 100 % (then the rate ratio says little and "
        "CPU/handshake is the comparison). Envoy (BoringSSL) uses a TLS 1.3 "
        "ticket once and keeps one session per cluster, so with 16 connections at once most of "
        "its TLS 1.3 handshakes are full ones.",
    ]
    if meta.get("before"):
        lines.append(
            f"`sidecar-before`: the same config and build kind, run from {meta['before']}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--only", default="sidecar,envoy")
    parser.add_argument("--before", type=Path,
                        help="also run the sidecar of this checkout, as `sidecar-before`")
    parser.add_argument("--before-label", help="what --before is, for the table (e.g. a commit)")
    parser.add_argument("--priority", type=int, default=0,
                        help="nice value of every process started (-10 as root: see bench/README)")
    parser.add_argument("--workdir", type=Path, help="keep logs and configs here")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/...)")
    args = parser.parse_args()
    proxy, load, notes = pick_cores()
    pin_self(load, args.priority)
    started: dict[str, Any] = {"sidecar": start_sidecar, "envoy": start_envoy}
    wanted = [n for n in args.only.split(",") if n]
    if args.before:
        before = args.before.resolve()
        started["sidecar-before"] = lambda *a: start_sidecar(*a, checkout=before,
                                                             name="sidecar-before")
        wanted.append("sidecar-before")
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with workspace("tls-handshake-", args.workdir) as procs:
        work = procs.workdir
        nginx, servers = start_origin(procs, load, make_tls_files(work))
        running = {name: started[name](procs, nginx, servers, proxy) for name in wanted}
        for n in range(args.rounds):
            for version in VERSIONS:
                for name in (wanted if n % 2 == 0 else wanted[::-1]):
                    row = measure(running[name], version, servers[version], args,
                                  (proxy, load), nginx.proc, work)
                    print(json.dumps(row), flush=True)
                    rounds.setdefault((version, name), []).append(row)
    rows = []
    for group in rounds.values():
        median = statistics.median_low([r["rps"] for r in group])
        row = next(r for r in group if r["rps"] == median)
        row["rounds_rps"] = [r["rps"] for r in group]
        rows.append(row)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "build": sidecar_build(),
            "before": (args.before_label or str(args.before)) if args.before else None,
            "conns": args.conns, "duration": args.duration, "rounds": args.rounds,
            "priority": args.priority, "notes": notes}
    table = markdown(rows, meta)
    print()
    print(table)
    report.record_run(report.result_path("tls-handshake", args.out),
                      {"args": report.args_record(args), "meta": meta, "rows": rows,
                       "markdown": table}, args.out is not None)


if __name__ == "__main__":
    main()
