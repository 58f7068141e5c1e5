"""The HTTP/2 keys of SPEC sections 4 and 11 (cluster `protocol`, `http2`, `retry.grpc_on`,
listener `limits.max_concurrent_streams`), `tls.alpn` agreeing with `protocol`, and the typed
seams that carry them from the config to the cluster, its pools, TLS origin and policies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from sidecar.config import (
    GRPC_STATUS_CODES,
    ClusterConfig,
    ConfigError,
    LoadBalancer,
    TlsConfig,
    config_warnings,
    parse_config,
    redacted,
)
from sidecar.observe.stats import Stats
from sidecar.policy.retry import RetryPolicy
from sidecar.timers import Wheel
from sidecar.upstream.balancer import LeastRequest, Random, RoundRobin, make_balancer
from sidecar.upstream.cluster import UPSTREAM_ALPN, Cluster
from sidecar.upstream.tls import TlsOrigin

# SPEC section 4's example, verbatim (kept here: tests read no file outside the repository).
SPEC_EXAMPLE = """\
admin:   {address: 127.0.0.1:15000}
status:  {address: 0.0.0.0:15020}

listeners:
  - name: egress                       # HTTP: routes by URI authority / Host
    address: 127.0.0.1:15001
    protocol: http
    routes:
      - match: {host: payments}         # exact host, or host_suffix, path_prefix
        cluster: payments
    forward_proxy:                      # absolute-form requests (HTTP_PROXY)
      enabled: true
      allowed_hosts: ["*.svc.cluster.local", "api.example.com"]
      connect: true                     # CONNECT tunnels (for https:// URLs)
      max_destinations: 256             # dynamic clusters
    limits:                             # per listener; defaults shown
      max_connections: 10000            # beyond it, new app connections wait in the backlog
      header_timeout: 10s               # a request head must arrive in full within this
      idle_timeout: 5m                  # idle app keep-alive connections are closed after it
      max_header_bytes: 64KiB           # larger heads get 431
      max_headers: 200                  # more header fields get 431
  - name: payments-direct               # a port dedicated to one cluster
    address: 127.0.0.1:9001
    protocol: http
    cluster: payments
  - name: redis                         # raw TCP passthrough
    address: 127.0.0.1:6380
    protocol: tcp
    cluster: redis
  - name: grpc                          # HTTP/1.1 and h2c on one port (section 11)
    address: 127.0.0.1:9002
    protocol: http
    cluster: orders

clusters:
  - name: payments
    discovery: {type: kubernetes, service: payments, namespace: shop, port: https}
    load_balancer: least_request        # round_robin | least_request | random
    protocol: auto                      # auto | http1 | http2 (section 11)
    tls:
      enabled: true
      sni: payments.shop.svc            # default: the discovery host
      ca_file: /etc/sidecar/tls/ca.pem  # default: system trust store
      cert_file: /etc/sidecar/tls/tls.crt   # mTLS, optional; reloaded on change
      key_file: /etc/sidecar/tls/tls.key
      session_reuse: true
      alpn: [http/1.1]
      min_version: TLSv1.2
      insecure_skip_verify: false       # must be explicit; logged loudly
    pool:
      max_connections: 100              # per endpoint
      min_idle: 2                       # prewarmed, per endpoint (default 0)
      max_idle: 20
      idle_timeout: 60s
      max_lifetime: 10m
      connect_timeout: 2s
      max_pending: 1000                 # requests waiting for a connection
      pending_timeout: 1s
    health_check:
      type: http                        # http | tcp | none (default none)
      path: /healthz
      interval: 5s
      timeout: 1s
      healthy_threshold: 2
      unhealthy_threshold: 3
    outlier_detection:
      consecutive_failures: 5
      base_ejection_time: 30s
      max_ejection_percent: 50
    circuit_breaker:
      failure_rate_threshold: 0.5       # over the rolling window
      minimum_requests: 20
      window: 10s
      open_duration: 30s
      half_open_max_requests: 5
      max_concurrent_requests: 1000
    retry:
      attempts: 3                       # total tries, first included
      on: [connect-failure, reset, "502", "503", "504"]
      idempotent_only: true             # or request carries Idempotency-Key
      per_try_timeout: 2s
      backoff: {base: 25ms, max: 1s}    # exponential, full jitter
      budget: {ratio: 0.2, min_per_second: 10}
      max_body_bytes: 64KiB             # larger request bodies are not replayed
    timeouts: {request: 15s}
  - name: redis
    discovery: {type: dns, host: redis.shop.svc.cluster.local, port: 6379}
  - name: orders
    discovery: {type: kubernetes, service: orders, port: grpc}
    protocol: http2                     # h2c to the endpoints; ALPN h2 when tls.enabled
    http2:
      max_concurrent_streams: 100       # per upstream connection, lowered by the peer's SETTINGS
      keepalive_interval: 30s           # PING an idle connection; dead after keepalive_timeout
      keepalive_timeout: 5s
    retry:
      grpc_on: [unavailable]            # gRPC statuses retried (only Trailers-Only answers)

