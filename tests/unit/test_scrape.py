"""/metrics off the data path (SPEC section 5: a scrape costs the loop at most 50 ms): the direct
text writer gives exactly prometheus-client's exposition, the scraper renders from a copy in
slices, and concurrent scrapes share one rendering. The cost itself is measured by
bench/scrape_cost.py, not asserted here."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from sidecar.errors import LOCAL_ERROR_CODES
from sidecar.observe.metrics import Scraper, StatsCollector, build_registry, render
from sidecar.observe.stats import ClusterGauges, EndpointGauge, Stats


class _Only:
    def __init__(self, collector: StatsCollector) -> None:
        self.collector = collector

    def collect(self):  # type: ignore[no-untyped-def]
        return self.collector.collect()


def populated(clusters: int) -> Stats:
    stats = Stats()
    stats.listener("egress").internal_errors = 3
    stats.process.event_loop_lag.observe(0.002)
    stats.process.config_reloads["success"] = 12_345_678  # Go-style exponent formatting
    for i in range(clusters):
        c = stats.cluster(f'h-{i}.example:80' if i % 3 else 'we"ird\\name\n:1')
        c.request_done("egress", 200 + i % 400, 0.01 * i)
        c.connect_duration.observe(0.0001 * i)
        c.closed("error")
        c.retried("stale")
        c.local_error(LOCAL_ERROR_CODES[i % len(LOCAL_ERROR_CODES)])
        eps = [EndpointGauge(f"10.0.0.{i}:80", i % 2 == 0, "serving" if i % 2 == 0 else "ejected")]
        c.gauges = lambda eps=eps: ClusterGauges(active=1, idle=2, pending=3, endpoints=eps)
    return stats


def test_text_is_exactly_what_prometheus_client_writes() -> None:
    for n in (0, 1, 5, 40):
        stats = populated(n)
        expected = generate_latest(_Only(StatsCollector(stats))).decode()  # type: ignore[arg-type]
        assert StatsCollector(stats).text() == expected, n


def test_scraper_renders_the_registry_body_from_a_copy() -> None:
    stats = populated(20)

    async def scrape() -> bytes:
        body, content_type = await Scraper(stats).render()
        assert content_type.startswith("text/plain")
        return body

    ours = asyncio.run(scrape()).decode()
    expected = render(build_registry(stats))[0].decode()

    def sidecar_lines(text: str) -> list[str]:  # process_* values move between two reads
        return [line for line in text.splitlines() if "sidecar_" in line]

    assert sidecar_lines(ours) == sidecar_lines(expected)
    assert "process_open_fds" in ours


def test_a_snapshot_does_not_move_with_the_data_path() -> None:
    stats = populated(2)
    snap = stats.snapshot()
    before = StatsCollector(snap).text()
    c = next(iter(stats.clusters.values()))
    c.request_done("egress", 500, 1.0)
    c.closed("rotated")
    stats.listener("egress").inflight += 7
    stats.cluster("new:1")
    assert StatsCollector(snap).text() == before


def test_concurrent_scrapes_share_one_rendering() -> None:
    stats = populated(200)
    calls = 0
    for c in stats.clusters.values():
        inner = c.gauges
        assert inner is not None

        def counted(inner=inner):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return inner()

        c.gauges = counted

    async def two() -> tuple[bytes, bytes]:
        scraper = Scraper(stats)
        a, b = await asyncio.gather(scraper.render(), scraper.render())
        return a[0], b[0]

    a, b = asyncio.run(two())
    assert a == b
    assert calls == len(stats.clusters)  # live gauges read once per cluster, not per scrape
