"""`python bench/soak.py --minutes N`: mixed load through one sidecar while a chaos loop runs.

A benchmark, not a test: it reports, it does not assert (the exit code says whether the run
met its bar: 0 idempotent requests lost, RSS and open descriptors back within 10 %).

Setup, all on 127.0.0.1: three endpoints (aiohttp processes started by this script in
`--endpoint` mode, each with an HTTP port and a TCP echo port) behind one sidecar: a cluster
`mixed` over the three (round robin, HTTP health checks every second), a cluster `tcp` over
their echo ports behind a TCP listener, and the forward proxy (absolute form and CONNECT)
allowed to 127.0.0.1. The sidecar runs pinned to one core, the endpoints and the load to the
other, as bench/run.py does.

Load: `--workers` threads, each a closed loop over a weighted mix of operations:
  ka_small   GET 100 B on the worker's keep-alive connection
  close_small GET 100 B on a new connection with Connection: close
  fwd_small  GET 100 B through the forward proxy (absolute-form)
  get_1mib   GET 1 MiB on the keep-alive connection
  put_1mib   PUT 1 MiB (idempotent by method; too large to replay: an error is reported)
  post_small POST 1 KiB (not idempotent: may fail with an x-sidecar-error, never retried)
  post_key   POST 1 KiB with Idempotency-Key (idempotent)
  connect    CONNECT tunnel to an endpoint, then a GET inside it
  websocket  Upgrade through the sidecar, three echoed messages
  tcp        64 KiB through the TCP listener and back
Every HTTP body the endpoints send carries `x-sha256`; the client checks it.

Chaos, between a calm warm-up and a calm cool-down: endpoint `a` is restarted (SIGTERM, down
for 2 s, started again) every `--restart-every` seconds; endpoint `b` resets (RST, before any
response byte) `--reset-pct` % of its requests throughout; the config file is rewritten and
POST /reload sent every `--reload-every` seconds; endpoint `c`'s /healthz fails for 5 s every
`--flip-every` seconds.

What is lost: an idempotent HTTP request (GET, PUT, or POST with Idempotency-Key) that got no
response at all (the connection failed or timed out before a status line), or whose body was
corrupted or truncated while its framing said it was complete (checksum or length mismatch on
a message the client read to its end). A response with `x-sidecar-error` is not lost: the app
was told. A body cut mid-way and signalled as such (the connection broken before the framing
completed) is counted as `truncated`, apart from the lost ones.

RSS and open descriptors of the sidecar are sampled every 10 s; "flat" compares the sample at
the end of the warm-up with the one at the end of the cool-down (descriptors less the pooled
upstream connections /clusters reports, which follow the pools), both under the same load with
the chaos off, each with the load held for a moment (every worker between two operations, its
keep-alive connection closed) so that no request or app connection in flight is counted.
Event-loop lag p99 is read from /metrics (`sidecar_event_loop_lag_seconds`)
over the same span. Results: a Markdown block on stdout and bench/results/soak-<ts>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import pick_cores  # noqa: E402
from bench.procs import BenchError, Proc, Procs, free_port, port_open, wait_ready  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
OP_TIMEOUT = 10.0  # no client operation waits longer
SAMPLE_EVERY = 10.0
IDEMPOTENT = {"ka_small", "close_small", "fwd_small", "get_1mib", "put_1mib", "post_key"}
MIX = {"ka_small": 30, "close_small": 10, "fwd_small": 8, "get_1mib": 6, "put_1mib": 3,
       "post_small": 10, "post_key": 8, "connect": 5, "websocket": 4, "tcp": 6}


# --- endpoint mode: one aiohttp process per endpoint ------------------------------------------
def run_endpoint(http_port: int, tcp_port: int, name: str, reset_pct: float) -> None:
    import asyncio

    from aiohttp import WSMsgType, web

    rng = random.Random(http_port)
    big = rng.randbytes(MIB)
    small = (name.encode() * 100)[:100]
    state = {"healthy": True, "reset_pct": reset_pct}

    def signed(body: bytes, status: int = 200) -> web.Response:
        return web.Response(status=status, body=body,
                            headers={"x-sha256": hashlib.sha256(body).hexdigest()})

    def maybe_reset(request: web.Request) -> bool:
        if state["reset_pct"] and rng.random() * 100 < state["reset_pct"]:
            transport = request.transport
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
                transport.abort()
            return True
        return False

    async def small_h(request: web.Request) -> web.StreamResponse:
        if maybe_reset(request):
            return web.Response(status=500)  # never sent: the connection is gone
        return signed(small)

    async def big_h(request: web.Request) -> web.StreamResponse:
        if maybe_reset(request):
            return web.Response(status=500)
        return signed(big)

    async def echo_h(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if maybe_reset(request):
            return web.Response(status=500)
        answer = json.dumps({"len": len(body), "sha": hashlib.sha256(body).hexdigest(),
                             "endpoint": name}).encode()
        return signed(answer)

    async def health_h(request: web.Request) -> web.Response:
        return web.Response(status=200 if state["healthy"] else 503, text=name)

    async def chaos_h(request: web.Request) -> web.Response:
        if "healthy" in request.query:
            state["healthy"] = request.query["healthy"] == "1"
        return web.Response(text=json.dumps(state))

    async def ws_h(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

        def eof_received(self) -> bool:
            return False

    async def main() -> None:
        app = web.Application(client_max_size=4 * MIB)
        app.router.add_get("/small", small_h)
        app.router.add_get("/big", big_h)
        app.router.add_route("*", "/echo", echo_h)
        app.router.add_get("/healthz", health_h)
        app.router.add_post("/_chaos", chaos_h)
        app.router.add_get("/ws", ws_h)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", http_port, reuse_address=True).start()
        loop = asyncio.get_running_loop()
        tcp = await loop.create_server(Echo, "127.0.0.1", tcp_port, reuse_address=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print("ready", flush=True)
        await stop.wait()
        tcp.close()
        await runner.cleanup()  # graceful: in-flight requests finish (within shutdown_timeout)

    asyncio.run(main())


@dataclass
class Endpoint:
    name: str
    http_port: int
    tcp_port: int
    reset_pct: float
    proc: Proc | None = None

    def start(self, procs: Procs, cores: frozenset[int]) -> None:
        self.proc = procs.start(
            f"endpoint-{self.name}",
            [sys.executable, str(Path(__file__).resolve()), "--endpoint", str(self.http_port),
             "--endpoint-tcp", str(self.tcp_port), "--endpoint-name", self.name,
             "--reset-pct", str(self.reset_pct)],
            cores, env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_ready(self.proc, lambda: port_open(self.http_port) and port_open(self.tcp_port))

    def stop(self, procs: Procs) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None

    def chaos(self, query: str) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/_chaos?{query}",
                                     method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=3) as resp:
            resp.read()


# --- the sidecar -------------------------------------------------------------------------------
def sidecar_config(eps: list[Endpoint], ports: dict[str, int], request_timeout: str
                   ) -> dict[str, Any]:
    return {
        "admin": {"address": f"127.0.0.1:{ports['admin']}"},
        "status": {"address": f"127.0.0.1:{ports['status']}"},
        "access_log": False,
        "listeners": [
            {"name": "http", "address": f"127.0.0.1:{ports['http']}", "protocol": "http",
             "routes": [{"match": {"host": "mixed"}, "cluster": "mixed"}],
             "forward_proxy": {"enabled": True, "allowed_hosts": ["127.0.0.1"],
                               "connect": True}},
            {"name": "tcp", "address": f"127.0.0.1:{ports['tcp']}", "protocol": "tcp",
             "cluster": "tcp"},
            {"name": "ws", "address": f"127.0.0.1:{ports['ws']}", "protocol": "http",
             "cluster": "mixed"},
        ],
        "clusters": [
            {"name": "mixed", "load_balancer": "round_robin",
             "discovery": {"type": "static",
                           "endpoints": [f"127.0.0.1:{e.http_port}" for e in eps]},
             "health_check": {"type": "http", "path": "/healthz", "interval": "1s",
                              "timeout": "500ms", "healthy_threshold": 1,
                              "unhealthy_threshold": 2},
             "timeouts": {"request": request_timeout}},
            {"name": "tcp", "load_balancer": "round_robin",
             "discovery": {"type": "static",
                           "endpoints": [f"127.0.0.1:{e.tcp_port}" for e in eps]},
             "health_check": {"type": "tcp", "interval": "1s", "timeout": "500ms",
                              "healthy_threshold": 1, "unhealthy_threshold": 1}},
        ],
        "drain": {"grace": "2s", "accept_period": "0s", "linger": "0s"},
    }


def write_config(path: Path, config: dict[str, Any]) -> None:
    import yaml

    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


def admin_get(port: int, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def lag_buckets(metrics_text: str) -> dict[float, float]:
    """Cumulative bucket counts of sidecar_event_loop_lag_seconds, by upper bound."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "sidecar_event_loop_lag_seconds_bucket":
                out[float(sample.labels["le"])] = sample.value
    return out


