"""Discovery at scale: what an EndpointSlice event costs the sidecar (a benchmark, not a test).

    python bench/discovery_scale.py --endpoints 1000 5000 20000 --rate 10 --seconds 30

For each size it starts the fake Kubernetes API server of the tests (real HTTPS, the watch
protocol on the wire) with N/100 slices of 100 endpoints, and one sidecar (a subprocess,
pinned to core 0; this process and the fake on core 1) with one `kubernetes` cluster on that
Service, authenticated in-cluster. Then:

- convergence: seconds from the sidecar's start until `/clusters` lists every endpoint;
- idle RSS after that;
- churn: `--rate` slice events per second for `--seconds` (each flips one endpoint of a random
  slice between ready and terminating), while `/healthz` on the admin port is asked every
  20 ms; the sidecar's CPU over the churn, less what the same probing costs without events
  (`--baseline` seconds, measured first), divided by the events gives CPU per event;
- the largest event-loop lag: the largest bucket `sidecar_event_loop_lag_seconds` filled during
  the churn (its timer ticks every 250 ms, so it can miss short stalls), and the slowest
  `/healthz` answer, which cannot;
- exact convergence after churn: seconds until every endpoint's `terminating` in `/clusters`
  matches what the fake serves.

Every address is in 127.0.0.0/8 and no endpoint is ever connected to (no health checks, no
prewarm). Every process is stopped by its PID. `--pythonpath DIR` runs the sidecar from another
checkout (e.g. the code before a change, side by side); `--kubeconfig` authenticates through a
kubeconfig instead (needed for code that predates SIDECAR_SERVICEACCOUNT_DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.procs import BenchError, Procs, free_port  # noqa: E402
from tests.k8s.fake_apiserver import FakeApiServer  # noqa: E402

NS, SVC = "bench", "payments"
PER_SLICE = 100


def address(i: int) -> str:
    return f"127.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def slice_body(index: int, states: list[bool]) -> dict[str, Any]:
    """One EndpointSlice as the API serves it; `states[j]`: endpoint j is terminating."""
    base = index * PER_SLICE
    endpoints = []
    for j, terminating in enumerate(states):
        conditions = (
            {"ready": False, "serving": True, "terminating": True}
            if terminating
            else {"ready": True, "serving": True, "terminating": False}
        )
        endpoints.append(
            {
                "addresses": [address(base + j)],
                "conditions": conditions,
                "targetRef": {"kind": "Pod", "name": f"{SVC}-{base + j}", "namespace": NS},
                "nodeName": f"node-{(base + j) % 50}",
                "zone": f"zone-{(base + j) % 3}",
            }
        )
    return {
        "metadata": {
            "name": f"{SVC}-{index:05d}",
            "labels": {
                "kubernetes.io/service-name": SVC,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


class Admin:
    """A keep-alive HTTP/1.1 client to the sidecar's admin port (asyncio streams)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self._rw is None:
            self._rw = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self._rw
        writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            match = re.search(rb"(?i)content-length: *(\d+)", head)
            if match:
                body = await reader.readexactly(int(match.group(1)))
            else:  # chunked
                chunks = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    data = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    chunks.append(data[:-2])
                body = b"".join(chunks)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            raise
        return status, body

    def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None