drain:
  grace: 25s            # longest wait for in-flight work (below terminationGracePeriodSeconds)
  accept_period: 5s     # keep serving new app requests this long after the signal
  linger: 5s            # a graceful close (FIN) that has not finished within this is reset
  exit_on_zero_connections: true

access_log: true
"""

HEAD = """\
clusters:
  - name: orders
    discovery: {type: static, endpoints: ["127.0.0.1:50051"]}
"""


def one_cluster(body: str) -> ClusterConfig:
    return parse_config(HEAD + body, "h2.yaml").clusters[0]


def issues(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "h2.yaml")
    assert all(issue.file == "h2.yaml" for issue in caught.value.issues)
    return [(issue.line, issue.path, issue.message) for issue in caught.value.issues]


# --- the keys and their defaults ---------------------------------------------------------------


def test_the_spec_example_parses_with_its_http2_keys() -> None:
    config = parse_config(SPEC_EXAMPLE, "spec.yaml")
    orders = config.cluster("orders")
    assert orders is not None
    assert orders.protocol == "http2"
    assert (orders.http2.max_concurrent_streams, orders.http2.keepalive_interval) == (100, 30.0)
    assert orders.http2.keepalive_timeout == 5.0
    assert orders.retry.grpc_on == ["unavailable"]
    assert orders.tls.alpn == ["h2"]  # derived from protocol http2
    payments = config.cluster("payments")
    assert payments is not None
    assert payments.protocol == "auto" and payments.tls.alpn == ["http/1.1"]  # as given
    grpc = config.listener("grpc")
    assert grpc is not None and grpc.limits.max_concurrent_streams == 1000


def test_defaults_are_spec_section_11() -> None:
    cluster = one_cluster("")
    assert cluster.protocol == "auto"
    http2 = cluster.http2
    assert (http2.max_concurrent_streams, http2.keepalive_interval, http2.keepalive_timeout) == (
        100,
        30.0,
        5.0,
    )
    assert cluster.retry.grpc_on == ["unavailable"]
    assert cluster.tls.alpn == ["h2", "http/1.1"]  # auto: the endpoint chooses
    listener = parse_config(HEAD, "h2.yaml").listeners[0]
    assert listener.limits.max_concurrent_streams == 1000


def test_the_new_keys_take_values() -> None:
    cluster = one_cluster(
        "    protocol: http2\n"
        "    http2: {max_concurrent_streams: 8, keepalive_interval: 1m, keepalive_timeout: 250ms}\n"
        "    retry: {grpc_on: [unavailable, resource_exhausted, ABORTED, 4]}\n"
    )
    assert cluster.http2.max_concurrent_streams == 8
    assert (cluster.http2.keepalive_interval, cluster.http2.keepalive_timeout) == (60.0, 0.25)
    # gRPC's docs write UNAVAILABLE; a number is its name: one spelling in the model.
    assert cluster.retry.grpc_on == [
        "unavailable",
        "resource_exhausted",
        "aborted",
        "deadline_exceeded",
    ]
    text = "listeners:\n  - name: g\n    address: 127.0.0.1:0\n    cluster: orders\n"
    text += "    limits: {max_concurrent_streams: 16}\n"
    listener = parse_config(text + HEAD, "h2.yaml").listeners[0]
    assert listener.limits.max_concurrent_streams == 16


def test_grpc_on_may_be_empty() -> None:
    assert one_cluster("    retry: {grpc_on: []}\n").retry.grpc_on == []


# --- tls.alpn and protocol ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "alpn"),
    [("auto", ["h2", "http/1.1"]), ("http1", ["http/1.1"]), ("http2", ["h2"])],
)
@pytest.mark.parametrize("tls", ["", "    tls: {enabled: true, sni: orders.svc}\n"])
def test_alpn_follows_protocol_unless_given(protocol: str, alpn: list[str], tls: str) -> None:
    assert one_cluster(f"    protocol: {protocol}\n{tls}").tls.alpn == alpn


@pytest.mark.parametrize(
    ("protocol", "alpn", "kept"),
    [
        ("auto", "[http/1.1]", ["http/1.1"]),  # SPEC's payments: TLS kept on HTTP/1.1
        ("auto", "[http/1.1, h2]", ["http/1.1", "h2"]),
        ("auto", "[]", []),
        ("http1", "[http/1.1]", ["http/1.1"]),
        ("http2", "[h2]", ["h2"]),
    ],
)
def test_alpn_that_agrees_with_protocol_is_kept(protocol: str, alpn: str, kept: list[str]) -> None:
    body = f"    protocol: {protocol}\n    tls:\n      enabled: true\n      alpn: {alpn}\n"
    assert one_cluster(body).tls.alpn == kept


@pytest.mark.parametrize(
    ("protocol", "alpn", "says"),
    [
        ("http1", "[h2]", "offers h2 but protocol is http1"),
        ("http1", "[http/1.1, h2]", "offers h2 but protocol is http1"),
        ("http2", "[http/1.1]", "protocol http2 needs h2 in alpn"),
        ("http2", "[]", "protocol http2 needs h2 in alpn"),
        ("http2", "[h2, http/1.1]", "protocol http2 offers only h2"),
    ],
)
def test_alpn_that_contradicts_protocol_is_an_error_at_the_alpn_key(
    protocol: str, alpn: str, says: str
) -> None:
    body = f"    protocol: {protocol}\n    tls:\n      enabled: true\n      alpn: {alpn}\n"
    found = issues(HEAD + body)
    assert len(found) == 1
    line, path, message = found[0]
    assert (line, path) == (7, "clusters[0].tls.alpn")  # the line of `alpn:`
    assert message.startswith(says)


def test_an_alpn_contradiction_is_reported_with_the_other_errors_of_its_cluster() -> None:
    # Pydantic skips a model's own checks when one of its fields failed: the loader re-runs
    # the cluster's on the raw data, so one `sidecar check` shows both problems.
    body = "    protocol: http1\n    tls: {alpn: [h2]}\n    retry: {grpc_on: [unavailble]}\n"
    found = [(line, path) for line, path, _ in issues(HEAD + body)]
    assert found == [(5, "clusters[0].tls.alpn"), (6, "clusters[0].retry.grpc_on[0]")]


def test_alpn_names_only_what_a_cluster_can_speak() -> None:
    found = issues(HEAD + "    tls:\n      alpn: [h2, spdy/3]\n")
    assert found == [(5, "clusters[0].tls.alpn[1]", "must be 'h2' or 'http/1.1'")]


def test_alpn_of_a_model_built_in_code_follows_protocol_too() -> None:
    discovery = {"type": "static", "endpoints": ["127.0.0.1:1"]}
    built = ClusterConfig.model_validate(
        {"name": "c", "discovery": discovery, "protocol": "http1", "tls": TlsConfig(enabled=True)}
    )
    assert built.tls.alpn == ["http/1.1"] and built.tls.enabled
    with pytest.raises(ValidationError, match="offers h2 but protocol is http1"):
        ClusterConfig.model_validate(
            {"name": "c", "discovery": discovery, "protocol": "http1", "tls": {"alpn": ["h2"]}}
        )


def test_the_shown_config_parses_back_to_the_same_config() -> None:
    config = parse_config(SPEC_EXAMPLE, "spec.yaml")
    data = redacted(config)
    data.pop("warnings")
    assert parse_config(json.dumps(data), "dump.json") == config


# --- errors name file, line and field ----------------------------------------------------------


def test_an_unknown_grpc_status_names_file_line_and_field() -> None:
    text = HEAD + "    retry:\n      grpc_on:\n        - unavailable\n        - unavialable\n"
    [(line, path, message)] = issues(text)
    assert (line, path) == (7, "clusters[0].retry.grpc_on[1]")  # the item's own line
    assert message.startswith("unknown gRPC status 'unavialable' (did you mean 'unavailable'?)")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "h2.yaml")
    assert caught.value.format().startswith("h2.yaml:7: clusters[0].retry.grpc_on[1]: unknown")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("ok", "gRPC's success status"),
        ("0", "gRPC's success status"),
        ("17", "unknown gRPC status 17"),
        ("true", "unknown gRPC status True"),
        ("service_unavailable", "unknown gRPC status 'service_unavailable' (did you mean"),
    ],
)
def test_grpc_on_refuses_what_is_not_a_retryable_status(value: str, says: str) -> None:
    [(line, path, message)] = issues(HEAD + f"    retry: {{grpc_on: [{value}]}}\n")
    assert (line, path) == (4, "clusters[0].retry.grpc_on[0]")
    assert says in message


@pytest.mark.parametrize(
    ("body", "line", "path", "says"),
    [
        ("    protocol: h2c\n", 4, "clusters[0].protocol", "must be 'auto', 'http1' or 'http2'"),
        (
            "    http2:\n      max_concurrent_streams: 0\n",
            5,
            "clusters[0].http2.max_concurrent_streams",
            "greater than or equal to 1",
        ),
        (
            "    http2:\n      keepalive_interval: 0s\n",
            5,
            "clusters[0].http2.keepalive_interval",
            "greater than 0",
        ),
        (
            "    http2:\n      keepalive_timeout: soon\n",
            5,
            "clusters[0].http2.keepalive_timeout",
            "invalid duration",
        ),
        (
            "    http2:\n      max_streams: 10\n",
            5,
            "clusters[0].http2.max_streams",
            "unknown key (did you mean 'max_concurrent_streams'?)",
        ),
    ],
)
def test_bad_http2_values_name_file_line_and_field(
    body: str, line: int, path: str, says: str
) -> None:
    [(found_line, found_path, message)] = issues(HEAD + body)
    assert (found_line, found_path) == (line, path)
    assert says in message


def test_a_bad_listener_stream_limit_names_its_line() -> None:
    text = "listeners:\n  - name: g\n    address: 127.0.0.1:0\n    cluster: orders\n"
    text += "    limits:\n      max_concurrent_streams: -1\n"
    [(line, path, message)] = issues(text + HEAD)
    assert (line, path) == (6, "listeners[0].limits.max_concurrent_streams")
    assert "greater than or equal to 1" in message


def test_http2_settings_on_an_http1_cluster_are_warned_about() -> None:
    config = parse_config(HEAD + "    protocol: http1\n    http2: {max_concurrent_streams: 4}\n")
    assert config_warnings(config) == [
        "cluster orders: http2 settings are ignored because protocol is http1"
    ]
    assert config_warnings(parse_config(HEAD + "    protocol: http1\n")) == []


# --- the typed seams: config -> cluster, balancer, TLS origin, retry policy --------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_the_cluster_carries_protocol_and_http2_settings(loop: asyncio.AbstractEventLoop) -> None:
    config = one_cluster("    protocol: http2\n    http2: {max_concurrent_streams: 7}\n")
    cluster = Cluster(config, loop, Wheel(loop), Stats().cluster("orders"))
    assert cluster.protocol == "http2"
    assert cluster.http2 is config.http2 and cluster.http2.max_concurrent_streams == 7
    assert cluster.settings.max_connections == config.pool.max_connections


def test_every_load_balancer_name_has_its_balancer() -> None:
    made = {name: type(make_balancer(name)) for name in get_args(LoadBalancer)}
    assert made == {"round_robin": RoundRobin, "least_request": LeastRequest, "random": Random}


def test_an_unknown_balancer_name_is_not_silently_least_request() -> None:
    # The config refuses it (a Literal); code that bypasses the config fails loudly.
    name: Any = "weighted"
    with pytest.raises(AssertionError):
        make_balancer(name)
    [(line, path, _)] = issues(HEAD + "    load_balancer: weighted\n")
    assert (line, path) == (4, "clusters[0].load_balancer")


def test_the_tls_origin_offers_only_what_the_upstream_leg_speaks() -> None:
    # `protocol: auto` configures h2 and http/1.1, and the upstream leg speaks both (app.py
    # passes UPSTREAM_ALPN): both are offered. A protocol it did not speak would be filtered.
    tls = one_cluster("    tls: {enabled: true, sni: orders.svc}\n").tls
    assert tls.alpn == ["h2", "http/1.1"]
    offered = TlsOrigin.from_config(tls, "orders.svc", speaks=UPSTREAM_ALPN)
    assert offered is not None and offered.alpn == ["h2", "http/1.1"]
    narrow = TlsOrigin.from_config(tls, "orders.svc", speaks=frozenset({"http/1.1"}))
    assert narrow is not None and narrow.alpn == ["http/1.1"]
    unfiltered = TlsOrigin.from_config(tls, "orders.svc")
    assert unfiltered is not None and unfiltered.alpn == ["h2", "http/1.1"]
    assert TlsOrigin.from_config(TlsConfig(), "orders.svc") is None  # TLS off


def test_the_retry_policy_gets_grpc_codes() -> None:
    retry = one_cluster("    retry: {grpc_on: [unavailable, resource_exhausted]}\n").retry
    policy = RetryPolicy.from_config(retry)
    assert policy.grpc_on == frozenset({14, 8})
    assert GRPC_STATUS_CODES["unavailable"] == 14 and len(GRPC_STATUS_CODES) == 16
