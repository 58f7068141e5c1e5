"""sidecar.config: models, YAML with line numbers, ${VAR} expansion, redaction."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from sidecar.config import (
    ClusterConfig,
    Config,
    ConfigError,
    ConfigIssue,
    DnsDiscovery,
    KubernetesDiscovery,
    ListenerConfig,
    StaticDiscovery,
    config_warnings,
    default_config,
    dynamic_cluster,
    expand_env,
    format_duration,
    format_size,
    is_loopback,
    join_address,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    redact_secrets,
    redacted,
    split_address,
    summary,
)

CONFIGS = Path(__file__).parent / "configs"
SRC = "c.yaml"


def parse(text: str, **environ: str) -> Config:
    return parse_config(textwrap.dedent(text), SRC, environ=environ)


def errors(text: str, **environ: str) -> list[str]:
    """The lines `sidecar check` would print for this YAML."""
    with pytest.raises(ConfigError) as info:
        parse(text, **environ)
    assert info.value.format() == str(info.value)
    return info.value.format().splitlines()


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line containing `needle`: where an error must point."""
    hits = [n for n, line in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in line]
    assert len(hits) >= nth, f"{needle!r} not in the test's YAML"
    return hits[nth - 1]


def one_error(text: str, path: str, needle: str, message: str, **environ: str) -> None:
    """Exactly one issue, formatted `FILE:LINE: path: message`, LINE being needle's line."""
    assert errors(text, **environ) == [f"{SRC}:{line_of(text, needle)}: {path}: {message}"]


ONE_CLUSTER = textwrap.dedent("""\
    clusters:
      - name: api
        discovery: {type: dns, host: api.example.com, port: 443}
""")


# --- the SPEC example and the defaults -----------------------------------------------------------


def test_spec_example_with_its_redis_cluster_parses() -> None:
    config = load_config(str(CONFIGS / "spec_example_complete.yaml"))

    assert [li.name for li in config.listeners] == ["egress", "payments-direct", "redis"]
    egress, direct, redis = config.listeners
    assert egress.routes[0].match.host == "payments" and egress.routes[0].cluster == "payments"
    assert egress.forward_proxy.allowed_hosts == ["*.svc.cluster.local", "api.example.com"]
    assert egress.forward_proxy.connect is True
    assert egress.limits.idle_timeout == 300.0 and egress.limits.max_header_bytes == 65536
    assert (direct.cluster, direct.port) == ("payments", 9001)
    assert (redis.protocol, redis.cluster, redis.host) == ("tcp", "redis", "127.0.0.1")

    payments = config.cluster("payments")
    assert payments is not None
    assert payments.discovery == KubernetesDiscovery(
        type="kubernetes", service="payments", namespace="shop", port="https"
    )
    assert payments.tls.enabled and payments.tls.key_file == "/etc/sidecar/tls/tls.key"
    assert payments.pool.min_idle == 2 and payments.pool.max_lifetime == 600.0
    assert payments.health_check.type == "http"
    # `on` is a YAML 1.1 boolean; the loader must keep it a key.
    assert payments.retry.on == ["connect-failure", "reset", "502", "503", "504"]
    assert payments.retry.backoff.base == 0.025
    assert payments.timeouts.request == 15.0
    redis_cluster = config.cluster("redis")
    assert redis_cluster is not None
    assert redis_cluster.discovery == StaticDiscovery(
        type="static", endpoints=["10.1.2.5:6379", "[fd00::5]:6379"]
    )
    assert config.cluster("nope") is None
    assert config.drain.grace == 25.0 and config.access_log is True


def test_spec_example_verbatim_names_an_undefined_cluster() -> None:
    # SPEC section 4 routes the tcp listener to cluster `redis` but defines no such cluster.
    path = CONFIGS / "spec_example.yaml"
    text = path.read_text()
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    line = line_of(text, "cluster: redis")
    assert info.value.format() == (
        f"{path}:{line}: listeners[2].cluster: unknown cluster 'redis'; defined: payments"
    )


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "~\n"])
def test_empty_file_is_the_embedded_default(text: str) -> None:
    assert parse_config(text) == default_config()


