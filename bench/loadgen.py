"""Fixed-rate (open-loop) HTTP/1.1 load generator: the latency half of the benchmark.

wrk keeps N requests in flight and measures how fast they come back (closed loop); wrk2's
fixed rate is not packaged here, so this sends a fixed number of requests per second over
keep-alive connections, whatever the responses do, and records every request's latency with
time.perf_counter_ns. Run as a script (pinned to the load core by bench/run.py); prints one
JSON object on stdout.

Requests are dispatched from a pacing loop that wakes at most every millisecond (uvloop timers
have millisecond resolution; waking more often would spin on the core nginx needs), so at
2 000 req/s about two requests leave per tick. Two latencies per request:
- service: from the moment its bytes were written to the complete response. This is what a
  proxy adds; direct-vs-proxy differences of these are the "added latency".
- with_queue: from the moment the pacer dispatched it. When every connection is busy
  (a slow or stalled target), requests wait in the generator and this grows: no coordinated
  omission, like wrk2's corrected figures, minus the sub-millisecond pacing jitter.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sys
import time
from typing import Any

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the project
    uvloop = None


class Generator:
    def __init__(self, request: bytes, record: bool = False) -> None:
        self.request = request
        self.idle: collections.deque[Conn] = collections.deque()
        self.backlog: collections.deque[int] = collections.deque()  # dispatch times, ns
        self.record = record
        self.service_ns: list[int] = []
        self.queued_ns: list[int] = []
        self.sent = 0
        self.completed = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.conns: list[Conn] = []
        self.settled: asyncio.Event | None = None  # set by _settle's waiter when all is done

    def check_settled(self) -> None:
        if self.settled is not None and not self.in_flight and not self.backlog:
            self.settled.set()

    def dispatch(self) -> None:
        now = time.perf_counter_ns()
        if self.idle:
            self.idle.popleft().send(now)
        else:
            self.backlog.append(now)

    def connection_free(self, conn: Conn) -> None:
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)


class Conn(asyncio.Protocol):
    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False
        self.dispatched_ns = 0
        self.sent_ns = 0
        self.status = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.gen.connection_free(self)

    def send(self, dispatched_ns: int) -> None:
        assert self.transport is not None
        self.busy = True
        self.dispatched_ns = dispatched_ns
        self.gen.sent += 1
        self.gen.in_flight += 1
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.errors["parse"] += 1
            assert self.transport is not None
            self.transport.abort()

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        now = time.perf_counter_ns()
        gen = self.gen
        gen.in_flight -= 1
        self.busy = False
        if self.status // 100 != 2:
            gen.errors[f"status_{self.status}"] += 1
        elif gen.record:
            gen.completed += 1
            gen.service_ns.append(now - self.sent_ns)
            gen.queued_ns.append(now - self.dispatched_ns)
        if not self.parser.should_keep_alive():
            gen.errors["closed_by_peer"] += 1
            assert self.transport is not None
            self.transport.close()
        else:
            gen.connection_free(self)
        gen.check_settled()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.gen.idle:
            self.gen.idle.remove(self)
        if self.busy:
            self.gen.in_flight -= 1
            self.gen.errors["reset"] += 1
            self.gen.check_settled()
        if not self.closed.done():
            self.closed.set_result(None)


async def _connect(gen: Generator, host: str, port: int) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Conn(gen), host, port)
    gen.conns.append(conn)
    return conn


async def _keep_connected(gen: Generator, host: str, port: int, conn: Conn,
                          stop: asyncio.Event) -> None:
    """Replace a connection the peer closed, so the pool stays at N until the end."""
    while not stop.is_set():
        closed = conn.closed
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait({closed, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if stop.is_set():
            return
        try:
            conn = await _connect(gen, host, port)
        except OSError:
            gen.errors["connect"] += 1
            await asyncio.sleep(0.01)


async def _pace(gen: Generator, rate: float, seconds: float) -> None:
    interval = 1e9 / rate
    start = time.perf_counter_ns()
    end = start + int(seconds * 1e9)
    i = 0
    while True:
        now = time.perf_counter_ns()
        if now >= end:
            return
        due = start + int(i * interval)
        while due <= now:
            gen.dispatch()
            i += 1
            due = start + int(i * interval)
        await asyncio.sleep(max(0.001, (due - time.perf_counter_ns()) / 1e9))


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {}
    s = sorted(samples_ns)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p / 100 * len(s)))] / 1e6

    return {
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "p999_ms": pct(99.9),
        "max_ms": s[-1] / 1e6, "mean_ms": sum(s) / len(s) / 1e6,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    request = (
        f"GET {args.target} HTTP/1.1\r\nHost: {args.host_header}\r\n"
        "User-Agent: bench-loadgen\r\n\r\n"
    ).encode("latin-1")
    gen = Generator(request)
    stop = asyncio.Event()
    conns = [await _connect(gen, args.host, args.port) for _ in range(args.connections)]
    keepers = [asyncio.create_task(_keep_connected(gen, args.host, args.port, c, stop))
               for c in conns]
    try:
        if args.warmup > 0:
            await _pace(gen, args.rate, args.warmup)
            await _settle(gen, 1.0)
        gen.errors.clear()
        gen.sent = 0
        gen.record = True
        started = time.perf_counter()
        await _pace(gen, args.rate, args.duration)
        paced = time.perf_counter() - started
        unfinished = await _settle(gen, 2.0)
    finally:
        stop.set()
        await asyncio.gather(*keepers, return_exceptions=True)
        for conn in gen.conns:
            if conn.transport is not None:
                conn.transport.close()
    if unfinished:
        gen.errors["unfinished"] += unfinished
    return {
        "rate_target": args.rate,
        "connections": args.connections,
        "duration_s": paced,
        "sent": gen.sent,
        "completed": gen.completed,
        "achieved_rps": gen.completed / paced if paced else 0.0,
        "errors": dict(gen.errors),
        "service": _percentiles(gen.service_ns),
        "with_queue": _percentiles(gen.queued_ns),
    }


async def _settle(gen: Generator, limit_s: float) -> int:
    """Wait for queued and in-flight requests to finish; returns how many did not."""
    gen.settled = asyncio.Event()
    gen.check_settled()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit_s):
            await gen.settled.wait()
    gen.settled = None
    return gen.in_flight + len(gen.backlog)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", default="/100b", help="request-target (absolute-form ok)")
    parser.add_argument("--host-header", default=None)
    parser.add_argument("--rate", type=float, default=2000.0, help="requests per second")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.host_header is None:
        args.host_header = f"{args.host}:{args.port}"
    runner = uvloop.run if uvloop is not None else asyncio.run
    try:
        result = runner(run(args))
    except OSError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    result["loop"] = "uvloop" if uvloop is not None else "asyncio"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