def metric_values(metrics_text: str, name: str) -> dict[str, float]:
    """The samples of `name`, by their labels (as text)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                out[json.dumps(sample.labels, sort_keys=True)] = sample.value
    return out


def p99(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The 99th percentile between two scrapes: the upper bound of the bucket that holds it."""
    bounds = sorted(after)
    if not bounds:
        return None
    total = after[bounds[-1]] - before.get(bounds[-1], 0.0)
    if total <= 0:
        return None
    for le in bounds:
        if after[le] - before.get(le, 0.0) >= 0.99 * total:
            return le
    return bounds[-1]


def stable_port() -> int:
    """A free port below the kernel's ephemeral range: a restarted endpoint must get its port
    back, and a port from bind(0) may meanwhile be taken as the local port of a connection."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- the load ----------------------------------------------------------------------------------
@dataclass
class Tally:
    """Outcomes by operation: `ok`, an x-sidecar-error code, or a client-side failure class
    (`no_response`, `truncated`, `corrupt`, `status_<n>`, `ws_failed`, `tcp_failed`...)."""

    by_op: dict[str, Counter[str]] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, op: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.by_op.setdefault(op, Counter())[outcome] += 1
            if op in IDEMPOTENT and outcome in ("no_response", "corrupt"):
                self.lost.append(f"{op}: {outcome} {detail}"[:300])

    def total(self) -> int:
        with self.lock:
            return sum(sum(c.values()) for c in self.by_op.values())


class Failure(Exception):
    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome
        self.detail = detail


def read_response(conn: http.client.HTTPConnection, method: str) -> tuple[int, dict[str, str],
                                                                            bytes]:
    try:
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        raise Failure("no_response", repr(exc)) from exc
    headers = {k.lower(): v for k, v in resp.getheaders()}
    try:
        body = resp.read()  # raises IncompleteRead when the framing was not completed
    except (OSError, http.client.HTTPException) as exc:
        raise Failure("truncated", repr(exc)) from exc
    return resp.status, headers, body


def judge(status: int, headers: dict[str, str], body: bytes, expect_sha: bool = True) -> str:
    code = headers.get("x-sidecar-error")
    if code:
        return code
    if status != 200:
        return f"status_{status}"
    if expect_sha:
        want = headers.get("x-sha256")
        if want is None or hashlib.sha256(body).hexdigest() != want:
            raise Failure("corrupt", f"{len(body)} bytes, sha mismatch")
    return "ok"


class Worker:
    def __init__(self, idx: int, ports: dict[str, int], eps: list[Endpoint], tally: Tally,
                 stop: threading.Event, deadline: float, max_ops: int) -> None:
        self.idx = idx
        self.ports = ports
        self.eps = eps
        self.tally = tally
        self.stop = stop
        self.deadline = deadline
        self.max_ops = max_ops
        self.rng = random.Random(idx)
        self.ka: http.client.HTTPConnection | None = None
        self.payload = self.rng.randbytes(MIB)
        self.small = self.rng.randbytes(1024)
        self.ops, self.weights = zip(*MIX.items(), strict=True)
        self.hold = threading.Event()  # set: finish the operation at hand, then wait
        self.holding = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline and n < self.max_ops:
            if self.hold.is_set():
                self._drop_ka()  # no app connection left open across the sample
                self.holding.set()
                while self.hold.is_set() and not self.stop.is_set():
                    time.sleep(0.05)
                self.holding.clear()
            op = self.rng.choices(self.ops, self.weights)[0]
            n += 1
            try:
                outcome = getattr(self, "op_" + op)()
            except Failure as exc:
                outcome = exc.outcome
                self.tally.add(op, outcome, exc.detail)
                self._drop_ka()
                continue
            except (OSError, http.client.HTTPException) as exc:
                self.tally.add(op, "no_response", repr(exc))
                self._drop_ka()
                continue
            self.tally.add(op, outcome)
        self._drop_ka()

    def _drop_ka(self) -> None:
        if self.ka is not None:
            self.ka.close()
            self.ka = None

    def _keepalive(self) -> http.client.HTTPConnection:
        if self.ka is None:
            self.ka = http.client.HTTPConnection("127.0.0.1", self.ports["http"],
                                                 timeout=OP_TIMEOUT)
        return self.ka

    def _http(self, conn: http.client.HTTPConnection, method: str, path: str,
              body: bytes | None = None, headers: dict[str, str] | None = None,
              host: str = "mixed") -> tuple[int, dict[str, str], bytes]:
        try:
            conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        except (OSError, http.client.HTTPException) as exc:
            # Sending failed: on a kept connection this is the sidecar closing it under us.
            raise Failure("no_response", f"send: {exc!r}") from exc
        status, hdrs, data = read_response(conn, method)
        if hdrs.get("connection", "").lower() == "close" and conn is self.ka:
            self._drop_ka()
        return status, hdrs, data

    def op_ka_small(self) -> str:
        return judge(*self._http(self._keepalive(), "GET", "/small"))

    def op_get_1mib(self) -> str:
        return judge(*self._http(self._keepalive(), "GET", "/big"))

    def op_close_small(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["http"], timeout=OP_TIMEOUT)
        try:
            return judge(*self._http(conn, "GET", "/small", headers={"Connection": "close"}))
        finally:
            conn.close()

    def op_fwd_small(self) -> str:
        ep = self.rng.choice(self.eps)
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["http"], timeout=OP_TIMEOUT)
        try:
            target = f"http://127.0.0.1:{ep.http_port}/small"
            return judge(*self._http(conn, "GET", target, host=f"127.0.0.1:{ep.http_port}"))
        finally:
            conn.close()

    def _echo(self, method: str, body: bytes, headers: dict[str, str] | None = None) -> str:
        status, hdrs, data = self._http(self._keepalive(), method, "/echo", body, headers)
        outcome = judge(status, hdrs, data)
        if outcome == "ok":
            answer = json.loads(data)
            if answer["len"] != len(body) or answer["sha"] != hashlib.sha256(body).hexdigest():
                raise Failure("corrupt", "the endpoint got a different request body")
        return outcome

    def op_put_1mib(self) -> str:
        return self._echo("PUT", self.payload)

    def op_post_small(self) -> str:
        return self._echo("POST", self.small)

    def op_post_key(self) -> str:
        key = f"{self.idx}-{self.rng.getrandbits(64):x}"
        return self._echo("POST", self.small, {"Idempotency-Key": key})

    def op_connect(self) -> str:
        ep = self.eps[2]  # the endpoint that is never restarted: a tunnel outlives requests
        with socket.create_connection(("127.0.0.1", self.ports["http"]), OP_TIMEOUT) as s:
            s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                      % (ep.http_port, ep.http_port))
            head = b""
            while b"\r\n\r\n" not in head:
                data = s.recv(4096)
                if not data:
                    return "connect_no_answer"
                head += data
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                m = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"x-sidecar-error")]
                return m[0].split(b":", 1)[1].strip().decode() if m else f"status_{status}"
            conn = http.client.HTTPConnection("127.0.0.1", ep.http_port, timeout=OP_TIMEOUT)
            conn.sock = s  # speak HTTP inside the tunnel
            try:
                return judge(*self._http(conn, "GET", "/small",
                                         host=f"127.0.0.1:{ep.http_port}"))
            finally:
                conn.sock = None

    def op_websocket(self) -> str:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        try:
            with connect(f"ws://127.0.0.1:{self.ports['ws']}/ws", open_timeout=OP_TIMEOUT,
                         close_timeout=2) as ws:
                for i in range(3):
                    msg = f"{self.idx}-{i}-" + "w" * 200
                    ws.send(msg)
                    if ws.recv(timeout=OP_TIMEOUT) != msg:
                        return "ws_corrupt"
        except (OSError, WebSocketException, TimeoutError) as exc:
            code = getattr(getattr(exc, "response", None), "headers", {}).get("x-sidecar-error")
            return code or "ws_failed"
        return "ok"

    def op_tcp(self) -> str:
        data = self.rng.randbytes(64 * 1024)
        got = b""
        try:
            with socket.create_connection(("127.0.0.1", self.ports["tcp"]), OP_TIMEOUT) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                while len(got) <= len(data):
                    piece = s.recv(65536)
                    if not piece:
                        break
                    got += piece
        except OSError:
            return "tcp_failed"
        if got == data:
            return "ok"
        # A TCP proxy has one way to say "no upstream": closing. Told apart from a cut stream.
        return "tcp_closed_before_data" if not got else "tcp_short"


# --- chaos -------------------------------------------------------------------------------------
class Chaos:
    def __init__(self, eps: list[Endpoint], procs: Procs, cores: frozenset[int],
                 config_path: Path, ports: dict[str, int], args: argparse.Namespace,
                 log: Any) -> None:
        self.eps = eps
        self.procs = procs
        self.cores = cores
        self.config_path = config_path
        self.ports = ports
        self.args = args
        self.log = log
        self.events: Counter[str] = Counter()
        self.reload_results: Counter[str] = Counter()
        self.stop = threading.Event()
        self.flipped_until = 0.0
        self.timeout_toggle = False

    def run(self, until: float) -> None:
        now = time.monotonic()
        nxt = {"restart": now + self.args.restart_every / 2,
               "reload": now + self.args.reload_every / 3,
               "flip": now + self.args.flip_every / 4}
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= until:
                break
            if self.flipped_until and now >= self.flipped_until:
                self.eps[2].chaos("healthy=1")
                self.flipped_until = 0.0
            for what, when in list(nxt.items()):
                if now >= when and not self.stop.is_set():
                    getattr(self, what)()
                    nxt[what] = time.monotonic() + getattr(self.args, f"{what}_every")
            self.stop.wait(0.1)
        if self.flipped_until:
            self.eps[2].chaos("healthy=1")
        if self.eps[0].proc is None:
            self.eps[0].start(self.procs, self.cores)

    def run_after(self, calm: float, until: float) -> None:
        """Nothing for the warm-up, then chaos until the cool-down."""
        if not self.stop.wait(calm):
            self.run(until)

    def restart(self) -> None:
        ep = self.eps[0]
        ep.stop(self.procs)  # SIGTERM: aiohttp finishes what is in flight, closes the rest
        self.stop.wait(2.0)
        ep.start(self.procs, self.cores)
        self.events["restart"] += 1
        self.log(f"chaos: restarted endpoint {ep.name}")

    def reload(self) -> None:
        self.timeout_toggle = not self.timeout_toggle
        config = sidecar_config(self.eps, self.ports, "14s" if self.timeout_toggle else "15s")
        write_config(self.config_path, config)
        status, body = admin_get(self.ports["admin"], "/reload", "POST")
        self.reload_results[str(status)] += 1
        self.events["reload"] += 1

    def flip(self) -> None:
        self.eps[2].chaos("healthy=0")
        self.flipped_until = time.monotonic() + 5.0
        self.events["health_flip"] += 1


# --- the run -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-ops", type=int, default=5_000_000, help="bound on operations")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--reset-pct", type=float, default=5.0)
    ap.add_argument("--restart-every", type=float, default=30.0)
    ap.add_argument("--reload-every", type=float, default=20.0)
    ap.add_argument("--flip-every", type=float, default=25.0)
    ap.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    # endpoint mode (internal)
    ap.add_argument("--endpoint", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--endpoint-tcp", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--endpoint-name", default="x", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.endpoint:
        run_endpoint(args.endpoint, args.endpoint_tcp, args.endpoint_name, args.reset_pct)
        return 0

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    total = args.minutes * 60.0
    calm = min(30.0, max(10.0, total / 6))  # warm-up and cool-down, chaos off
    proxy_cores, load_cores, notes = pick_cores()
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, load_cores)  # the load threads share the endpoints' core
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    procs = Procs(workdir)
    eps = [Endpoint("a", stable_port(), stable_port(), 0.0),
           Endpoint("b", stable_port(), stable_port(), args.reset_pct),
           Endpoint("c", stable_port(), stable_port(), 0.0)]
    ports = {k: stable_port() for k in ("admin", "status", "http", "tcp", "ws")}
    config_path = workdir / "config.yaml"
    tally = Tally()
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    started = time.time()
    result: dict[str, Any] = {}
    try:
        for ep in eps:
            ep.start(procs, load_cores)
        write_config(config_path, sidecar_config(eps, ports, "15s"))
        sidecar = procs.start(
            "sidecar",
            [sys.executable, "-m", "sidecar", "run", "--config", str(config_path),
             "--loop", args.loop],
            proxy_cores, env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_ready(sidecar, lambda: admin_get(ports["admin"], "/readyz", timeout=1)[0] == 200)
        log(f"sidecar pid {sidecar.pid} on cores {sorted(proxy_cores)}; endpoints and "
            f"{args.workers} workers on {sorted(load_cores)}; {total:.0f}s, calm {calm:.0f}s")
        t0 = time.monotonic()
        end = t0 + total
        workers = [Worker(i, ports, eps, tally, stop, end, args.max_ops // args.workers)
                   for i in range(args.workers)]
        threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
        for t in threads:
            t.start()
        chaos = Chaos(eps, procs, load_cores, config_path, ports, args, log)
        chaos_thread = threading.Thread(target=chaos.run_after, args=(calm, end - calm),
                                        daemon=True)
        chaos_thread.start()
        marks: dict[str, dict[float, float]] = {}

        def quiesced(label: str) -> dict[str, Any]:
            """A sample with the load held: every worker between two operations, nothing in
            flight, a second to settle. The baseline and the final sample are taken so, so
            that they compare like with like (no request's buffers or sockets counted)."""
            for wk in workers:
                wk.hold.set()
            limit = time.monotonic() + OP_TIMEOUT + 5
            while time.monotonic() < limit and not all(
                    wk.holding.is_set() or not th.is_alive()
                    for wk, th in zip(workers, threads, strict=True)):
                time.sleep(0.05)
            limit = time.monotonic() + 5
            while time.monotonic() < limit and app_connections() > 0:
                time.sleep(0.05)
            time.sleep(0.5)
            s = sample(label)
            # Idle upstream connections come and go with the pools (a restarted endpoint's are
            # gone, then refilled on demand): counted apart, so a leak shows in the rest.
            s["pooled"] = pooled()
            s["fds_other"] = s["fds"] - s["pooled"]
            marks[label] = lag_buckets(admin_get(ports["admin"], "/metrics")[1])
            for wk in workers:
                wk.hold.clear()
            return s

        def app_connections() -> float:
            return sum(v for k, v in metric_values(
                admin_get(ports["admin"], "/metrics")[1],
                "sidecar_downstream_connections").items())

        def pooled() -> int:
            body = admin_get(ports["admin"], "/clusters")[1]
            return sum(ep["idle"] + ep["active"] for c in json.loads(body)["clusters"]
                       for ep in c["endpoints"])

        def sample(label: str = "") -> dict[str, Any]:
            s = {"t": round(time.monotonic() - t0, 1), "rss_kib": rss_kib(sidecar.pid),
                 "fds": fd_count(sidecar.pid), "ops": tally.total(), "mark": label}
            samples.append(s)
            return s

        sample("start")
        marks["start"] = lag_buckets(admin_get(ports["admin"], "/metrics")[1])
        next_sample = t0 + SAMPLE_EVERY
        baseline_at = t0 + calm
        baseline_taken = False
        while time.monotonic() < end - 1.0:
            if not sidecar.alive():
                raise BenchError(sidecar.describe_exit())
            now = time.monotonic()
            if not baseline_taken and now >= baseline_at:
                s = quiesced("baseline")
                baseline_taken = True
                log(f"baseline: rss {s['rss_kib']} KiB, fds {s['fds']}, ops {s['ops']}")
                next_sample = now + SAMPLE_EVERY
            elif now >= next_sample:
                s = sample()
                log(f"t={s['t']:.0f}s rss {s['rss_kib']} KiB fds {s['fds']} ops {s['ops']} "
                    f"lost {len(tally.lost)}")
                next_sample += SAMPLE_EVERY
            time.sleep(0.2)
        final = quiesced("final")
        clusters = json.loads(admin_get(ports["admin"], "/clusters")[1])["clusters"]
        stop.set()
        chaos.stop.set()
        for t in threads:
            t.join(OP_TIMEOUT + 5)
        chaos_thread.join(15)
        base = next(s for s in samples if s["mark"] == ("baseline" if baseline_taken
                                                          else "start"))
        result = summarize(args, tally, chaos, samples, base, final, marks, notes,
                           time.monotonic() - t0)
        result["breakers_at_end"] = {c["name"]: c["breaker"] for c in clusters}
    finally:
        stop.set()
        procs.stop_all()
        if not args.keep_workdir:
            for p in workdir.glob("*"):
                with contextlib.suppress(OSError):
                    p.unlink()
            with contextlib.suppress(OSError):
                workdir.rmdir()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"soak-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result, out))
    return 0 if result["verdict"]["pass"] else 1


def within(a: float, b: float, pct: float = 10.0) -> bool:
    return abs(b - a) <= a * pct / 100.0


def summarize(args: argparse.Namespace, tally: Tally, chaos: Chaos,
              samples: list[dict[str, Any]], base: dict[str, Any], final: dict[str, Any],
              marks: dict[str, dict[float, float]], notes: list[str], took: float
              ) -> dict[str, Any]:
    ops = {op: dict(c) for op, c in sorted(tally.by_op.items())}
    failures: Counter[str] = Counter()
    for c in tally.by_op.values():
        for outcome, n in c.items():
            if outcome != "ok":
                failures[outcome] += n
    idem = sum(sum(c.values()) for op, c in tally.by_op.items() if op in IDEMPOTENT)
    truncated_idem = sum(c.get("truncated", 0) for op, c in tally.by_op.items()
                         if op in IDEMPOTENT)
    lag_calm = p99(marks.get("baseline", marks["start"]), marks["final"])
    lag_all = p99(marks["start"], marks["final"])
    rss_ok = within(base["rss_kib"], final["rss_kib"])
    fds_ok = within(base.get("fds_other", base["fds"]), final.get("fds_other", final["fds"]))
    return {
        "kind": "soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"minutes": args.minutes, "workers": args.workers, "loop": args.loop,
                     "reset_pct": args.reset_pct, "restart_every_s": args.restart_every,
                     "reload_every_s": args.reload_every, "flip_every_s": args.flip_every,
                     "mix": MIX},
        "notes": notes,
        "duration_s": round(took, 1),
        "operations": tally.total(),
        "by_op": ops,
        "failures": dict(failures.most_common()),
        "idempotent": {"sent": idem, "lost": len(tally.lost),
                       "lost_examples": tally.lost[:20], "truncated_signalled": truncated_idem},
        "chaos": {**dict(chaos.events), "reload_status": dict(chaos.reload_results)},
        "samples": samples,
        "rss_kib": {"baseline": base["rss_kib"], "final": final["rss_kib"],
                    "max": max(s["rss_kib"] for s in samples)},
        "fds": {"baseline": base["fds"], "final": final["fds"],
                "max": max(s["fds"] for s in samples),
                "pooled_upstream": [base.get("pooled"), final.get("pooled")],
                "other_baseline": base.get("fds_other"), "other_final": final.get("fds_other")},
        "event_loop_lag_p99_s": {"after_warmup": lag_calm, "whole_run": lag_all},
        "verdict": {"idempotent_lost_zero": not tally.lost, "rss_flat": rss_ok,
                    "fds_flat": fds_ok, "pass": not tally.lost and rss_ok and fds_ok},
    }