def test_embedded_default() -> None:
    config = default_config()
    assert config.admin.address == "127.0.0.1:15000"
    assert config.status.address == "0.0.0.0:15020"
    assert config.clusters == []
    [egress] = config.listeners
    assert (egress.name, egress.address, egress.protocol) == ("egress", "127.0.0.1:15001", "http")
    proxy = egress.forward_proxy
    assert (proxy.enabled, proxy.allowed_hosts, proxy.connect) == (True, ["*"], True)
    assert config_warnings(config) == []


def test_a_file_naming_one_cluster_keeps_the_default_listener() -> None:
    config = parse(ONE_CLUSTER)
    assert config.listeners == default_config().listeners
    assert [c.name for c in config.clusters] == ["api"]


def test_cluster_defaults() -> None:
    cluster = parse(ONE_CLUSTER).clusters[0]
    assert cluster.load_balancer == "least_request"
    assert not cluster.tls.enabled and cluster.tls.handshake_timeout is None
    # SPEC section 11: protocol auto offers h2 and http/1.1 (the endpoint chooses).
    assert cluster.tls.alpn == ["h2", "http/1.1"] and cluster.tls.min_version == "TLSv1.2"
    pool = cluster.pool
    assert (pool.max_connections, pool.min_idle, pool.max_idle) == (100, 0, 20)
    assert (pool.idle_timeout, pool.max_lifetime, pool.connect_timeout) == (60.0, 600.0, 2.0)
    assert (pool.max_pending, pool.pending_timeout) == (1000, 1.0)
    assert cluster.health_check.type == "none" and cluster.health_check.interval == 5.0
    assert cluster.outlier_detection.max_ejection_time == 300.0
    assert cluster.circuit_breaker.failure_rate_threshold == 0.5
    assert cluster.retry.attempts == 3 and cluster.retry.budget.ratio == 0.2
    assert cluster.retry.max_body_bytes == 65536 and cluster.retry.backoff.max == 1.0
    assert cluster.discovery == DnsDiscovery(type="dns", host="api.example.com", port=443)
    assert cluster.discovery.refresh == 30.0


def test_models_are_frozen() -> None:
    config = default_config()
    with pytest.raises(ValidationError):
        config.access_log = False


