"""Export the `stats` counters as the Prometheus metrics of SPEC section 8, read at scrape time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_go_float

from sidecar.grpc_status import NAMES as GRPC_STATUS_NAMES
from sidecar.observe.stats import ENDPOINT_STATES, ClusterGauges, Histogram, Stats

_NO_GAUGES = ClusterGauges()  # what a cluster reports before it installed its callback


def _histogram(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    family.add_metric(labels, hist.cumulative(), hist.sum)


# Go's float formatting, as prometheus-client writes every sample value.
_go_float = cast(Callable[[float], str], _untyped_go_float)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


class _TextFamily:
    """A metric family written straight to Prometheus text lines, exactly as
    `generate_latest` would write the prometheus-client family of the same arguments (label
    pairs sorted by name, values through `floatToGoString`)."""

    kind = "untyped"

    def __init__(
        self,
        name: str,
        documentation: str,
        value: float | None = None,
        labels: list[str] | None = None,
    ) -> None:
        if self.kind == "counter":
            name += "_total"
        self.name = name
        doc = documentation.replace("\\", r"\\").replace("\n", r"\n")
        self.lines = [f"# HELP {name} {doc}\n# TYPE {name} {self.kind}\n"]
        self.labels = labels or []
        self.order = sorted(range(len(self.labels)), key=lambda i: self.labels[i])
        if value is not None:
            self.add_metric([], value)

    def _pairs(self, values: list[str]) -> list[str]:
        names = self.labels
        return [f'{names[i]}="{_escape(values[i])}"' for i in self.order]

    def add_metric(self, labels: list[str], value: float) -> None:
        pairs = self._pairs(labels)
        where = "{" + ",".join(pairs) + "}" if pairs else ""
        self.lines.append(f"{self.name}{where} {_go_float(value)}\n")

    def text(self) -> str:
        return "".join(self.lines)


class _TextCounter(_TextFamily):
    kind = "counter"


class _TextGauge(_TextFamily):
    kind = "gauge"


class _TextHistogram(_TextFamily):
    kind = "histogram"

    def add_metric(  # type: ignore[override]
        self, labels: list[str], buckets: list[tuple[str, int]], sum_value: float
    ) -> None:
        pairs = self._pairs(labels)
        # "le" sorts after every label name we use ("cluster"): it goes last.
        prefix = f"{self.name}_bucket{{" + "".join(p + "," for p in pairs) + 'le="'
        lines = self.lines
        for le, count in buckets:
            lines.append(f'{prefix}{le}"}} {_go_float(count)}\n')
        where = "{" + ",".join(pairs) + "}" if pairs else ""
        lines.append(f"{self.name}_count{where} {_go_float(buckets[-1][1])}\n")
        lines.append(f"{self.name}_sum{where} {_go_float(sum_value)}\n")


class _Kinds:
    def __init__(self, counter: Any, gauge: Any, histogram: Any) -> None:
        self.counter = counter
        self.gauge = gauge
        self.histogram = histogram


_METRIC_KINDS = _Kinds(CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)
_TEXT_KINDS = _Kinds(_TextCounter, _TextGauge, _TextHistogram)


class StatsCollector(Collector):
    """Yields every family of SPEC section 8 from one `Stats` root, on each scrape.

    Counter families are named without `_total`; prometheus-client appends it in the exposition.
    Families are yielded even with no series (no clusters yet), so HELP/TYPE are always there.

    Beyond SPEC section 8 (extras an operator of Envoy would look for):
    - `sidecar_downstream_connections_shed_total{listener}`: app connections accepted and closed
      at once because of EMFILE or `max_connections` (SPEC section 5 says they are counted).
    - `sidecar_internal_errors_total{listener}`: unexpected exceptions caught and answered
      (SPEC section 5: the app always gets an answer; the log line is rate-limited).
    - `sidecar_forward_proxy_destinations` and `sidecar_forward_proxy_destination_events_total
      {event}`: the bound of SPEC section 5 on forward-proxy destinations at work.
    - `sidecar_endpoints{cluster,state}`: endpoints per cluster by health, `healthy`/`unhealthy`;
      one series per state, unlike the per-endpoint `sidecar_endpoint_healthy`.
    - `sidecar_http2_abuse_total{listener,kind}`: the HTTP/2 attacks SPEC section 11 says are
      counted (rapid reset, CONTINUATION flood, HPACK bomb, SETTINGS/PING flood, zero-window
      stall), every kind from start.
    """

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        # Lets the registry refuse a later collector (discovery stats...) that reuses our names.
        return self._families(Stats(), _METRIC_KINDS)

    def collect(self) -> Iterator[Metric]:
        return self._families(self._stats, _METRIC_KINDS)

    def text(self) -> str:
        """The same families in the Prometheus text format, written directly: prometheus-client
        builds a Sample and a label dict per series and validates each label name again, about
        20 µs a series; with max_destinations clusters (30,000 series) that was half a second.
        tests/unit/test_scrape.py checks that both give the same exposition."""
        return "".join(self.text_parts())

    def text_parts(self, chunk: int = 1) -> Iterator[str]:
        """`text()` in pieces, each a few ms of work: the cluster families are written for
        `chunk` clusters at a time (an empty piece between chunks), then joined per family."""
        stats = self._stats
        clusters = list(stats.clusters.values())
        merged: list[Any] = []
        for start in range(0, len(clusters) or 1, chunk):
            part = Stats()
            part.clusters = {c.name: c for c in clusters[start:start + chunk]}
            families = list(self._cluster_families(part, _TEXT_KINDS))
            if not merged:
                merged = families
            else:
                for into, more in zip(merged, families, strict=True):
                    into.lines.extend(more.lines[1:])  # [0] is the HELP/TYPE head
            yield ""
        for family in merged:
            yield family.text()
        for family in self._listener_families(stats, _TEXT_KINDS):
            yield family.text()
        for family in self._process_families(stats, _TEXT_KINDS):
            yield family.text()

    def _families(self, stats: Stats, k: Any) -> Iterator[Any]:
        # Read where `stats` cannot change meanwhile: on the event loop thread (the only writer
        # of the live stats), or anywhere from a `Stats.snapshot()`.
        yield from self._cluster_families(stats, k)
        yield from self._listener_families(stats, k)
        yield from self._process_families(stats, k)

    def _cluster_families(self, stats: Stats, k: Any) -> Iterator[Any]:
        clusters = list(stats.clusters.values())
        # The gauges callback walks live pools: call it once per cluster per scrape.
        gauges = {c.name: (c.gauges() if c.gauges is not None else _NO_GAUGES) for c in clusters}

        requests = k.counter(
            "sidecar_requests",
            "Requests answered to the app, by listener, cluster and status class.",
            labels=["listener", "cluster", "code_class"],
        )
        for c in clusters:
            for (listener, code_class), n in sorted(c.requests.items()):
                requests.add_metric([listener, c.name, code_class], n)
        yield requests

        duration = k.histogram(
            "sidecar_request_duration_seconds",
            "Time from the request head to the end of the response, per cluster.",
            labels=["cluster"],
        )
        for c in clusters:
            _histogram(duration, [c.name], c.request_duration)
        yield duration

        connections = k.gauge(
            "sidecar_upstream_connections",
            "Upstream connections by state: active (in use) or idle (pooled).",
            labels=["cluster", "state"],
        )
        for c in clusters:
            g = gauges[c.name]
            connections.add_metric([c.name, "active"], g.active)
            connections.add_metric([c.name, "idle"], g.idle)
        yield connections

        opened = k.counter(
            "sidecar_upstream_connections_opened",
            "Upstream connections opened.",
            labels=["cluster"],
        )
        for c in clusters:
            opened.add_metric([c.name], c.connections_opened)
        yield opened

        closed = k.counter(
            "sidecar_upstream_connections_closed",
            "Upstream connections closed, by reason.",
            labels=["cluster", "reason"],
        )
        for c in clusters:
            for reason, n in c.connections_closed.items():
                closed.add_metric([c.name, reason], n)
        yield closed

        connect = k.histogram(
            "sidecar_upstream_connect_duration_seconds",
            "Time to open an upstream connection, TLS handshake included.",
            labels=["cluster"],
        )
        for c in clusters:
            _histogram(connect, [c.name], c.connect_duration)
        yield connect

        pending = k.gauge(
            "sidecar_pool_pending_requests",
            "Requests waiting for an upstream connection.",
            labels=["cluster"],
        )
        for c in clusters:
            pending.add_metric([c.name], gauges[c.name].pending)
        yield pending

        pool_wait = k.histogram(
            "sidecar_pool_wait_duration_seconds",
            "Time a request waited for an upstream connection.",
            labels=["cluster"],
        )
        for c in clusters:
            _histogram(pool_wait, [c.name], c.pool_wait)
        yield pool_wait

        tls = k.counter(
            "sidecar_tls_handshakes",
            "TLS handshakes with upstreams, by whether the session was resumed.",
            labels=["cluster", "resumed"],
        )
        for c in clusters:
            for resumed in (True, False):
                tls.add_metric([c.name, "true" if resumed else "false"], c.tls_handshakes[resumed])
        yield tls

        breaker = k.gauge(
            "sidecar_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
            labels=["cluster"],
        )
        for c in clusters:
            breaker.add_metric([c.name], gauges[c.name].breaker_state)
        yield breaker

        transitions = k.counter(
            "sidecar_circuit_breaker_transitions",
            "Circuit breaker transitions, by the state entered.",
            labels=["cluster", "to"],
        )
        for c in clusters:
            for to, n in c.breaker_transitions.items():
                transitions.add_metric([c.name, to], n)
        yield transitions

        retries = k.counter(
            "sidecar_retries",
            "Requests retried, by the reason of the failed try.",
            labels=["cluster", "reason"],
        )
        for c in clusters:
            for reason, n in c.retries.items():
                retries.add_metric([c.name, reason], n)
        yield retries

        budget = k.counter(
            "sidecar_retry_budget_exhausted",
            "Retries skipped because the retry budget was spent.",
            labels=["cluster"],
        )
        for c in clusters:
            budget.add_metric([c.name], c.retry_budget_exhausted)
        yield budget

        healthy = k.gauge(
            "sidecar_endpoint_healthy",
            "1 when the endpoint is healthy, else 0.",
            labels=["cluster", "endpoint"],
        )
        endpoints = k.gauge(
            "sidecar_endpoints",
            "Endpoints of the cluster by state: serving, unhealthy, ejected, terminating "
            "(beyond SPEC section 8).",
            labels=["cluster", "state"],
        )
        for c in clusters:
            counts = dict.fromkeys(ENDPOINT_STATES, 0)
            for ep in gauges[c.name].endpoints:
                healthy.add_metric([c.name, ep.address], 1 if ep.healthy else 0)
                counts[ep.state] = counts.get(ep.state, 0) + 1
            for state, n in counts.items():
                endpoints.add_metric([c.name, state], n)
        yield healthy
        yield endpoints

        ejections = k.counter(
            "sidecar_outlier_ejections",
            "Endpoints ejected by outlier detection.",
            labels=["cluster"],
        )
        for c in clusters:
            ejections.add_metric([c.name], c.outlier_ejections)
        yield ejections

        checks = k.counter(
            "sidecar_health_checks",
            "Active health checks, by result.",
            labels=["cluster", "result"],
        )
        for c in clusters:
            for result, n in c.health_checks.items():
                checks.add_metric([c.name, result], n)
        yield checks

        local = k.counter(
            "sidecar_local_errors",
            "Responses the sidecar made itself, by x-sidecar-error code.",
            labels=["cluster", "code"],
        )
        for c in clusters:
            for code, n in c.local_errors.items():
                local.add_metric([c.name, code], n)
        yield local

        grpc = k.counter(
            "sidecar_grpc_responses",
            "gRPC answers given to the app, by grpc-status name (the sidecar's own included).",
            labels=["cluster", "status"],
        )
        for c in clusters:
            for status, n in zip(GRPC_STATUS_NAMES, c.grpc_responses, strict=True):
                grpc.add_metric([c.name, status], n)
        yield grpc

        streams = k.gauge(
            "sidecar_upstream_streams",
            "Open HTTP/2 streams to the cluster's endpoints.",
            labels=["cluster"],
        )
        for c in clusters:
            streams.add_metric([c.name], gauges[c.name].streams)
        yield streams

    def _listener_families(self, stats: Stats, k: Any) -> Iterator[Any]:
        listeners = list(stats.listeners.values())
        downstream = k.gauge(
            "sidecar_downstream_connections",
            "Open app connections to the listener.",
            labels=["listener"],
        )
        inflight = k.gauge(
            "sidecar_inflight_requests",
            "Requests in flight on the listener.",
            labels=["listener"],
        )
        shed = k.counter(
            "sidecar_downstream_connections_shed",
            "App connections closed on accept (EMFILE or max_connections; beyond SPEC section 8).",
            labels=["listener"],
        )
        internal = k.counter(
            "sidecar_internal_errors",
            "Unexpected exceptions inside the sidecar, each answered to the app (400 or 502 "
            "internal); the traceback is logged at most once per interval (beyond SPEC "
            "section 8).",
            labels=["listener"],
        )
        abuse = k.counter(
            "sidecar_http2_abuse",
            "HTTP/2 attacks bounded on app connections, by kind (SPEC section 11; beyond "
            "SPEC section 8).",
            labels=["listener", "kind"],
        )
        for lst in listeners:
            downstream.add_metric([lst.name], lst.downstream_connections)
            inflight.add_metric([lst.name], lst.inflight)
            shed.add_metric([lst.name], lst.shed_connections)
            internal.add_metric([lst.name], lst.internal_errors)
            for kind, n in lst.http2_abuse.items():
                abuse.add_metric([lst.name, kind], n)
        yield downstream
        yield inflight
        yield shed
        yield internal
        yield abuse

    def _process_families(self, stats: Stats, k: Any) -> Iterator[Any]:
        p = stats.process
        yield k.gauge(
            "sidecar_drain_state",
            "Drain state: 0 serving, 1 draining, 2 drained.",
            value=p.drain_state,
        )
        yield k.counter(
            "sidecar_drain_aborted_connections",
            "Connections still busy at the drain grace deadline, aborted with RST.",
            value=p.drain_aborted,
        )
        lag = k.histogram(
            "sidecar_event_loop_lag_seconds",
            "How late the event loop woke up for a timer.",
        )
        _histogram(lag, [], p.event_loop_lag)
        yield lag
        reloads = k.counter(
            "sidecar_config_reloads",
            "Configuration reloads, by result.",
            labels=["result"],
        )
        for result, n in p.config_reloads.items():
            reloads.add_metric([result], n)
        yield reloads
        yield k.gauge(
            "sidecar_forward_proxy_destinations",
            "Forward-proxy destinations (dynamic clusters) now; at most max_destinations "
            "(beyond SPEC section 8).",
            value=p.forward_destinations,
        )
        events = k.counter(
            "sidecar_forward_proxy_destination_events",
            "Forward-proxy destinations created, removed (expired after 10 idle minutes, "
            "evicted at max_destinations, unresolvable) or refused (503 too_many_destinations); "
            "beyond SPEC section 8.",
            labels=["event"],
        )
        for event, n in p.forward_events.items():
            events.add_metric([event], n)
        yield events


class DiscoveryCollector(Collector):
    """Discovery's own counters (beyond SPEC section 8): `source()` yields (cluster, stats)
    pairs whose objects have `updates`, `errors` (kind -> n), `watch_restarts`, `relists` and
    `last_success` (wall-clock seconds or None), as `sidecar.discovery.stats.DiscoveryStats`."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        updates = CounterMetricFamily(
            "sidecar_discovery_updates", "Endpoint updates applied, per cluster.",
            labels=["cluster"])
        errors = CounterMetricFamily(
            "sidecar_discovery_errors", "Discovery failures by kind; the last endpoints "
            "keep serving.", labels=["cluster", "kind"])
        restarts = CounterMetricFamily(
            "sidecar_discovery_watch_restarts", "Watches opened again.", labels=["cluster"])
        relists = CounterMetricFamily(
            "sidecar_discovery_relists", "Full lists after the first (410 Expired, recovery).",
            labels=["cluster"])
        last = GaugeMetricFamily(
            "sidecar_discovery_last_success_timestamp_seconds",
            "When discovery last had a current answer (Unix time).", labels=["cluster"])
        for name, st in self._source():
            updates.add_metric([name], st.updates)
            for kind, n in st.errors.items():
                errors.add_metric([name, kind], n)
            restarts.add_metric([name], st.watch_restarts)
            relists.add_metric([name], st.relists)
            if st.last_success is not None:
                last.add_metric([name], st.last_success)
        yield from (updates, errors, restarts, relists, last)