def markdown(r: dict[str, Any], path: Path) -> str:
    s = r["settings"]
    v = r["verdict"]
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    lag = r["event_loop_lag_p99_s"]

    def fmt_lag(x: float | None) -> str:
        return "n/a" if x is None else f"≤ {x * 1000:g} ms"

    lines = [
        f"### Soak, {r['when']} ({s['minutes']:g} min, {s['workers']} workers, {s['loop']})",
        "",
        f"Chaos: endpoint `a` restarted {r['chaos'].get('restart', 0)}×, `b` resets "
        f"{s['reset_pct']:g} % of requests, {r['chaos'].get('reload', 0)} config reloads "
        f"(POST /reload: {r['chaos'].get('reload_status', {})}), "
        f"{r['chaos'].get('health_flip', 0)} health flips of `c`. JSON: `{rel}`.",
        "",
        "| measure | value | bar |",
        "|---|---|---|",
        f"| operations | {r['operations']:,} in {r['duration_s']:.0f} s | |",
        f"| idempotent requests | {r['idempotent']['sent']:,} | |",
        f"| idempotent requests lost | {r['idempotent']['lost']} | 0 "
        f"{'✅' if v['idempotent_lost_zero'] else '❌'} |",
        f"| idempotent, truncated and signalled | {r['idempotent']['truncated_signalled']} | |",
        f"| sidecar RSS, after warm-up → end | {r['rss_kib']['baseline'] / 1024:.1f} → "
        f"{r['rss_kib']['final'] / 1024:.1f} MiB (max {r['rss_kib']['max'] / 1024:.1f}) | "
        f"± 10 % {'✅' if v['rss_flat'] else '❌'} |",
        f"| sidecar open descriptors, after warm-up → end | {r['fds']['baseline']} → "
        f"{r['fds']['final']} (max {r['fds']['max']}); without pooled upstream connections "
        f"({' → '.join(str(x) for x in r['fds']['pooled_upstream'])}): "
        f"{r['fds']['other_baseline']} → {r['fds']['other_final']} | "
        f"± 10 % {'✅' if v['fds_flat'] else '❌'} |",
        f"| event-loop lag p99 (after warm-up / whole run) | {fmt_lag(lag['after_warmup'])} / "
        f"{fmt_lag(lag['whole_run'])} | |",
        "",
        "| operation | total | ok | failures (by x-sidecar-error code or client-side class) |",
        "|---|---|---|---|",
    ]
    for op, c in r["by_op"].items():
        fails = ", ".join(f"{k} {n}" for k, n in sorted(c.items()) if k != "ok") or "–"
        mark = " (idempotent)" if op in IDEMPOTENT else ""
        lines.append(f"| {op}{mark} | {sum(c.values()):,} | {c.get('ok', 0):,} | {fails} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
