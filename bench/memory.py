"""Memory: what one sidecar costs a pod, at rest and per connection (a benchmark, not a test).

    python bench/memory.py [--connections 10000] [--pool 5000] [--loop uvloop]

Each figure comes from a fresh sidecar (a subprocess pinned to core 0, this process on core 1;
every address on 127.0.0.1, every process stopped by its PID), read from /proc once the figure
has settled:

- idle RSS after start with the embedded default (its three addresses moved to free ports),
  before and after the first /metrics scrape (prometheus-client is imported at that scrape);
- idle RSS with one `kubernetes` cluster (the tests' fake API server, real HTTPS and the watch
  protocol, one EndpointSlice of 3 endpoints, in-cluster authentication as in a pod);
- per idle app connection: `--connections` TCP connections opened to a listener and left
  silent; the RSS they add, divided by their number. Then each of them makes one keep-alive
  request to a small upstream server and stays open: an app connection after its first request
  (its parser and buffers exist), per connection. The requests go 64 at a time, so the pool
  holds about 64 upstream connections too;
- per idle pool entry: a cluster with `pool.min_idle` = `--pool` to a server that accepts and
  holds every connection; the RSS of that sidecar less that of the same sidecar with min_idle 0,
  divided by the entries. The same with `--tls-pool` TLS connections (a trustme CA; the
  server, in this process, completes each handshake and holds the connection).

RSS is VmRSS; "anon" is the anonymous part of it (smaps_rollup): the memory only this process
uses. The rest maps files (the interpreter, libssl, the extension modules), which the page cache
shares with every other process of the node that maps the same files.

It writes bench/results/memory-<time>.json, whose Markdown docs/benchmarks.md shows among the
other benchmarks (bench/report.py OTHER_BENCHMARKS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.procs import BenchError, Proc, Procs, free_port, http_request, wait_ready  # noqa: E402
from bench.upstream import TlsFiles, make_tls_files  # noqa: E402

SIDECAR_CORE = frozenset({0})
SETTLE = 1.0  # seconds the figure must stay within SETTLE_KIB before it is read
SETTLE_KIB = 64
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def memory(pid: int) -> dict[str, float]:
    """VmRSS and its anonymous part, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Anonymous:"):
            out["rss" if parts[0] == "Rss:" else "anon"] = int(parts[1]) / 1024
    return out


async def settled(proc: Proc, within: float = 20.0) -> dict[str, float]:
    """The memory once it has stopped moving (within SETTLE_KIB for SETTLE seconds)."""
    deadline = time.monotonic() + within
    last = memory(proc.pid)
    since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if not proc.alive():
            raise BenchError(proc.describe_exit())
        now = memory(proc.pid)
        if abs(now["rss"] - last["rss"]) * 1024 > SETTLE_KIB:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLE:
            return now
    return memory(proc.pid)


