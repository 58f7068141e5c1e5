"""What one /metrics scrape costs the event loop at the largest series set the limits allow.

SPEC section 5: a scrape never stalls the data path; scraping the largest series set the limits
allow costs the event loop at most 50 ms. The largest set: `forward_proxy.max_destinations`
(256) dynamic clusters plus a few configured ones, every cluster with every series of SPEC
section 8 (requests from two listeners, all histograms, every close reason, retry reason and
local error code non-zero, two endpoints). The scrape is rendered the way the admin server
does it (`observe.metrics.Scraper.render`: the numbers copied, then the text written, in
slices of about 5 ms of loop time), or with `--on-loop` the old way (`render()`, all at once
on the loop), while a 1 ms ticker on the same loop records how late it wakes up: that
lateness is what a request would have waited.

    python bench/scrape_cost.py [--clusters 260] [--rounds 20] [--on-loop] [--loop asyncio]

Prints the body size, the scrape time (median and worst of the rounds), the worst loop lag
seen during a scrape, the worst seen in as many windows of the same length without a scrape
(the machine's own noise), and what `Stats.snapshot()` costs in one go (for reference: the
scraper copies cluster by cluster). Exit status 1 when the worst lag is above --limit-ms
(default 50).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from sidecar.errors import LOCAL_ERROR_CODES
from sidecar.observe.metrics import Scraper, build_registry, render
from sidecar.observe.stats import (
    CLOSE_REASONS,
    RETRY_REASONS,
    ClusterGauges,
    EndpointGauge,
    Stats,
)


def populated(clusters: int) -> Stats:
    stats = Stats()
    for listener in ("egress", "direct"):
        stats.listener(listener)
    for i in range(clusters):
        c = stats.cluster(f"host-{i}.example.com:443")
        for listener in ("egress", "direct"):
            for status in (200, 302, 404, 503, 101):
                c.request_done(listener, status, 0.001 * (i % 40 + 1))
        for j in range(16):
            c.connect_duration.observe(0.0001 * (j + 1))
            c.pool_wait.observe(0.00005 * (j + 1))
        for reason in CLOSE_REASONS:
            c.closed(reason)
        for reason in RETRY_REASONS:
            c.retried(reason)
        for code in LOCAL_ERROR_CODES:
            c.local_error(code)
        c.connections_opened = 10 + i
        c.tls_handshakes[True] = i
        c.tls_handshakes[False] = 1
        eps = [EndpointGauge(f"10.0.{i // 250}.{i % 250}:443", True),
               EndpointGauge(f"10.1.{i // 250}.{i % 250}:443", False, "unhealthy")]
        c.gauges = lambda eps=eps: ClusterGauges(active=3, idle=2, pending=1, endpoints=eps)
    return stats


async def measure(
    clusters: int, rounds: int, on_loop: bool
) -> tuple[int, list[float], float, float, float]:
    stats = populated(clusters)
    registry = build_registry(stats)
    scraper = Scraper(stats)
    loop = asyncio.get_running_loop()
    worst_lag = 0.0
    scraping = False
    stop = False

    async def ticker() -> None:
        nonlocal worst_lag
        while not stop:
            before = loop.time()
            await asyncio.sleep(0.001)
            lag = loop.time() - before - 0.001
            if scraping and lag > worst_lag:
                worst_lag = lag

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    times: list[float] = []
    size = 0
    for _ in range(rounds):
        scraping = True
        started = time.perf_counter()
        if on_loop:
            body, _ = render(registry)
        else:
            body, _ = await scraper.render()
        times.append(time.perf_counter() - started)
        size = len(body)
        await asyncio.sleep(0.005)  # let the ticker see the lag this scrape caused
        scraping = False
        await asyncio.sleep(0.02)
    # The same windows without a scrape: what the machine's own noise makes of the ticker.
    scrape_lag, worst_lag = worst_lag, 0.0
    for elapsed in times:
        scraping = True
        await asyncio.sleep(elapsed + 0.005)
        scraping = False
        await asyncio.sleep(0.02)
    baseline, worst_lag = worst_lag, scrape_lag
    stop = True
    await tick
    started = time.perf_counter()
    stats.snapshot()
    snapshot = time.perf_counter() - started
    return size, times, worst_lag, snapshot, baseline


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=260, help="256 dynamic + a few configured")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--limit-ms", type=float, default=50.0)
    ap.add_argument("--on-loop", action="store_true", help="render on the loop (the old way)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    size, times, lag, snapshot, baseline = asyncio.run(
        measure(args.clusters, args.rounds, args.on_loop)
    )
    print(f"clusters={args.clusters} loop={args.loop} "
          f"{'on-loop' if args.on_loop else 'sliced'} body={size / 1024:.0f} KiB "
          f"scrape median={statistics.median(times) * 1000:.1f} ms "
          f"worst={max(times) * 1000:.1f} ms loop_lag_worst={lag * 1000:.1f} ms "
          f"(idle baseline {baseline * 1000:.1f} ms) "
          f"snapshot_in_one_go={snapshot * 1000:.1f} ms (limit {args.limit_ms:g} ms)")
    return 0 if lag * 1000 <= args.limit_ms else 1


if __name__ == "__main__":
    sys.exit(main())
