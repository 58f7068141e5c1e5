"""Export the `stats` counters as the Prometheus metrics of SPEC section 8, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from sidecar.observe.stats import ENDPOINT_STATES, ClusterGauges, Histogram, Stats

_NO_GAUGES = ClusterGauges()  # what a cluster reports before it installed its callback


def _histogram(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    family.add_metric(labels, hist.cumulative(), hist.sum)


class StatsCollector(Collector):
    """Yields every family of SPEC section 8 from one `Stats` root, on each scrape.

    Counter families are named without `_total`; prometheus-client appends it in the exposition.
    Families are yielded even with no series (no clusters yet), so HELP/TYPE are always there.

    Beyond SPEC section 8 (extras an operator of Envoy would look for):
    - `sidecar_downstream_connections_shed_total{listener}`: app connections accepted and closed
      at once because of EMFILE or `max_connections` (SPEC section 5 says they are counted).
    - `sidecar_internal_errors_total{listener}`: unexpected exceptions caught and answered
      (SPEC section 5: the app always gets an answer; the log line is rate-limited).
    - `sidecar_endpoints{cluster,state}`: endpoints per cluster by health, `healthy`/`unhealthy`;
      one series per state, unlike the per-endpoint `sidecar_endpoint_healthy`.
    """

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        # Lets the registry refuse a later collector (discovery stats...) that reuses our names.
        return self._families(Stats())

    def collect(self) -> Iterator[Metric]:
        return self._families(self._stats)

    def _families(self, stats: Stats) -> Iterator[Metric]:
        # Scrapes run on the event loop thread, the only writer of `stats`, so iterating these
        # dicts cannot race with a data-path insert ("dictionary changed size during iteration").
        yield from self._cluster_families(stats)
        yield from self._listener_families(stats)
        yield from self._process_families(stats)

    def _cluster_families(self, stats: Stats) -> Iterator[Metric]:
        clusters = list(stats.clusters.values())
        # The gauges callback walks live pools: call it once per cluster per scrape.
        gauges = {c.name: (c.gauges() if c.gauges is not None else _NO_GAUGES) for c in clusters}

        requests = CounterMetricFamily(
            "sidecar_requests",
            "Requests answered to the app, by listener, cluster and status class.",
            labels=["listener", "cluster", "code_class"],
        )
        for c in clusters:
            for (listener, code_class), n in sorted(c.requests.items()):
                requests.add_metric([listener, c.name, code_class], n)
        yield requests

        duration = HistogramMetricFamily(
            "sidecar_request_duration_seconds",
            "Time from the request head to the end of the response, per cluster.",
            labels=["cluster"],
        )
        for c in clusters:
            _histogram(duration, [c.name], c.request_duration)
        yield duration

        connections = GaugeMetricFamily(
            "sidecar_upstream_connections",
            "Upstream connections by state: active (in use) or idle (pooled).",
            labels=["cluster", "state"],
        )
        for c in clusters:
            g = gauges[c.name]
            connections.add_metric([c.name, "active"], g.active)
            connections.add_metric([c.name, "idle"], g.idle)
        yield connections

        opened = CounterMetricFamily(
            "sidecar_upstream_connections_opened",
            "Upstream connections opened.",
            labels=["cluster"],
        )
        for c in clusters:
            opened.add_metric([c.name], c.connections_opened)
        yield opened

        closed = CounterMetricFamily(
            "sidecar_upstream_connections_closed",
            "Upstream connections closed, by reason.",
            labels=["cluster", "reason"],
        )
        for c in clusters:
            for reason, n in c.connections_closed.items():
                closed.add_metric([c.name, reason], n)
        yield closed

        connect = HistogramMetricFamily(
            "sidecar_upstream_connect_duration_seconds",
            "Time to open an upstream connection, TLS handshake included.",
            labels=["cluster"],
        )
        for c in clusters:
            _histogram(connect, [c.name], c.connect_duration)
        yield connect

        pending = GaugeMetricFamily(
            "sidecar_pool_pending_requests",
            "Requests waiting for an upstream connection.",
            labels=["cluster"],
        )
        for c in clusters:
            pending.add_metric([c.name], gauges[c.name].pending)
        yield pending

        pool_wait = HistogramMetricFamily(
            "sidecar_pool_wait_duration_seconds",
            "Time a request waited for an upstream connection.",
            labels=["cluster"],
        )
        for c in clusters:
            _histogram(pool_wait, [c.name], c.pool_wait)
        yield pool_wait

        tls = CounterMetricFamily(
            "sidecar_tls_handshakes",
            "TLS handshakes with upstreams, by whether the session was resumed.",
            labels=["cluster", "resumed"],
        )
        for c in clusters:
            for resumed in (True, False):
                tls.add_metric([c.name, "true" if resumed else "false"], c.tls_handshakes[resumed])
        yield tls

        breaker = GaugeMetricFamily(
            "sidecar_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
            labels=["cluster"],
        )
        for c in clusters:
            breaker.add_metric([c.name], gauges[c.name].breaker_state)
        yield breaker

        transitions = CounterMetricFamily(
            "sidecar_circuit_breaker_transitions",
            "Circuit breaker transitions, by the state entered.",
            labels=["cluster", "to"],
        )
        for c in clusters:
            for to, n in c.breaker_transitions.items():
                transitions.add_metric([c.name, to], n)
        yield transitions

        retries = CounterMetricFamily(
            "sidecar_retries",
            "Requests retried, by the reason of the failed try.",
            labels=["cluster", "reason"],
        )
        for c in clusters:
            for reason, n in c.retries.items():
                retries.add_metric([c.name, reason], n)
        yield retries

        budget = CounterMetricFamily(
            "sidecar_retry_budget_exhausted",
            "Retries skipped because the retry budget was spent.",
            labels=["cluster"],
        )
        for c in clusters:
            budget.add_metric([c.name], c.retry_budget_exhausted)
        yield budget

        healthy = GaugeMetricFamily(
            "sidecar_endpoint_healthy",
            "1 when the endpoint is healthy, else 0.",
            labels=["cluster", "endpoint"],
        )
        endpoints = GaugeMetricFamily(
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

        ejections = CounterMetricFamily(
            "sidecar_outlier_ejections",
            "Endpoints ejected by outlier detection.",
            labels=["cluster"],
        )
        for c in clusters:
            ejections.add_metric([c.name], c.outlier_ejections)
        yield ejections

        checks = CounterMetricFamily(
            "sidecar_health_checks",
            "Active health checks, by result.",
            labels=["cluster", "result"],
        )
        for c in clusters:
            for result, n in c.health_checks.items():
                checks.add_metric([c.name, result], n)
        yield checks

        local = CounterMetricFamily(
            "sidecar_local_errors",
            "Responses the sidecar made itself, by x-sidecar-error code.",
            labels=["cluster", "code"],
        )
        for c in clusters:
            for code, n in c.local_errors.items():
                local.add_metric([c.name, code], n)
        yield local

    def _listener_families(self, stats: Stats) -> Iterator[Metric]:
        listeners = list(stats.listeners.values())
        downstream = GaugeMetricFamily(
            "sidecar_downstream_connections",
            "Open app connections to the listener.",
            labels=["listener"],
        )
        inflight = GaugeMetricFamily(
            "sidecar_inflight_requests",
            "Requests in flight on the listener.",
            labels=["listener"],
        )
        shed = CounterMetricFamily(
            "sidecar_downstream_connections_shed",
            "App connections closed on accept (EMFILE or max_connections; beyond SPEC section 8).",
            labels=["listener"],
        )
        internal = CounterMetricFamily(
            "sidecar_internal_errors",
            "Unexpected exceptions inside the sidecar, each answered to the app (400 or 502 "
            "internal); the traceback is logged at most once per interval (beyond SPEC "
            "section 8).",
            labels=["listener"],
        )
        for lst in listeners:
            downstream.add_metric([lst.name], lst.downstream_connections)
            inflight.add_metric([lst.name], lst.inflight)
            shed.add_metric([lst.name], lst.shed_connections)
            internal.add_metric([lst.name], lst.internal_errors)
        yield downstream
        yield inflight
        yield shed
        yield internal

    def _process_families(self, stats: Stats) -> Iterator[Metric]:
        p = stats.process
        yield GaugeMetricFamily(
            "sidecar_drain_state",
            "Drain state: 0 serving, 1 draining, 2 drained.",
            value=p.drain_state,
        )
        yield CounterMetricFamily(
            "sidecar_drain_aborted_connections",
            "Connections still busy at the drain grace deadline, aborted with RST.",
            value=p.drain_aborted,
        )
        lag = HistogramMetricFamily(
            "sidecar_event_loop_lag_seconds",
            "How late the event loop woke up for a timer.",
        )
        _histogram(lag, [], p.event_loop_lag)
        yield lag
        reloads = CounterMetricFamily(
            "sidecar_config_reloads",
            "Configuration reloads, by result.",
            labels=["result"],
        )
        for result, n in p.config_reloads.items():
            reloads.add_metric([result], n)
        yield reloads


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