# --- durations and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("0s", 0.0),
        (".5s", 0.5),
        ("3", 3.0),
        (7, 7.0),
        (0.1, 0.1),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5 seconds", "invalid duration '5 seconds'"),
        ("5", None),
        ("-1s", "must not be negative"),
        (-2, "must not be negative"),
        ("10x", "invalid duration"),
        (True, "got a boolean"),
        ([1], "got a list"),
        (float("inf"), "must be finite"),
    ],
)
def test_bad_durations(text: object, message: str | None) -> None:
    if message is None:
        assert parse_duration(text) == 5.0
        return
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64KiB", 65536),
        ("1MiB", 1 << 20),
        ("512B", 512),
        ("1GiB", 1 << 30),
        ("1KB", 1000),
        ("2MB", 2_000_000),
        ("1.5KiB", 1536),
        (4096, 4096),
        ("100", 100),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("64k", "invalid size"),
        ("-1KiB", "must not be negative"),
        ("1.5B", "not a whole number"),
        (False, "got a boolean"),
    ],
)
def test_bad_sizes(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (5, "5s"), (300, "5m"), (3600, "1h"), (1.5, "1500ms"), (0, "0s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_format_duration_round_trips(millis: int) -> None:
    assert parse_duration(format_duration(millis / 1000)) == pytest.approx(millis / 1000)


@given(st.integers(min_value=0, max_value=1 << 40))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size() -> None:
    assert [format_size(n) for n in (65536, 1 << 20, 1000, 0)] == ["64KiB", "1MiB", "1000B", "0B"]


def test_durations_and_sizes_in_yaml() -> None:
    config = parse("""
        listeners:
          - name: egress
            address: 127.0.0.1:15001
            limits: {header_timeout: 250ms, idle_timeout: 90, max_header_bytes: 1MiB}
    """)
    limits = config.listeners[0].limits
    assert (limits.header_timeout, limits.idle_timeout, limits.max_header_bytes) == (
        0.25,
        90.0,
        1 << 20,
    )


def test_zero_timeout_is_rejected() -> None:
    text = """
        listeners:
          - name: egress
            address: 127.0.0.1:15001
            limits: {header_timeout: 0s}
    """
    one_error(
        text, "listeners[0].limits.header_timeout", "header_timeout", "must be greater than 0"
    )


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:15001", ("127.0.0.1", 15001)),
        ("[::1]:80", ("::1", 80)),
        ("localhost:0", ("localhost", 0)),
        ("payments.shop.svc:8443", ("payments.shop.svc", 8443)),
    ],
)
def test_split_address(text: str, expected: tuple[str, int]) -> None:
    assert split_address(text) == expected
    assert join_address(*expected) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "has no port"),
        ("::1:80", "need brackets"),
        (":80", "has no host"),
        ("host:99999", "port must be"),
        ("host:http", "port must be"),
        ("[nope]:80", "not an IPv6 address"),
        ("[::1]80", "must look like"),
        ("a b:80", "not a valid host"),
    ],
)
def test_bad_addresses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_address(text)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_non_loopback_listener_needs_allow_remote() -> None:
    text = """
        listeners:
          - name: egress
            address: 0.0.0.0:15001
    """
    one_error(
        text,
        "listeners[0].address",
        "address:",
        "0.0.0.0 is not a loopback address: an egress listener reachable from outside the pod "
        "is an open relay; set allow_remote: true if you mean it",
    )
    allowed = parse(textwrap.dedent(text) + "    allow_remote: true\n")
    assert allowed.listeners[0].allow_remote
    assert config_warnings(allowed) == [
        "listener egress: 0.0.0.0:15001 accepts connections from outside the pod",
        "listener egress: no cluster, routes or forward_proxy: every request 404s",
    ]


@pytest.mark.parametrize("address", ["localhost:15001", "[::1]:15001", "127.0.0.2:15001"])
def test_loopback_listeners_need_nothing(address: str) -> None:
    config = parse(f"listeners: [{{name: egress, address: '{address}'}}]")
    assert config.listeners[0].address == address


def test_admin_must_be_loopback_always() -> None:
    text = """
        admin:
          address: 0.0.0.0:15000
        listeners: [{name: egress, address: 127.0.0.1:15001, allow_remote: true}]
    """
    one_error(
        text,
        "admin.address",
        "0.0.0.0:15000",
        "the admin address must be loopback (127.0.0.1, ::1 or localhost): "
        "the admin API can drain and reconfigure the sidecar",
    )
    assert parse("admin: {address: '[::1]:15000'}").admin.port == 15000


def test_listener_model_rejects_non_loopback_in_code_too() -> None:
    with pytest.raises(ValidationError, match="allow_remote"):
        ListenerConfig(name="x", address="10.0.0.1:80")


# --- cross-field rules, each pointing at its key -------------------------------------------------


def test_duplicate_listener_name() -> None:
    text = """
        listeners:
          - name: egress
            address: 127.0.0.1:15001
          - name: egress
            address: 127.0.0.1:15002
    """
    assert errors(text) == [
        f"{SRC}:{line_of(text, 'name: egress', 2)}: listeners[1].name: "
        "duplicate name 'egress' (first used by listeners[0])"
    ]


def test_duplicate_cluster_name() -> None:
    text = ONE_CLUSTER + "  - name: api\n    discovery: {type: dns, host: b.example, port: 80}\n"
    assert errors(text) == [
        f"{SRC}:{line_of(text, 'name: api', 2)}: clusters[1].name: "
        "duplicate name 'api' (first used by clusters[0])"
    ]


