"""The exported metrics are the ones docs/metrics.md documents: names, types and label names."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.discovery.stats import DiscoveryStats
from sidecar.observe.metrics import DiscoveryCollector, StatsCollector, build_registry, render
from sidecar.observe.stats import ClusterGauges, EndpointGauge, Stats
from tests.docs import metrics_table, process_metrics

# What docs/metrics.md promises: the dashboard's set, then the further metrics.
DOC_METRICS = metrics_table("Metrics")
FURTHER_METRICS = metrics_table("Further metrics")


def scrape() -> str:
    """A scrape of a registry built as the app builds it, where every family has series."""
    stats = Stats()
    cluster = stats.cluster("c1")
    cluster.expect_listener("l1")
    # With an endpoint, so that sidecar_endpoint_healthy has a series whose labels we can read.
    cluster.gauges = lambda: ClusterGauges(endpoints=[EndpointGauge("10.0.0.1:80", True)])
    stats.listener("l1")
    registry = build_registry(stats)
    discovery = DiscoveryStats()
    discovery.error("api")
    discovery.last_success = 1.0
    registry.register(DiscoveryCollector(lambda: [("c1", discovery)]))
    body, _ = render(registry)
    return body.decode()


def exported(prefix: str = "sidecar_") -> dict[str, tuple[str, frozenset[str]]]:
    """{exposition name: (type, label names)} of the families named `prefix...`."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for fam in text_string_to_metric_families(scrape()):
        if not fam.name.startswith(prefix):
            continue
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        assert fam.samples, f"{name} has no series"
        out[name] = (fam.type, frozenset(labels))
    return out


def test_exported_names_types_and_labels_are_the_documented_ones() -> None:
    assert exported() == {**DOC_METRICS, **FURTHER_METRICS}, (
        "the exporter and docs/metrics.md disagree: document a new metric there (the first "
        "table is what the Grafana dashboard draws)"
    )


def test_the_documented_process_metrics_are_exported() -> None:
    promised = process_metrics()
    assert promised, "docs/metrics.md names no process_* metric"
    assert promised <= set(exported("process_"))


def test_every_family_is_described_even_with_no_clusters() -> None:
    # HELP/TYPE exist before any cluster does, and describe() lets the registry refuse a
    # second collector that would reuse our names.
    body, _ = render(build_registry(Stats()))
    text = body.decode()
    for name, (kind, _) in {**DOC_METRICS, **FURTHER_METRICS}.items():
        if name.startswith("sidecar_discovery_"):
            continue  # discovery's collector describes nothing: its families come with clusters
        assert f"# TYPE {name} {kind}\n" in text, name
    registry = CollectorRegistry()
    registry.register(StatsCollector(Stats()))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(StatsCollector(Stats()))


def test_breaker_state_is_zero_without_gauges() -> None:
    stats = Stats()
    stats.cluster("c1")
    body, content_type = render(build_registry(stats))
    assert 'sidecar_circuit_breaker_state{cluster="c1"} 0.0' in body.decode().splitlines()
    assert content_type.startswith("text/plain")