def lag_buckets(metrics: bytes) -> dict[float, float]:
    out: dict[float, float] = {}
    for line in metrics.decode().splitlines():
        m = re.match(r'sidecar_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            out[float(m.group(1))] = float(m.group(2))
    return out


def largest_lag_bucket(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The upper bound of the largest lag bucket that gained observations (cumulative
    buckets: the smallest bound whose count equals the total is where the largest sits)."""
    total = after.get(float("inf"), 0) - before.get(float("inf"), 0)
    if total <= 0:
        return None
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0) >= total:
            return bound
    return None


def discovery_updates(metrics: bytes) -> float:
    m = re.search(rb'sidecar_discovery_updates_total\{cluster="%s"\} (\S+)' % SVC.encode(), metrics)
    return float(m.group(1)) if m else float("nan")


def cluster_state(body: bytes) -> dict[str, bool]:
    doc = json.loads(body)
    for c in doc["clusters"]:
        if c["name"] == SVC:
            return {e["address"]: bool(e["terminating"]) for e in c["endpoints"]}
    return {}


async def measure(args: argparse.Namespace, n: int, work: Path) -> dict[str, Any]:
    slices = n // PER_SLICE
    rng = random.Random(n)
    states = [[False] * PER_SLICE for _ in range(slices)]
    procs = Procs(work)
    async with FakeApiServer(work / f"apiserver-{n}") as fake:
        for i in range(slices):
            fake.put_slice(NS, slice_body(i, states[i]))
        admin_port, status_port, listen_port = free_port(), free_port(), free_port()
        config = {
            "admin": {"address": f"127.0.0.1:{admin_port}"},
            "status": {"address": f"127.0.0.1:{status_port}"},
            "listeners": [
                {"name": "app", "address": f"127.0.0.1:{listen_port}", "cluster": SVC}
            ],
            "clusters": [
                {
                    "name": SVC,
                    "discovery": {
                        "type": "kubernetes", "service": SVC, "namespace": NS, "port": "http"
                    },
                }
            ],
            "access_log": False,
        }
        cfg = work / f"sidecar-{n}.json"
        cfg.write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env["PYTHONPATH"] = args.pythonpath or str(ROOT)
        env["POD_NAMESPACE"] = NS
        if args.kubeconfig:
            env["KUBECONFIG"] = str(fake.write_kubeconfig(namespace=NS))
        else:
            env.update(fake.env())
            env["SIDECAR_SERVICEACCOUNT_DIR"] = str(fake.workdir)
        cmd = [sys.executable, "-m", "sidecar", "run", "--config", str(cfg), "--loop", args.loop]
        t0 = time.monotonic()
        # cwd: `python -m` puts it first on sys.path; it must not shadow --pythonpath.
        proc = procs.start(f"sidecar-{n}", cmd, frozenset({0}), env=env, cwd=work)
        admin = Admin(admin_port)
        try:
            # Converged: every endpoint listed.
            deadline = time.monotonic() + 120
            while True:
                if not proc.alive():
                    raise BenchError(proc.describe_exit())
                if time.monotonic() > deadline:
                    raise BenchError(f"{n} endpoints not converged after 120 s")
                try:
                    code, body = await admin.get("/clusters")
                    if code == 200 and len(cluster_state(body)) == n:
                        break
                except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
                    pass
                await asyncio.sleep(0.05)
            converged = time.monotonic() - t0
            await asyncio.sleep(2.0)
            idle = proc.memory_kib()["rss_kib"] / 1024

            # Churn, with /healthz asked every 20 ms on its own connection.
            _, before_metrics = await admin.get("/metrics")
            probe = Admin(admin_port)
            latencies: list[float] = []
            stop = asyncio.Event()

            async def prober() -> None:
                while not stop.is_set():
                    start = time.perf_counter()
                    await probe.get("/healthz")
                    latencies.append((time.perf_counter() - start) * 1000)
                    await asyncio.sleep(0.02)

            task = asyncio.create_task(prober())
            # The same probing without events: the baseline the events' cost is measured from.
            base0 = proc.cpu_seconds()
            await asyncio.sleep(args.baseline)
            baseline_rate = (proc.cpu_seconds() - base0) / args.baseline
            quiet = sorted(latencies)
            latencies.clear()
            cpu0, peak = proc.cpu_seconds(), idle
            events, interval = 0, 1.0 / args.rate
            start = time.monotonic()
            next_at = start
            while time.monotonic() - start < args.seconds:
                i, j = rng.randrange(slices), rng.randrange(PER_SLICE)
                states[i][j] = not states[i][j]
                fake.put_slice(NS, slice_body(i, states[i]))
                events += 1
                if events % args.rate == 0:
                    peak = max(peak, proc.memory_kib()["rss_kib"] / 1024)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            elapsed = time.monotonic() - start
            cpu = proc.cpu_seconds() - cpu0
            stop.set()
            await task
            probe.close()
            _, after_metrics = await admin.get("/metrics")

            # Exact convergence after the churn.
            want = {
                address(i * PER_SLICE + j): states[i][j]
                for i in range(slices)
                for j in range(PER_SLICE)
            }
            want = {f"{ip}:8080": t for ip, t in want.items()}
            t1 = time.monotonic()
            while True:
                _, body = await admin.get("/clusters")
                if cluster_state(body) == want:
                    break
                if time.monotonic() - t1 > 60:
                    raise BenchError("not converged 60 s after the churn")
                await asyncio.sleep(0.01)
            settled = time.monotonic() - t1
            peak = max(peak, proc.memory_kib()["rss_kib"] / 1024)
        finally:
            admin.close()
            procs.stop_all()
    latencies.sort()
    lag = largest_lag_bucket(lag_buckets(before_metrics), lag_buckets(after_metrics))
    return {
        "endpoints": n,
        "slices": slices,
        "events": events,
        "updates_applied": discovery_updates(after_metrics) - discovery_updates(before_metrics),
        "rate": round(events / elapsed, 1),
        "cpu_pct": round(100 * cpu / elapsed, 1),
        "baseline_cpu_pct": round(100 * baseline_rate, 1),
        "cpu_ms_per_event": round(1000 * (cpu - baseline_rate * elapsed) / events, 2),
        "loop_lag_max_bucket_ms": None if lag is None else lag * 1000,
        "healthz_p50_ms": round(statistics.median(latencies), 2),
        "healthz_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "healthz_max_ms": round(latencies[-1], 2),
        "healthz_quiet_p99_ms": round(quiet[int(len(quiet) * 0.99) - 1], 2) if quiet else None,
        "rss_idle_mib": round(idle, 1),
        "rss_peak_mib": round(peak, 1),
        "converged_from_start_s": round(converged, 2),
        "settled_after_churn_ms": round(settled * 1000, 1),
    }


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [
        f"`python bench/discovery_scale.py --endpoints {' '.join(map(str, args.endpoints))} "
        f"--rate {args.rate} --seconds {args.seconds} --loop {args.loop}"
        f"{' --kubeconfig' if args.kubeconfig else ''}`",
        "",
        "| endpoints (slices) | events/s | sidecar CPU (idle) | CPU per event | largest loop lag "
        "(bucket) | `/healthz` p50 / p99 / max (p99 without events) | RSS idle / peak | "
        "converged from start | settled after churn |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bound = r["loop_lag_max_bucket_ms"]
        lag = "—" if bound is None else f"≤ {bound:g} ms"
        out.append(
            f"| {r['endpoints']:,} ({r['slices']}) | {r['rate']} | {r['cpu_pct']} % "
            f"({r['baseline_cpu_pct']} %) | "
            f"{r['cpu_ms_per_event']} ms | {lag} | {r['healthz_p50_ms']} / "
            f"{r['healthz_p99_ms']} / {r['healthz_max_ms']} ms ({r['healthz_quiet_p99_ms']}) | "
            f"{r['rss_idle_mib']} / "
            f"{r['rss_peak_mib']} MiB | {r['converged_from_start_s']} s | "
            f"{r['settled_after_churn_ms']} ms |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--rate", type=int, default=10, help="slice events per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="churn per size")
    parser.add_argument("--baseline", type=float, default=10.0,
                        help="seconds of probing without events, for the CPU baseline")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--pythonpath", help="run the sidecar from this checkout")
    parser.add_argument("--kubeconfig", action="store_true", help="authenticate by kubeconfig")
    parser.add_argument("--compare", type=Path,
                        help="Markdown to show under the table (e.g. the same run of older code)")
    parser.add_argument("--workdir", type=Path, help="keep logs and configs here")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/...)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})  # the sidecar has core 0 to itself
    rows = []
    with tempfile.TemporaryDirectory(prefix="discovery-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for n in args.endpoints:
            row = asyncio.run(measure(args, n, work))
            print(json.dumps(row), flush=True)
            rows.append(row)
    table = markdown(rows, args)
    print()
    print(table)
    out = report.result_path("discovery", args.out)
    record = {"args": report.args_record(args) | {"out": str(out)}, "rows": rows,
              "markdown": table}
    if args.compare:
        record["markdown"] = table + "\n\n" + args.compare.read_text().strip()
    report.record_run(out, record, args.out is not None)


if __name__ == "__main__":
    main()