def test_listener_cluster_must_exist() -> None:
    text = """
        listeners:
          - name: direct
            address: 127.0.0.1:9001
            cluster: apx
    """
    one_error(
        textwrap.dedent(text) + ONE_CLUSTER,
        "listeners[0].cluster",
        "cluster: apx",
        "unknown cluster 'apx' (did you mean 'api'?); defined: api",
    )


def test_route_cluster_must_exist() -> None:
    text = """
        listeners:
          - name: egress
            address: 127.0.0.1:15001
            routes:
              - match: {host_suffix: .example.com}
                cluster: api
              - match: {path_prefix: /v1}
                cluster: nothing
    """
    assert errors(text) == [
        f"{SRC}:{line_of(text, 'cluster: api')}: listeners[0].routes[0].cluster: "
        "unknown cluster 'api': no clusters are defined",
        f"{SRC}:{line_of(text, 'cluster: nothing')}: listeners[0].routes[1].cluster: "
        "unknown cluster 'nothing': no clusters are defined",
    ]
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text) + ONE_CLUSTER)
    [issue] = info.value.issues
    assert issue == ConfigIssue(
        SRC,
        line_of(text, "cluster: nothing"),
        "listeners[0].routes[1].cluster",
        "unknown cluster 'nothing'; defined: api",
    )


def test_route_match_needs_a_criterion() -> None:
    text = """
        listeners:
          - name: egress
            address: 127.0.0.1:15001
            routes:
              - cluster: api
                match: {}
    """
    one_error(
        textwrap.dedent(text) + ONE_CLUSTER,
        "listeners[0].routes[0].match",
        "match: {}",
        "a match needs at least one of host, host_suffix, path_prefix",
    )


def test_tcp_listener_needs_a_cluster() -> None:
    text = """
        listeners:
          - name: redis
            address: 127.0.0.1:6380
            protocol: tcp
    """
    # The key is missing: the line is that of the listener it belongs in.
    one_error(
        text,
        "listeners[0].cluster",
        "name: redis",
        "a tcp listener needs a cluster to forward to",
    )


def test_tcp_listener_has_no_routes_and_no_forward_proxy() -> None:
    text = """
        listeners:
          - name: redis
            address: 127.0.0.1:6380
            protocol: tcp
            cluster: api
            routes:
              - match: {host: a}
                cluster: api
            forward_proxy: {enabled: true}
    """
    assert errors(textwrap.dedent(text) + ONE_CLUSTER) == [
        f"{SRC}:{line_of(text, 'routes:')}: listeners[0].routes: "
        "a tcp listener has no routes: it forwards to cluster",
        f"{SRC}:{line_of(text, 'forward_proxy')}: listeners[0].forward_proxy: "
        "a tcp listener cannot be a forward proxy",
    ]


def test_listener_addresses_must_not_collide() -> None:
    text = """
        listeners:
          - name: a
            address: 127.0.0.1:15001
          - name: b
            address: localhost:15001
          - name: c
            address: 127.0.0.1:15020
    """
    assert errors(text) == [
        f"{SRC}:{line_of(text, 'localhost:15001')}: listeners[1].address: "
        "localhost:15001 conflicts with listeners[0].address",
        f"{SRC}:{line_of(text, '15020')}: listeners[2].address: "
        "127.0.0.1:15020 conflicts with status.address",  # status binds 0.0.0.0:15020
    ]


def test_port_zero_never_collides() -> None:
    config = parse("""
        admin: {address: 127.0.0.1:0}
        listeners:
          - {name: a, address: 127.0.0.1:0}
          - {name: b, address: 127.0.0.1:0}
    """)
    assert [li.port for li in config.listeners] == [0, 0]


def test_no_listeners_is_an_error() -> None:
    text = "listeners: []\n"
    one_error(
        text, "listeners", "listeners", "no listeners defined: the sidecar would proxy nothing"
    )