def build_registry(stats: Stats) -> CollectorRegistry:
    """A fresh registry (never the global default, so tests and reloads cannot collide) with
    the stats collector and the process collector (RSS, CPU, open fds). More collectors, such
    as discovery's, can be added later with `registry.register`."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The scrape body in the Prometheus text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Families:
    """What `generate_latest` needs of a registry: `collect()`."""

    def __init__(self, collectors: list[Any]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


class _Collected(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


# The longest the scrape keeps the loop at a stretch: what it copies or writes in that time
# (one cluster's numbers, or its lines) is the unit of work between two checks.
_SLICE = 0.005


class Scraper:
    """Renders /metrics without stalling the data path (SPEC section 5: a scrape of the largest
    series set the limits allow costs the event loop at most 50 ms).

    With `forward_proxy.max_destinations` (256) clusters the body is about 2.7 MB, and
    prometheus-client took about half a second to build and format it, all on the loop: every
    request waited as long. Here the loop copies the numbers (`ClusterStats.snapshot`, and the
    small discovery families), then writes the text from the copy, which nothing else touches,
    directly rather than through prometheus-client objects (`StatsCollector.text`, about 8x
    cheaper), giving the loop back every 5 ms. A worker thread was tried instead: it holds the
    GIL a switch interval at a time, and under load the loop waited longer than with slices.
    Concurrent scrapes share one rendering. `bench/scrape_cost.py` measures it."""

    def __init__(self, stats: Stats, on_loop: list[Collector] | None = None) -> None:
        self._stats = stats
        self._on_loop = on_loop or []  # more collectors (discovery), read in one go
        self._process = ProcessCollector(registry=None)
        self._running: asyncio.Future[tuple[bytes, str]] | None = None

    async def render(self) -> tuple[bytes, str]:
        running = self._running
        if running is None or running.done():
            running = self._running = asyncio.ensure_future(self._render())
        return await asyncio.shield(running)

    async def _render(self) -> tuple[bytes, str]:
        stats = self._stats
        snapshot = Stats()
        snapshot.listeners = {name: li.snapshot() for name, li in stats.listeners.items()}
        snapshot.process = stats.process.snapshot()
        clock = time.perf_counter
        pause = clock() + _SLICE
        for c in list(stats.clusters.values()):
            snapshot.clusters[c.name] = c.snapshot()
            if clock() >= pause:
                await asyncio.sleep(0)  # requests run in between
                pause = clock() + _SLICE
        collected = [family for c in self._on_loop for family in c.collect()]
        parts = []
        for part in StatsCollector(snapshot).text_parts():
            parts.append(part)
            if clock() >= pause:
                await asyncio.sleep(0)
                pause = clock() + _SLICE
        others = _Families([self._process, _Collected(collected)])
        encoded = []
        for part in parts:
            encoded.append(part.encode())
            if clock() >= pause:
                await asyncio.sleep(0)
                pause = clock() + _SLICE
        encoded.append(generate_latest(others))
        body = b"".join(encoded)
        return body, CONTENT_TYPE_LATEST
