#!/usr/bin/env python3
"""Generate the Grafana dashboard of the connection sidecar: helm/dashboards/sidecar.json.

The JSON is an output, never edited by hand: change this file, run it, commit both. A test
checks that the committed JSON equals what this writes, and that every query names only
metrics of SPEC section 8. `panel_queries()` gives each query with the template variables
replaced by match-all values, so an e2e test can run them against a real Prometheus.

    python helm/dashboards/generate.py           # rewrite sidecar.json
    python helm/dashboards/generate.py --check   # exit 1 if sidecar.json is stale

Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("sidecar.json")
UID = "connection-sidecar"
TITLE = "Connection sidecar"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Label selectors. Process- and listener-level metrics carry no `cluster` label. `namespace`
# and `pod` are target labels that the ServiceMonitor/PodMonitor add; `=~".*"` also matches
# series without them (a plain scrape config), so the match-all queries work anywhere.
POD = 'namespace=~"$namespace", pod=~"$pod"'
CLUSTER = POD + ', cluster=~"$cluster"'
RATE = "$__rate_interval"

CONNECT_DURATION = "sidecar_upstream_connect_duration_seconds"
POOL_WAIT = "sidecar_pool_wait_duration_seconds"

# What panel_queries() puts in place of each variable: the values of "All".
MATCH_ALL = {"$namespace": ".*", "$pod": ".*", "$cluster": ".*"}


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | state-timeline | stat
    width: int = 8
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    field_defaults: dict[str, Any] = field(default_factory=dict)


def rate(metric: str, selector: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


def quantile(q: float, metric: str, selector: str, by: str) -> str:
    """A quantile of a histogram: only `_bucket` series, summed by `le` first."""
    return (
        f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RATE}])))"
    )


def ratio(numerator: str, denominator: str) -> str:
    return f"{numerator}\n/\n{denominator}"


STATE_MAPPINGS = {
    "breaker": [(0, "closed", "green"), (1, "open", "red"), (2, "half-open", "orange")],
    "drain": [(0, "serving", "green"), (1, "draining", "orange"), (2, "drained", "blue")],
}


def value_mappings(name: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "value",
            "options": {
                str(value): {"text": text, "color": color, "index": index}
                for index, (value, text, color) in enumerate(STATE_MAPPINGS[name])
            },
        }
    ]


def state_timeline(title: str, description: str, targets: list[Target], states: str) -> Panel:
    return Panel(
        title=title,
        description=description,
        targets=targets,
        kind="state-timeline",
        width=12,
        options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8},
        field_defaults={
            "mappings": value_mappings(states),
            "color": {"mode": "thresholds"},
            "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]},
        },
    )


def rows() -> list[tuple[str, list[Panel]]]:
    """The dashboard, top to bottom: (row title, panels)."""
    requests = "sidecar_requests_total"
    return [
        (
            "Traffic",
            [
                Panel(
                    "Request rate by cluster",
                    "Requests per second the sidecar completed, per upstream cluster.",
                    [Target(rate(requests, CLUSTER, "cluster"), "{{cluster}}")],
                    unit="reqps",
                ),
                Panel(
                    "Error ratio by cluster (5xx)",
                    "Share of requests answered 5xx, upstream or synthetic "
                    "(x-sidecar-error), per cluster.",
                    [
                        Target(
                            ratio(
                                rate(requests, CLUSTER + ', code_class="5xx"', "cluster"),
                                rate(requests, CLUSTER, "cluster"),
                            ),
                            "{{cluster}}",
                        )
                    ],
                    unit="percentunit",
                ),
                Panel(
                    "Latency p50 / p99 by cluster",
                    "Request duration as the app sees it, retries included.",
                    [
                        Target(
                            quantile(0.5, "sidecar_request_duration_seconds", CLUSTER, "cluster"),
                            "p50 {{cluster}}",
                        ),
                        Target(
                            quantile(0.99, "sidecar_request_duration_seconds", CLUSTER, "cluster"),
                            "p99 {{cluster}}",
                        ),
                    ],
                    unit="s",
                ),
                Panel(
                    "Responses by code class",
                    "Requests per second by listener, cluster and status class.",
                    [
                        Target(
                            rate(requests, CLUSTER, "listener, cluster, code_class"),
                            "{{listener}} {{cluster}} {{code_class}}",
                        )
                    ],
                    unit="reqps",
                ),
                Panel(
                    "Local errors by code",
                    "Responses the sidecar made itself, by x-sidecar-error code.",
                    [
                        Target(
                            rate("sidecar_local_errors_total", CLUSTER, "cluster, code"),
                            "{{cluster}} {{code}}",
                        )
                    ],
                    unit="reqps",
                ),
                Panel(
                    "Downstream connections and in-flight by listener",
                    "App connections open to each listener, and requests in flight on them.",
                    [
                        Target(
                            f"sum by (listener) (sidecar_downstream_connections{{{POD}}})",
                            "connections {{listener}}",
                        ),
                        Target(
                            f"sum by (listener) (sidecar_inflight_requests{{{POD}}})",
                            "in flight {{listener}}",
                        ),
                    ],
                ),
            ],
        ),
        (
            "Upstream connections",
            [
                Panel(
                    "Upstream connections active / idle",
                    "Pooled connections per cluster: in use and idle.",
                    [
                        Target(
                            f"sum by (cluster, state) (sidecar_upstream_connections{{{CLUSTER}}})",
                            "{{cluster}} {{state}}",
                        )
                    ],
                ),
                Panel(
                    "Upstream connections opened / closed",
                    "Connections opened per second, and closed per second by reason. Many "
                    "opens with few requests means pooling is not working.",
                    [
                        Target(
                            rate("sidecar_upstream_connections_opened_total", CLUSTER, "cluster"),
                            "opened {{cluster}}",
                        ),
                        Target(
                            rate(
                                "sidecar_upstream_connections_closed_total",
                                CLUSTER,
                                "cluster, reason",
                            ),
                            "closed {{cluster}} {{reason}}",
                        ),
                    ],
                    unit="ops",
                ),
                Panel(
                    "Connect time p99",
                    "TCP connect plus TLS handshake, per cluster.",
                    [
                        Target(
                            quantile(0.99, CONNECT_DURATION, CLUSTER, "cluster"),
                            "p99 {{cluster}}",
                        )
                    ],
                    unit="s",
                ),
                Panel(
                    "Pool wait p99",
                    "Time a request waited for a pooled connection.",
                    [
                        Target(
                            quantile(0.99, POOL_WAIT, CLUSTER, "cluster"),
                            "p99 {{cluster}}",
                        )
                    ],
                    unit="s",
                ),
                Panel(
                    "Pool pending requests",
                    "Requests queued for a connection (bounded by pool.max_pending).",
                    [
                        Target(
                            f"sum by (cluster) (sidecar_pool_pending_requests{{{CLUSTER}}})",
                            "{{cluster}}",
                        )
                    ],
                ),
                Panel(
                    "TLS resumption ratio",
                    "Share of TLS handshakes that resumed a session (cheaper, one round trip).",
                    [
                        Target(
                            ratio(
                                rate(
                                    "sidecar_tls_handshakes_total",
                                    CLUSTER + ', resumed="true"',
                                    "cluster",
                                ),
                                rate("sidecar_tls_handshakes_total", CLUSTER, "cluster"),
                            ),
                            "{{cluster}}",
                        )
                    ],
                    unit="percentunit",
                ),
            ],
        ),
        (
            "gRPC and HTTP/2",
            [
                Panel(
                    "gRPC responses by status",
                    "gRPC answers per second per cluster, by grpc-status (the sidecar's own "
                    "gRPC errors included).",
                    [
                        Target(
                            rate("sidecar_grpc_responses_total", CLUSTER, "cluster, status"),
                            "{{cluster}} {{status}}",
                        )
                    ],
                    unit="reqps",
                    width=6,
                ),
                Panel(
                    "gRPC error ratio (not ok)",
                    "Share of gRPC answers whose grpc-status is not ok, per cluster.",
                    [
                        Target(
                            ratio(
                                rate(
                                    "sidecar_grpc_responses_total",
                                    CLUSTER + ', status!="ok"',
                                    "cluster",
                                ),
                                rate("sidecar_grpc_responses_total", CLUSTER, "cluster"),
                            ),
                            "{{cluster}}",
                        )
                    ],
                    unit="percentunit",
                    width=6,
                ),
                Panel(
                    "Open upstream streams",
                    "HTTP/2 streams open to each cluster's endpoints (many streams share few "
                    "connections).",
                    [
                        Target(
                            f"sum by (cluster) (sidecar_upstream_streams{{{CLUSTER}}})",
                            "{{cluster}}",
                        )
                    ],
                    width=6,
                ),
                Panel(
                    "HTTP/2 abuse by kind",
                    "HTTP/2 attacks met on app connections and bounded (rapid reset, "
                    "CONTINUATION flood, HPACK bomb, SETTINGS/PING flood, zero-window stall). "
                    "Should stay 0.",
                    [
                        Target(
                            f"sum by (listener, kind) (increase("
                            f"sidecar_http2_abuse_total{{{POD}}}[{RATE}]))",
                            "{{listener}} {{kind}}",
                        )
                    ],
                    width=6,
                ),
            ],
        ),
        (
            "Resilience",
            [
                state_timeline(
                    "Circuit breaker state",
                    "Per cluster: closed, open (requests refused with circuit_open), half-open.",
                    [
                        Target(
                            f"max by (cluster) (sidecar_circuit_breaker_state{{{CLUSTER}}})",
                            "{{cluster}}",
                        )
                    ],
                    "breaker",
                ),
                Panel(
                    "Circuit breaker transitions",
                    "Breaker transitions per cluster and target state.",
                    [
                        Target(
                            f"sum by (cluster, to) (increase("
                            f"sidecar_circuit_breaker_transitions_total{{{CLUSTER}}}[{RATE}]))",
                            "{{cluster}} to {{to}}",
                        )
                    ],
                    width=12,
                ),
                Panel(
                    "Retries by reason",
                    "Retries per second per cluster and reason.",
                    [
                        Target(
                            rate("sidecar_retries_total", CLUSTER, "cluster, reason"),
                            "{{cluster}} {{reason}}",
                        )
                    ],
                    unit="ops",
                    width=12,
                ),
                Panel(
                    "Retry budget exhausted",
                    "Retries skipped because the cluster's retry budget was spent.",
                    [
                        Target(
                            rate("sidecar_retry_budget_exhausted_total", CLUSTER, "cluster"),
                            "{{cluster}}",
                        )
                    ],
                    unit="ops",
                    width=12,
                ),
            ],
        ),
        (
            "Endpoints",
            [
                Panel(
                    "Healthy endpoints",
                    "Endpoints passing health checks, and all known endpoints, per cluster.",
                    [
                        Target(
                            f"sum by (cluster) (sidecar_endpoint_healthy{{{CLUSTER}}})",
                            "healthy {{cluster}}",
                        ),
                        Target(
                            f"count by (cluster) (sidecar_endpoint_healthy{{{CLUSTER}}})",
                            "known {{cluster}}",
                        ),
                    ],
                ),
                Panel(
                    "Outlier ejections",
                    "Endpoints ejected by outlier detection per interval.",
                    [
                        Target(
                            f"sum by (cluster) (increase("
                            f"sidecar_outlier_ejections_total{{{CLUSTER}}}[{RATE}]))",
                            "{{cluster}}",
                        )
                    ],
                ),
                Panel(
                    "Health checks by result",
                    "Active health checks per second, by result.",
                    [
                        Target(
                            rate("sidecar_health_checks_total", CLUSTER, "cluster, result"),
                            "{{cluster}} {{result}}",
                        )
                    ],
                    unit="ops",
                ),
            ],
        ),
        (
            "Lifecycle",
            [
                state_timeline(
                    "Drain state",
                    "Per pod: serving, draining (readyz 503, in-flight work finishing), drained.",
                    [Target(f"max by (pod) (sidecar_drain_state{{{POD}}})", "{{pod}}")],
                    "drain",
                ),
                Panel(
                    "Connections aborted at drain deadline",
                    "Sockets still busy when drain.grace ran out (closed with RST). Should stay 0.",
                    [
                        Target(
                            f"sum by (pod) (increase("
                            f"sidecar_drain_aborted_connections_total{{{POD}}}[{RATE}]))",
                            "{{pod}}",
                        )
                    ],
                    width=12,
                ),
                Panel(
                    "Event loop lag p99",
                    "How late the event loop runs its timers: CPU starvation or blocking code.",
                    [
                        Target(
                            quantile(0.99, "sidecar_event_loop_lag_seconds", POD, "pod"),
                            "p99 {{pod}}",
                        )
                    ],
                    unit="s",
                    width=12,
                ),
                Panel(
                    "Config reloads",
                    "Config file reloads per interval: applied, or rejected (old config kept).",
                    [
                        Target(
                            f"sum by (result) (increase("
                            f"sidecar_config_reloads_total{{{POD}}}[{RATE}]))",
                            "{{result}}",
                        )
                    ],
                    width=12,
                ),
            ],
        ),
    ]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.unit == "percentunit":
        defaults.update({"min": 0, "max": 1})
    defaults.update(panel.field_defaults)
    options: dict[str, Any] = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    options.update(panel.options)
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "datasource": DATASOURCE,
                "refId": chr(ord("A") + index),
                "expr": target.expr,
                "legendFormat": target.legend,
                "range": True,
            }
            for index, target in enumerate(panel.targets)
        ],
    }


def _query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,  # on time range change
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def templating() -> dict[str, Any]:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "refresh": 1,
                "current": {},
                "hide": 0,
            },
            _query_variable(
                "namespace", "Namespace", "label_values(sidecar_requests_total, namespace)"
            ),
            _query_variable(
                "pod",
                "Pod",
                'label_values(sidecar_requests_total{namespace=~"$namespace"}, pod)',
            ),
            _query_variable(
                "cluster",
                "Upstream cluster",
                "label_values(sidecar_upstream_connections"
                '{namespace=~"$namespace", pod=~"$pod"}, cluster)',
            ),
        ]
    }


def build_dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row_title, row_panels in rows():
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "uid": UID,
        "title": TITLE,
        "description": "Per-pod egress proxy: traffic, pools, gRPC and HTTP/2, resilience, "
        "endpoints, drain. Generated by helm/dashboards/generate.py.",
        "tags": ["connection-sidecar", "proxy", "kubernetes"],
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": templating(),
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, ensure_ascii=False) + "\n"


def panel_queries(rate_interval: str = "1m") -> list[tuple[str, str]]:
    """(title, PromQL) of every panel target, variables replaced by their match-all values
    and `$__rate_interval` by `rate_interval`. Panels with several targets give one entry per
    target, titled "<panel title> [<refId>]"."""
    out: list[tuple[str, str]] = []
    for panel in build_dashboard()["panels"]:
        targets = panel.get("targets", [])
        for target in targets:
            expr = target["expr"].replace(RATE, rate_interval)
            for variable, value in MATCH_ALL.items():
                expr = expr.replace(variable, value)
            title = panel["title"]
            if len(targets) > 1:
                title = f"{title} [{target['refId']}]"
            out.append((title, expr))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