@pytest.mark.parametrize(
    ("present", "absent"), [("cert_file", "key_file"), ("key_file", "cert_file")]
)
def test_tls_cert_and_key_go_together(present: str, absent: str) -> None:
    text = ONE_CLUSTER + f"    tls:\n      enabled: true\n      {present}: /etc/x.pem\n"
    one_error(
        text,
        f"clusters[0].tls.{present}",
        present,
        f"set without {absent}: a client needs both",
    )


def test_retry_conditions() -> None:
    text = ONE_CLUSTER + "    retry:\n      on: [connect-failure, 503, 5xx, timeout,\n    404]\n"
    one_error(
        text,
        "clusters[0].retry.on[4]",
        "404",
        "unknown retry condition 404: use connect-failure, reset, timeout, 5xx "
        'or a 5xx status like "503"',
    )
    fixed = parse(text.replace("404", "reset"))
    assert fixed.clusters[0].retry.on == ["connect-failure", "503", "5xx", "timeout", "reset"]


def test_pool_limits_are_ordered() -> None:
    text = (
        ONE_CLUSTER + "    pool:\n      max_connections: 5\n      min_idle: 3\n      max_idle: 8\n"
    )
    one_error(
        text, "clusters[0].pool.max_idle", "max_idle", "max_idle (8) exceeds max_connections (5)"
    )
    text = ONE_CLUSTER + "    pool:\n      min_idle: 30\n"
    one_error(text, "clusters[0].pool.min_idle", "min_idle", "min_idle (30) exceeds max_idle (20)")


def test_defaults_follow_the_keys_that_were_set() -> None:
    # max_idle defaults to 20, max_ejection_time to 300s, backoff.max to 1s, accept_period to
    # 5s: a user who sets only the other side must not get an error about a key never written.
    config = parse(
        ONE_CLUSTER
        + "    pool: {max_connections: 10}\n"
        + "    outlier_detection: {base_ejection_time: 10m}\n"
        + "    retry: {backoff: {base: 2s}}\n"
        + "    health_check: {interval: 500ms}\n"
        + "drain: {grace: 3s}\n"
    )
    cluster = config.clusters[0]
    assert cluster.pool.max_idle == 10
    assert cluster.outlier_detection.max_ejection_time == 600.0
    assert cluster.retry.backoff.max == 2.0
    # Not derived from interval: a timeout longer than the interval is fine (see below).
    assert cluster.health_check.timeout == 1.0
    assert config.drain.accept_period == 3.0


def test_explicit_inverted_durations_are_errors() -> None:
    text = """
        drain:
          grace: 5s
          accept_period: 10s
    """
    one_error(text, "drain.accept_period", "accept_period", "must not be longer than grace")
    assert parse("drain: {grace: auto, accept_period: 10s}").drain.grace == "auto"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("http://api.example.com", "'http://api.example.com' is not a host glob"),
        ("api.example.com:99999", "the port must be a number from 1 to 65535"),
        ("':443'", "has no host part"),
    ],
)
def test_allowed_hosts_are_host_globs(entry: str, message: str) -> None:
    text = f"""
        listeners:
          - name: egress
            address: 127.0.0.1:15001
            forward_proxy:
              enabled: true
              allowed_hosts:
                - "*.svc.cluster.local"
                - {entry}
    """
    [line] = errors(text)
    prefix = f"{SRC}:{line_of(text, entry)}: listeners[0].forward_proxy.allowed_hosts[1]: "
    assert line.startswith(prefix) and message in line


def test_allowed_hosts_accept_ports_and_normalise_case() -> None:
    config = parse("""
        listeners:
          - name: egress
            address: 127.0.0.1:15001
            forward_proxy: {enabled: true, allowed_hosts: ["API.example.com:443", "[::1]:80", "*"]}
    """)
    assert config.listeners[0].forward_proxy.allowed_hosts == [
        "api.example.com:443",
        "[::1]:80",
        "*",
    ]


