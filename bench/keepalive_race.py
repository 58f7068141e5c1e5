"""How often a request crosses an upstream's keep-alive close (issue 19, part 3). A benchmark
script, not a test: it prints counts and asserts nothing.

An origin that advertises keep-alive but closes silently right after every response (the worst
case of an upstream closing idle connections) sits behind a real sidecar process; concurrent
app connections send keyless POSTs and GETs through it. Every time the sidecar reuses one of
that origin's connections the request races the origin's FIN: a GET is retried on a fresh
connection (`sidecar_retries_total{reason="stale"}`), a keyless POST cannot be and gets 502.

    python bench/keepalive_race.py                     # 20000 requests, 32 app connections
    python bench/keepalive_race.py --requests 50000 --conns 64 --loop asyncio

Run it twice with the same arguments (e.g. on the old code with `git stash`, then the new) to
compare. Figures it prints:

- requests: what the app sent; answered: what the origin answered (one per connection);
- opened: upstream connections the sidecar opened;
- reuses: tries sent on a reused connection = tries - opened, where tries = answered + races
  (with this origin every reuse is a race: the connection is always already closing);
- races: tries lost to the close = stale retries + reset retries + POSTs answered 502;
- race rate: races per request.

Processes: the origin and the sidecar are children of this script, each pinned to its own core
where two exist, and stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESPONSE = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")


# --- the origin (a child process) -------------------------------------------------------------
class _Origin(asyncio.Protocol):
    answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = _LENGTH.search(self.buf[:end])
        if len(self.buf) < end + 4 + (int(m.group(1)) if m else 0):
            return
        _Origin.answered += 1
        # Keep-alive advertised, then a silent close: FIN right behind the response.
        self.transport.write(RESPONSE)
        self.transport.close()


def run_origin(port: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Origin, "127.0.0.1", port, backlog=1024)
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        print("ready", flush=True)
        await stop
        server.close()
        print(f"answered {_Origin.answered}", flush=True)

    asyncio.run(main())


# --- helpers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(core: int | None) -> None:
    if core is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {core})


def http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- the app ----------------------------------------------------------------------------------
async def client(port: int, count: int, index: int, tally: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(count):
            post = (i + index) % 2 == 0
            if post:
                writer.write(b"POST /orders HTTP/1.1\r\nHost: origin\r\nContent-Length: 9\r\n"
                             b"\r\norder=42;")
            else:
                writer.write(b"GET /item HTTP/1.1\r\nHost: origin\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            m = _LENGTH.search(head)
            await reader.readexactly(int(m.group(1)) if m else 0)
            status = int(head.split(b" ", 2)[1])
            kind = "post" if post else "get"
            tally[f"{kind}_{status}"] = tally.get(f"{kind}_{status}", 0) + 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def load(port: int, total: int, conns: int) -> tuple[dict[str, int], float]:
    tally: dict[str, int] = {}
    each = total // conns
    started = time.perf_counter()
    await asyncio.gather(*(client(port, each, i, tally) for i in range(conns)))
    return tally, time.perf_counter() - started


# --- the run ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--origin", type=int, help=argparse.SUPPRESS)  # the child's mode
    args = ap.parse_args()
    if args.origin is not None:
        run_origin(args.origin)
        return

    cores = sorted(os.sched_getaffinity(0))
    sidecar_core = cores[0] if len(cores) > 1 else None
    other_core = cores[1] if len(cores) > 1 else None
    origin_port, listen_port, admin_port = free_port(), free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="keepalive-race-"))
    config = workdir / "config.yaml"
    config.write_text(f"""
admin: {{address: "127.0.0.1:{admin_port}"}}
status: {{address: "127.0.0.1:{free_port()}"}}
access_log: false
listeners:
  - {{name: app, protocol: http, address: "127.0.0.1:{listen_port}", cluster: origin}}
clusters:
  - name: origin
    discovery: {{type: static, endpoints: ["127.0.0.1:{origin_port}"]}}
    pool: {{max_connections: 256, min_idle: 0}}
    health_check: {{type: none}}
drain: {{grace: 2s, accept_period: 0s, linger: 0s}}
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    origin = subprocess.Popen([sys.executable, __file__, "--origin", str(origin_port)],
                              stdout=subprocess.PIPE, text=True, env=env,
                              preexec_fn=lambda: pin(other_core))
    log = open(workdir / "sidecar.log", "wb")  # noqa: SIM115 (closed below)
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config), "--loop", args.loop],
        stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: pin(sidecar_core))
    try:
        assert origin.stdout is not None
        if origin.stdout.readline().strip() != "ready":
            raise SystemExit("origin did not start")
        deadline = time.monotonic() + 15
        while http(f"http://127.0.0.1:{admin_port}/readyz")[0] != 200:
            if time.monotonic() > deadline or sidecar.poll() is not None:
                raise SystemExit(f"sidecar not ready; log in {workdir / 'sidecar.log'}")
            time.sleep(0.05)
        pin(other_core)
        tally, took = asyncio.run(load(listen_port, args.requests, args.conns))
        text = http(f"http://127.0.0.1:{admin_port}/metrics")[1]
    finally:
        for proc in (sidecar, origin):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        answered = 0
        with contextlib.suppress(subprocess.TimeoutExpired):
            out, _ = origin.communicate(timeout=10)
            answered = int(out.split("answered")[-1]) if "answered" in out else 0
        for proc in (sidecar, origin):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        log.close()

    c = {"cluster": "origin"}
    opened = metric(text, "sidecar_upstream_connections_opened_total", **c)
    stale = metric(text, "sidecar_retries_total", reason="stale", **c)
    reset = metric(text, "sidecar_retries_total", reason="reset", **c)
    posts = sum(v for k, v in tally.items() if k.startswith("post_"))
    gets = sum(v for k, v in tally.items() if k.startswith("get_"))
    post_502 = tally.get("post_502", 0)
    get_bad = gets - tally.get("get_200", 0)
    races = int(stale + reset) + post_502
    tries = answered + races
    requests = posts + gets
    print(f"loop={args.loop} requests={requests} conns={args.conns} took={took:.1f}s "
          f"({requests / took:.0f} rps)")
    print(f"  answered by origin  {answered}")
    print(f"  connections opened  {int(opened)}")
    print(f"  reuses              {int(tries - opened)}")
    print(f"  races               {races}  (stale retries {int(stale)}, reset retries "
          f"{int(reset)}, POSTs answered 502: {post_502})")
    print(f"  race rate           {races / requests:.3%} of requests")
    print(f"  GETs not 200        {get_bad}")
    print(f"  statuses            {dict(sorted(tally.items()))}")


if __name__ == "__main__":
    main()