class Sidecar:
    def __init__(self, procs: Procs, args: argparse.Namespace, name: str,
                 config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.admin, self.status = free_port(), free_port()
        config = {"admin": {"address": f"127.0.0.1:{self.admin}"},
                  "status": {"address": f"127.0.0.1:{self.status}"},
                  "drain": {"grace": "1s", "accept_period": "0s"}, **config}
        path = procs.workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        full = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        full["PYTHONPATH"] = args.pythonpath or str(ROOT)
        full.update(env or {})
        cmd = [sys.executable, "-m", "sidecar", "run", "--config", str(path), "--loop", args.loop]
        # cwd: `python -m` puts it first on sys.path; it must not shadow --pythonpath.
        self.proc = procs.start(name, cmd, SIDECAR_CORE, env=full, cwd=procs.workdir)
        self.procs = procs
        wait_ready(self.proc, lambda: http_request(self.status, "/readyz").status == 200,
                   timeout=30)

    def get(self, path: str) -> Any:
        got = http_request(self.admin, path, timeout=10)
        if got.status != 200:
            raise BenchError(f"{path}: {got.status}")
        return json.loads(got.body) if path != "/metrics" else got.body

    def scrape(self) -> None:
        if b"sidecar_" not in self.get("/metrics"):
            raise BenchError("/metrics without sidecar_ families")

    def stop(self) -> None:
        self.procs.stop(self.proc)


def default_listener(port: int) -> dict[str, Any]:
    return {"name": "egress", "address": f"127.0.0.1:{port}",
            "forward_proxy": {"enabled": True, "allowed_hosts": ["*"], "connect": True}}


async def idle_default(procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    sidecar = Sidecar(procs, args, "default", {"listeners": [default_listener(free_port())]})
    try:
        before = await settled(sidecar.proc)
        sidecar.scrape()
        after = await settled(sidecar.proc)
        return {"idle": before, "idle_scraped": after}
    finally:
        sidecar.stop()


async def idle_kubernetes(procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    from tests.k8s.fake_apiserver import FakeApiServer

    ns, svc = "bench", "payments"
    async with FakeApiServer(procs.workdir / "apiserver") as fake:
        fake.put_slice(ns, {
            "metadata": {"name": f"{svc}-0", "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"127.0.9.{i}"], "conditions": {"ready": True}}
                          for i in range(1, 4)],
        })
        env = {**fake.env(), "POD_NAMESPACE": ns, "SIDECAR_SERVICEACCOUNT_DIR": str(fake.workdir)}
        config = {
            "listeners": [default_listener(free_port()),
                          {"name": "app", "address": f"127.0.0.1:{free_port()}",
                           "cluster": svc}],
            "clusters": [{"name": svc, "discovery": {"type": "kubernetes", "service": svc,
                                                     "namespace": ns, "port": "http"}}],
        }
        # The sidecar is started from a thread: the fake API server answers on this loop.
        sidecar = await asyncio.to_thread(Sidecar, procs, args, "kubernetes", config, env)
        try:
            deadline = time.monotonic() + 30
            while True:
                clusters = await asyncio.to_thread(sidecar.get, "/clusters")
                found = [c for c in clusters["clusters"] if c["name"] == svc]
                if found and len(found[0]["endpoints"]) == 3:
                    break
                if time.monotonic() > deadline:
                    raise BenchError("the kubernetes cluster never listed its 3 endpoints")
                await asyncio.sleep(0.1)
            return {"idle_kubernetes": await settled(sidecar.proc)}
        finally:
            await asyncio.to_thread(sidecar.stop)


class Upstream:
    """A loopback server: answers every request head with a small 200 (keep-alive), or with
    `hold` never answers and keeps every connection open. Counts connections accepted."""

    def __init__(self, hold: bool = False, tls: ssl.SSLContext | None = None) -> None:
        self.hold = hold
        self.tls = tls
        self.accepted = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096,
                                                 ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if not self.hold:
                    writer.write(OK)


async def until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not after {within:.0f} s")
        await asyncio.sleep(0.2)


async def per_connection(procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    n = args.connections
    async with Upstream() as upstream:
        port = free_port()
        config = {
            "listeners": [{"name": "app", "address": f"127.0.0.1:{port}", "cluster": "up",
                           "limits": {"max_connections": n + 100}}],
            "clusters": [{"name": "up", "discovery": {"type": "static",
                                                      "endpoints": [f"127.0.0.1:{upstream.port}"]},
                          "pool": {"max_connections": 256, "max_idle": 256}}],
            "access_log": False,
        }
        sidecar = await asyncio.to_thread(Sidecar, procs, args, "connections", config)
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            await asyncio.to_thread(sidecar.scrape)  # the metrics library loaded before, too
            base = await settled(sidecar.proc)
            gate = asyncio.Semaphore(256)

            async def connect() -> None:
                async with gate:
                    conns.append(await asyncio.open_connection("127.0.0.1", port))

            await asyncio.gather(*(connect() for _ in range(n)))
            await until(lambda: sidecar.get("/drain")["connections"] >= n, 60,
                        f"{n} app connections accepted")
            idle = await settled(sidecar.proc)
            gate = asyncio.Semaphore(64)

            async def one_request(rw: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
                async with gate:
                    reader, writer = rw
                    writer.write(b"GET / HTTP/1.1\r\nHost: up\r\n\r\n")
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise BenchError(f"unexpected answer {head[:40]!r}")
                    await reader.readexactly(2)

            await asyncio.gather(*(one_request(rw) for rw in conns))
            used = await settled(sidecar.proc)
            return {
                "connections": n, "base": base, "with_idle_connections": idle,
                "after_one_request": used, "pool_after_requests": upstream.accepted,
                "kib_per_idle_connection": round((idle["rss"] - base["rss"]) * 1024 / n, 2),
                "kib_per_connection_after_request": round(
                    (used["rss"] - base["rss"]) * 1024 / n, 2),
            }
        finally:
            for _, writer in conns:
                writer.close()
            await asyncio.to_thread(sidecar.stop)


async def per_pool_entry(procs: Procs, args: argparse.Namespace, m: int,
                         tls: TlsFiles | None = None) -> dict[str, Any]:
    """Idle pool entries, plain TCP or (with `tls`) TLS to a server that holds them."""
    figures = {}
    server_tls = None
    if tls is not None:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(tls.cert_pem, tls.key_pem)
    async with Upstream(hold=True, tls=server_tls) as holder:
        for min_idle in (0, m):
            pool = {"max_connections": max(m, 1), "max_idle": max(m, 1), "min_idle": min_idle}
            cluster: dict[str, Any] = {"name": "held", "pool": pool, "discovery": {
                "type": "static", "endpoints": [f"127.0.0.1:{holder.port}"]}}
            if tls is not None:
                cluster["tls"] = {"enabled": True, "ca_file": str(tls.ca_pem), "sni": "localhost"}
            config = {
                "listeners": [{"name": "app", "address": f"127.0.0.1:{free_port()}",
                               "cluster": "held"}],
                "clusters": [cluster],
                "access_log": False,
            }
            start = holder.accepted
            name = f"pool-{'tls-' if tls else ''}{min_idle}"
            sidecar = await asyncio.to_thread(Sidecar, procs, args, name, config)
            try:
                await asyncio.to_thread(sidecar.scrape)
                await until(lambda s=start, k=min_idle: holder.accepted - s >= k, 60,
                            f"{min_idle} pooled connections")
                figures[min_idle] = await settled(sidecar.proc)
            finally:
                await asyncio.to_thread(sidecar.stop)
                for w in holder.writers:
                    w.close()
                holder.writers.clear()
    return {"pool_entries": m, "pool_empty": figures[0], "pool_full": figures[m],
            "kib_per_pool_entry": round((figures[m]["rss"] - figures[0]["rss"]) * 1024 / m, 2)}


def _mib(figure: dict[str, float]) -> str:
    return f"{figure['rss']:.1f} MiB (anon {figure['anon']:.1f})"


def markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    c = r["connections"]
    p = r["pool"]
    return "\n".join([
        f"`python bench/memory.py --connections {args.connections} --pool {args.pool} "
        f"--tls-pool {args.tls_pool} --loop {args.loop}` ({r['build']})",
        "",
        "| what | RSS (anonymous part) |",
        "|---|---|",
        f"| idle after start, embedded default | {_mib(r['idle'])} |",
        f"| the same after its first /metrics scrape | {_mib(r['idle_scraped'])} |",
        f"| idle, one `kubernetes` cluster (3 endpoints, in-cluster auth) | "
        f"{_mib(r['idle_kubernetes'])} |",
        f"| {c['connections']:,} idle app connections (none has sent a byte) | "
        f"{_mib(c['with_idle_connections'])}: **{c['kib_per_idle_connection']} KiB each** "
        f"(from {c['base']['rss']:.1f} MiB) |",
        f"| the same connections after one keep-alive request each | "
        f"{_mib(c['after_one_request'])}: **{c['kib_per_connection_after_request']} KiB each** "
        f"(pool: {c['pool_after_requests']} upstream connections) |",
        f"| {p['pool_entries']:,} idle pool entries (plain TCP, `min_idle`) | "
        f"{_mib(p['pool_full'])}: **{p['kib_per_pool_entry']} KiB each** "
        f"(from {p['pool_empty']['rss']:.1f} MiB) |",
        *([f"| {t['pool_entries']:,} idle pool entries (TLS 1.3, `min_idle`) | "
           f"{_mib(t['pool_full'])}: **{t['kib_per_pool_entry']} KiB each** "
           f"(from {t['pool_empty']['rss']:.1f} MiB) |"] if (t := r.get("tls_pool")) else []),
        "",
        "Sizing a pod: RSS at rest plus the KiB per connection times the connections it holds "
        "(app side and pool side), plus headroom for requests in flight (see the peak under "
        "load in the throughput table).",
    ])


def build(args: argparse.Namespace) -> str:
    env = {**os.environ, "PYTHONPATH": args.pythonpath or str(ROOT)}
    import subprocess

    done = subprocess.run([sys.executable, "-c", "from sidecar._build import compiled; "
                           "print(compiled())"], capture_output=True, text=True, env=env,
                          timeout=60, check=False, cwd=tempfile.gettempdir())
    return {"True": "mypyc-compiled", "False": "pure Python"}.get(done.stdout.strip(),
                                                                   "build unknown")


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    procs = Procs(work)
    try:
        result: dict[str, Any] = {"build": build(args)}
        result.update(await idle_default(procs, args))
        result.update(await idle_kubernetes(procs, args))
        result["connections"] = await per_connection(procs, args)
        result["pool"] = await per_pool_entry(procs, args, args.pool)
        if args.tls_pool:
            tls = make_tls_files(work)
            result["tls_pool"] = await per_pool_entry(procs, args, args.tls_pool, tls)
        return result
    finally:
        procs.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--tls-pool", type=int, default=1000,
                        help="TLS pool entries (needs trustme; 0: skip)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--pythonpath", help="run the sidecar from this checkout")
    parser.add_argument("--workdir", type=Path, help="keep logs and configs here")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/...)")
    args = parser.parse_args()
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {1})  # the sidecar has core 0 to itself
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(args, work))
    table = markdown(result, args)
    print(json.dumps(result, indent=1))
    print()
    print(table)
    out = report.result_path("memory", args.out)
    report.record_run(out, {"args": report.args_record(args) | {"out": str(out)}, **result,
                            "markdown": table}, args.out is not None)


if __name__ == "__main__":
    main()