def test_discovery_type_is_required_and_checked() -> None:
    text = """
        clusters:
          - name: a
            discovery: {host: a.example, port: 80}
          - name: b
            discovery:
              type: consul
    """
    assert errors(text) == [
        f"{SRC}:{line_of(text, 'discovery: {host')}: clusters[0].discovery.type: "
        "type must be one of static, dns, kubernetes",
        f"{SRC}:{line_of(text, 'type: consul')}: clusters[1].discovery.type: "
        "type must be one of static, dns, kubernetes, not 'consul'",
    ]


def test_missing_required_key_points_at_its_parent() -> None:
    text = """
        clusters:
          - name: a
            discovery:
              type: dns
              port: 80
    """
    one_error(text, "clusters[0].discovery.host", "discovery:", "required key is missing")


def test_kubernetes_discovery_ports() -> None:
    base = "clusters: [{name: a, discovery: {type: kubernetes, service: pay, port: %s}}]"
    assert parse(base % "'8443'").clusters[0].discovery == KubernetesDiscovery(
        type="kubernetes", service="pay", port=8443
    )
    [line] = errors(base % "Bad_Name")
    assert line.startswith(f"{SRC}:1: clusters[0].discovery.port: port 'Bad_Name' must be")


# --- unknown keys, several errors, YAML itself ---------------------------------------------------


def test_unknown_key_is_an_error_at_its_line() -> None:
    text = """
        listeners:
          - name: egress
            address: 127.0.0.1:15001
            limits:
              idle_timout: 5m
        acces_log: false
    """
    assert errors(text) == [
        f"{SRC}:{line_of(text, 'idle_timout')}: listeners[0].limits.idle_timout: "
        "unknown key (did you mean 'idle_timeout'?)",
        f"{SRC}:{line_of(text, 'acces_log')}: acces_log: unknown key (did you mean 'access_log'?)",
    ]


def test_every_error_is_reported_in_file_order() -> None:
    text = """
        admin:
          address: 0.0.0.0:15000
        listeners:
          - name: egress
            address: 127.0.0.1:15001
            limits:
              header_timeout: 10 seconds
            cluster: missing
          - name: redis
            address: 127.0.0.1:6380
            protocol: tcp
            routes: [{match: {host: a}, cluster: api}]
        clusters:
          - name: api
            discovery: {type: dns, host: api.example.com, port: 443}
            pool: {min_idle: 50}
            retry: {on: [reset, teapot]}
        drain: {linger: -1s}
    """
    # header_timeout fails inside listeners[0] and listeners[1] fails its own checks: the
    # cross-listener and cross-cluster checks must still run and report the dangling reference.
    assert errors(text) == [
        f"{SRC}:3: admin.address: the admin address must be loopback (127.0.0.1, ::1 or "
        "localhost): the admin API can drain and reconfigure the sidecar",
        f"{SRC}:8: listeners[0].limits.header_timeout: invalid duration '10 seconds': "
        "use a number with a unit (ms, s, m, h), e.g. 250ms, 5s, 2m",
        f"{SRC}:9: listeners[0].cluster: unknown cluster 'missing'; defined: api",
        f"{SRC}:10: listeners[1].cluster: a tcp listener needs a cluster to forward to",
        f"{SRC}:13: listeners[1].routes: a tcp listener has no routes: it forwards to cluster",
        f"{SRC}:17: clusters[0].pool.min_idle: min_idle (50) exceeds max_idle (20)",
        f"{SRC}:18: clusters[0].retry.on[1]: unknown retry condition 'teapot': use "
        'connect-failure, reset, timeout, 5xx or a 5xx status like "503"',
        f"{SRC}:19: drain.linger: duration '-1s' must not be negative",
    ]


def test_listener_checks_run_when_another_listener_field_fails() -> None:
    text = """
        listeners:
          - name: redis
            address: 127.0.0.1:6380
            protocol: tcp
            limits: {idle_timeout: soon}
    """
    lines = errors(text)
    assert f"{SRC}:3: listeners[0].cluster: a tcp listener needs a cluster to forward to" in lines
    assert len(lines) == 2


