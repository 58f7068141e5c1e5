"""The exported `sidecar_*` metrics match SPEC section 8: names, types and label names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observe.metrics import StatsCollector, build_registry, render
from sidecar.observe.stats import ClusterGauges, EndpointGauge, Stats

# SPEC section 8, by hand: a change to the spec or to the exporter fails one of the tests below.
SPEC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "sidecar_requests_total": ("counter", frozenset({"listener", "cluster", "code_class"})),
    "sidecar_request_duration_seconds": ("histogram", frozenset({"cluster"})),
    "sidecar_upstream_connections": ("gauge", frozenset({"cluster", "state"})),
    "sidecar_upstream_connections_opened_total": ("counter", frozenset({"cluster"})),
    "sidecar_upstream_connections_closed_total": ("counter", frozenset({"cluster", "reason"})),
    "sidecar_upstream_connect_duration_seconds": ("histogram", frozenset({"cluster"})),
    "sidecar_pool_pending_requests": ("gauge", frozenset({"cluster"})),
    "sidecar_pool_wait_duration_seconds": ("histogram", frozenset({"cluster"})),
    "sidecar_tls_handshakes_total": ("counter", frozenset({"cluster", "resumed"})),
    "sidecar_circuit_breaker_state": ("gauge", frozenset({"cluster"})),
    "sidecar_circuit_breaker_transitions_total": ("counter", frozenset({"cluster", "to"})),
    "sidecar_retries_total": ("counter", frozenset({"cluster", "reason"})),
    "sidecar_retry_budget_exhausted_total": ("counter", frozenset({"cluster"})),
    "sidecar_endpoint_healthy": ("gauge", frozenset({"cluster", "endpoint"})),
    "sidecar_outlier_ejections_total": ("counter", frozenset({"cluster"})),
    "sidecar_health_checks_total": ("counter", frozenset({"cluster", "result"})),
    "sidecar_local_errors_total": ("counter", frozenset({"cluster", "code"})),
    "sidecar_downstream_connections": ("gauge", frozenset({"listener"})),
    "sidecar_inflight_requests": ("gauge", frozenset({"listener"})),
    "sidecar_drain_state": ("gauge", frozenset()),
    "sidecar_drain_aborted_connections_total": ("counter", frozenset()),
    "sidecar_event_loop_lag_seconds": ("histogram", frozenset()),
    "sidecar_config_reloads_total": ("counter", frozenset({"result"})),
}

# Exported beyond SPEC section 8, on purpose (documented in StatsCollector's docstring).
EXTRA_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "sidecar_downstream_connections_shed_total": ("counter", frozenset({"listener"})),
    "sidecar_endpoints": ("gauge", frozenset({"cluster", "state"})),
    "sidecar_internal_errors_total": ("counter", frozenset({"listener"})),
    "sidecar_forward_proxy_destinations": ("gauge", frozenset()),
    "sidecar_forward_proxy_destination_events_total": ("counter", frozenset({"event"})),
}

REPO = Path(__file__).resolve().parents[2]
SPEC_CANDIDATES = (Path("/work/shared/SPEC.md"), REPO.parent / "shared" / "SPEC.md")


def exported() -> dict[str, tuple[str, frozenset[str]]]:
    """{exposition name: (type, label names)} of a scrape where every family has series."""
    stats = Stats()
    cluster = stats.cluster("c1")
    cluster.expect_listener("l1")
    # With an endpoint, so that sidecar_endpoint_healthy has a series whose labels we can read.
    cluster.gauges = lambda: ClusterGauges(endpoints=[EndpointGauge("10.0.0.1:80", True)])
    stats.listener("l1")
    body, _ = render(build_registry(stats))
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        if not fam.name.startswith("sidecar_"):
            continue
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        assert fam.samples, f"{name} has no series"
        out[name] = (fam.type, frozenset(labels))
    return out


def parse_spec_table(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """The rows of the SPEC section 8 table: `| \\`name\\` | type | labels (notes) |`."""
    section = re.search(r"^## 8\..*?(?=^## 9\.)", text, re.M | re.S)
    assert section, "SPEC.md has no section 8"
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for line in section.group(0).splitlines():
        m = re.match(r"\|\s*`(sidecar_\w+)`\s*\|\s*(\w+)\s*\|(.*)\|\s*$", line)
        if not m:
            continue
        # Parenthesised notes list label values or meanings, not label names.
        labels_text = re.sub(r"\([^)]*\)", "", m.group(3))
        labels = frozenset(p.strip() for p in labels_text.split(",") if p.strip())
        out[m.group(1)] = (m.group(2), labels)
    return out


def test_exported_names_types_and_labels_are_spec_plus_documented_extras() -> None:
    assert exported() == {**SPEC_METRICS, **EXTRA_METRICS}


def test_hard_coded_table_matches_spec_md() -> None:
    spec = next((p for p in SPEC_CANDIDATES if p.is_file()), None)
    if spec is None:
        pytest.skip("SPEC.md not found next to the repo")
    assert parse_spec_table(spec.read_text(encoding="utf-8")) == SPEC_METRICS


def test_every_family_is_described_even_with_no_clusters() -> None:
    # HELP/TYPE exist before any cluster does, and describe() lets the registry refuse a
    # second collector that would reuse our names.
    body, _ = render(build_registry(Stats()))
    text = body.decode()
    for name, (kind, _) in {**SPEC_METRICS, **EXTRA_METRICS}.items():
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