def test_yaml_syntax_error_line() -> None:
    text = "listeners:\n  - name: egress\n    address: [127.0.0.1:15001\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    [issue] = info.value.issues
    assert (issue.file, issue.path) == (SRC, "<yaml>")
    assert issue.line == 4  # the scanner notices at the end of input: the flow list never ended
    text = "admin:\n  address: 127.0.0.1:15000\n  bad: : indent\n  - x\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    assert info.value.issues[0].line == 3
    assert info.value.format().startswith(f"{SRC}:3: <yaml>: ")


def test_flow_mapping_needs_quotes_around_env_references() -> None:
    # `{interval: ${X}}` is not YAML: the brace ends the flow mapping. Say where.
    [line] = errors("clusters:\n  - {name: a, path: ${X}}\n")
    assert line.startswith(f"{SRC}:2: <yaml>: ")


def test_duplicate_keys_are_errors() -> None:
    text = "access_log: true\ndrain: {}\naccess_log: false\n"
    assert errors(text) == [f"{SRC}:3: access_log: duplicate key (first at line 1)"]


def test_yaml_1_1_booleans_are_strings() -> None:
    config = parse("""
        listeners: [{name: no, address: 127.0.0.1:15001, cluster: on}]
        clusters: [{name: on, discovery: {type: dns, host: yes, port: 80}}]
    """)
    assert config.listeners[0].name == "no"
    assert config.listeners[0].cluster == "on"
    assert isinstance(config.clusters[0].discovery, DnsDiscovery)
    assert config.clusters[0].discovery.host == "yes"


def test_anchors_and_merge_keys() -> None:
    config = parse("""
        clusters:
          - &base
            name: a
            discovery: {type: dns, host: a.example, port: 80}
            pool: {max_connections: 7}
          - <<: *base
            name: b
    """)
    a, b = config.clusters
    assert b.name == "b" and b.pool.max_connections == 7 and b.discovery == a.discovery


def test_root_must_be_a_mapping() -> None:
    assert errors("- a\n- b\n") == [f"{SRC}:1: <root>: must be a mapping of sections, not a list"]


def test_section_of_the_wrong_shape() -> None:
    assert errors("listeners: {name: a}\n") == [
        f"{SRC}:1: listeners: must be a list, not a mapping"
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.format() == f"{path}:0: <file>: no such file"


def test_load_config_reports_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("drain:\n  grace: forever\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    [issue] = info.value.issues
    assert (issue.file, issue.line, issue.path) == (str(path), 2, "drain.grace")


# --- environment variables -----------------------------------------------------------------------


def test_env_expansion() -> None:
    text = """
        listeners:
          - name: ${NAME}
            address: 127.0.0.1:${PORT:-15001}
        clusters:
          - name: api
            discovery: {type: kubernetes, service: api, namespace: "${POD_NAMESPACE:-}", port: 80}
            tls: {enabled: true, sni: "${SNI:-api.example.com}"}
            health_check: {path: /healthz$$x}
    """
    config = parse(text, NAME="egress", POD_NAMESPACE="shop", SNI="")
    assert config.listeners[0].name == "egress"
    assert config.listeners[0].port == 15001
    cluster = config.clusters[0]
    assert isinstance(cluster.discovery, KubernetesDiscovery)
    assert cluster.discovery.namespace == "shop"
    assert cluster.tls.sni == "api.example.com"  # `:-` also covers an empty value
    assert cluster.health_check.path == "/healthz$x"
    other = parse(text, NAME="e2", PORT="9000")
    assert other.listeners[0].address == "127.0.0.1:9000"
    assert isinstance(other.clusters[0].discovery, KubernetesDiscovery)
    assert other.clusters[0].discovery.namespace is None  # empty: the pod's own namespace


def test_unset_env_var_is_an_error_at_its_line() -> None:
    text = """
        drain:
          grace: ${GRACE}
          linger: 1s
    """
    one_error(
        text,
        "drain.grace",
        "GRACE",
        "environment variable GRACE is not set (use ${GRACE:-default})",
    )


@pytest.mark.parametrize(
    ("text", "expanded", "problems"),
    [
        ("a${X}b", "a1b", []),
        ("${Y:-two}", "two", []),
        ("$$${X}", "$1", []),
        ("cost $5", "cost $5", []),
        ("${NOPE}", "", ["environment variable NOPE is not set (use ${NOPE:-default})"]),
        ("${1X}", "", ["invalid reference ${1X}: use ${NAME} or ${NAME:-default}"]),
        ("a${X", "a${X", ["unterminated ${ in 'a${X' (write $$ for a literal $)"]),
    ],
)
def test_expand_env(text: str, expanded: str, problems: list[str]) -> None:
    assert expand_env(text, {"X": "1"}) == (expanded, problems)


# --- dynamic clusters, redaction, summary --------------------------------------------------------


def test_dynamic_cluster() -> None:
    cluster = dynamic_cluster("api.example.com", 443)
    assert cluster.name == "api.example.com:443"
    assert cluster.discovery == DnsDiscovery(type="dns", host="api.example.com", port=443)
    assert cluster.pool.min_idle == 0  # nothing is prewarmed for a host seen once
    assert cluster.model_dump(exclude={"name", "discovery"}) == ClusterConfig(
        name="x", discovery=StaticDiscovery(type="static", endpoints=["1.1.1.1:1"])
    ).model_dump(exclude={"name", "discovery"})
    assert dynamic_cluster("2001:db8::1", 80).name == "[2001:db8::1]:80"
    with pytest.raises(ValueError, match="not a valid host"):
        dynamic_cluster("bad host", 80)


def test_redacted_shows_paths_never_secrets(tmp_path: Path) -> None:
    key = tmp_path / "tls.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nSEKRITKEYMATERIAL\n")
    config = parse(
        ONE_CLUSTER
        + "    tls:\n      enabled: true\n      insecure_skip_verify: true\n"
        + f"      cert_file: {tmp_path / 'tls.crt'}\n      key_file: {key}\n"
    )
    dump = redacted(config)
    text = json.dumps(dump)  # JSON-able as is
    assert "SEKRITKEYMATERIAL" not in text and "BEGIN PRIVATE KEY" not in text
    assert dump["clusters"][0]["tls"]["key_file"] == str(key)
    assert dump["clusters"][0]["pool"]["idle_timeout"] == "1m"
    assert dump["clusters"][0]["retry"]["backoff"] == {"base": "25ms", "max": "1s"}
    assert dump["listeners"][0]["limits"]["max_header_bytes"] == "64KiB"
    assert dump["drain"]["grace"] == "25s"
    assert dump["warnings"] == [
        "cluster api: tls.insecure_skip_verify: upstream certificates not verified"
    ]
    # What /config shows is itself a valid config that means the same thing.
    del dump["warnings"]
    assert Config.model_validate(dump) == config


def test_redact_secrets_hides_secret_looking_keys() -> None:
    data = {"auth": {"token": "abc", "Password": "p"}, "items": [{"client_secret": "s"}], "n": 1}
    assert redact_secrets(data) == {
        "auth": {"token": "<redacted>", "Password": "<redacted>"},
        "items": [{"client_secret": "<redacted>"}],
        "n": 1,
    }


def test_warnings_for_suspicious_listeners() -> None:
    config = parse("""
        listeners:
          - {name: dead, address: 127.0.0.1:1}
          - {name: shut, address: 127.0.0.1:2, forward_proxy: {enabled: true}}
    """)
    assert config_warnings(config) == [
        "listener dead: no cluster, routes or forward_proxy: every request 404s",
        "listener shut: forward_proxy has no allowed_hosts: every request 403s",
    ]


def test_summary() -> None:
    config = load_config(str(CONFIGS / "spec_example_complete.yaml"))
    assert summary(config, "sidecar.yaml") == "sidecar.yaml: ok: 3 listeners, 2 clusters"
    assert summary(parse(ONE_CLUSTER), "f") == "f: ok: 1 listener, 1 cluster"
