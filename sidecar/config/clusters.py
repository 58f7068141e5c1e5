"""Clusters: discovery, TLS origination, pools, timeouts, and the cluster model itself."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, Self, TypeAlias

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from sidecar.config.addresses import (
    Name,
    OptionalPath,
    _check_endpoint,
    _check_host,
    _empty_to_none,
    join_address,
)
from sidecar.config.base import _default_when_absent, _Model
from sidecar.config.errors import Problem, _raise_problems
from sidecar.config.policies import (
    CircuitBreakerConfig,
    HealthCheckConfig,
    OutlierConfig,
    RetryConfig,
)
from sidecar.config.units import Duration

_K8S_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class StaticDiscovery(_Model):
    type: Literal["static"] = Field(description="`static`: a fixed list of endpoints.")
    endpoints: list[Annotated[str, AfterValidator(_check_endpoint)]] = Field(
        min_length=1,
        description="The endpoints, `host:port` each (at least one).",
    )


class DnsDiscovery(_Model):
    type: Literal["dns"] = Field(description="`dns`: the addresses a DNS name resolves to.")
    host: Annotated[str, AfterValidator(_check_host)] = Field(
        description=(
            "The name resolved (A and AAAA records); each address is an endpoint. Also the "
            "default TLS server name."
        ),
    )
    port: int = Field(ge=1, le=65535, description="The port of every endpoint.")
    refresh: Duration = Field(
        default=30.0,
        gt=0,
        description=(
            "How often the name is resolved again (without blocking the event loop); the last "
            "answer keeps serving when a lookup fails."
        ),
    )


def _k8s_port(value: object) -> object:
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, str) and not (len(value) <= 63 and _K8S_LABEL.fullmatch(value)):
        raise ValueError(f"port {value!r} must be a number or a Service port name like https")
    if isinstance(value, int) and not isinstance(value, bool) and not 0 < value < 65536:
        raise ValueError(f"port {value} must be from 1 to 65535")
    return value


def _k8s_name(text: str) -> str:
    if not (len(text) <= 63 and _K8S_LABEL.fullmatch(text)):
        raise ValueError(f"{text!r} is not a Kubernetes name (lowercase letters, digits, -)")
    return text


class KubernetesDiscovery(_Model):
    type: Literal["kubernetes"] = Field(
        description=(
            "`kubernetes`: the EndpointSlices (discovery.k8s.io/v1) of a Service, listed and "
            "watched. Ready endpoints get traffic; terminating ones get no new requests and "
            "finish what they have."
        ),
    )
    service: Annotated[str, AfterValidator(_k8s_name)] = Field(description="The Service's name.")
    # None: the pod's own namespace (POD_NAMESPACE or the service account's namespace).
    namespace: Annotated[
        Annotated[str, AfterValidator(_k8s_name)] | None, BeforeValidator(_empty_to_none)
    ] = Field(
        default=None,
        description=(
            "The Service's namespace; default: the pod's own (POD_NAMESPACE, else the service "
            "account's namespace)."
        ),
    )
    port: Annotated[int | str, BeforeValidator(_k8s_port)] = Field(
        description="The Service port, by name (e.g. `https`) or number.",
    )


Discovery = Annotated[
    StaticDiscovery | DnsDiscovery | KubernetesDiscovery, Field(discriminator="type")
]


UpstreamProtocol: TypeAlias = Literal["auto", "http1", "http2"]
Alpn: TypeAlias = Literal["h2", "http/1.1"]
LoadBalancer: TypeAlias = Literal["round_robin", "least_request", "random"]

# The ALPN list a cluster's `protocol` offers when `tls.alpn` is not given (SPEC section 11).
ALPN_FOR: Final[Mapping[str, tuple[Alpn, ...]]] = {
    "auto": ("h2", "http/1.1"),
    "http1": ("http/1.1",),
    "http2": ("h2",),
}


class TlsConfig(_Model):
    enabled: bool = Field(
        default=False,
        description=(
            "Originate TLS to the endpoints: the app speaks plain HTTP to the sidecar, the "
            "sidecar speaks HTTPS upstream."
        ),
    )
    sni: Annotated[
        Annotated[str, AfterValidator(_check_host)] | None, BeforeValidator(_empty_to_none)
    ] = Field(
        default=None,
        description=(
            "Server name sent (SNI) and verified against the certificate. Default: the discovery "
            "host (dns `host`; for kubernetes `SERVICE.NAMESPACE.svc`; for static, the first "
            "endpoint's host unless it is an IP address, where sni is required)."
        ),
    )
    ca_file: OptionalPath = Field(
        default=None,
        description=(
            "CA bundle (PEM) the endpoints' certificates are verified against. Default: the "
            "system trust store."
        ),
    )
    cert_file: OptionalPath = Field(
        default=None,
        description=(
            "Client certificate (PEM) for mutual TLS, set together with key_file; reloaded when "
            "the file changes."
        ),
    )
    key_file: OptionalPath = Field(
        default=None,
        description="Private key (PEM) of cert_file; reloaded when the file changes.",
    )
    session_reuse: bool = Field(
        default=True,
        description=(
            "Resume TLS sessions on new connections to an endpoint, saving full handshakes "
            "(`sidecar_tls_handshakes_total{resumed}`)."
        ),
    )
    alpn: list[Alpn] = Field(
        default_factory=lambda: list(ALPN_FOR["auto"]),
        description=(
            "ALPN protocols offered in the handshake, in order of preference: `h2` and/or "
            "`http/1.1`. Default: what the cluster's `protocol` speaks (auto: h2, http/1.1, the "
            "endpoint chooses; http1: http/1.1; http2: h2). Set explicitly, it must agree with "
            "`protocol`: h2 with http1 is an error (the endpoint could choose a protocol the "
            "cluster will not speak), and so is an http2 list other than [h2]. With auto, "
            "[http/1.1] keeps a TLS cluster on HTTP/1.1."
        ),
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        default="TLSv1.2",
        description="Lowest TLS version accepted: TLSv1.2 or TLSv1.3.",
    )
    insecure_skip_verify: bool = Field(
        default=False,
        description=(
            "Do not verify the endpoints' certificates. Must be set explicitly; warned about at "
            "start and in /config."
        ),
    )
    handshake_timeout: Duration | None = Field(
        default=None,
        gt=0,
        description=(
            "Longest TLS handshake. Default: none of its own; the TCP connect and the handshake "
            "share pool.connect_timeout."
        ),
    )

    @model_validator(mode="after")
    def _cert_and_key(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            present, absent = ("cert_file", "key_file")
            if self.cert_file is None:
                present, absent = absent, present
            _raise_problems([((present,), f"set without {absent}: a client needs both")])
        return self


class PoolConfig(_Model):
    max_connections: int = Field(
        default=100,
        ge=1,
        description="Upstream connections per endpoint, in use and idle together.",
    )
    min_idle: int = Field(
        default=0,
        ge=0,
        description=(
            "Idle connections kept open per endpoint (prewarmed; filled before /readyz turns "
            "200). 0 by default, so the zero-config forward proxy opens nothing in advance."
        ),
    )
    max_idle: int = Field(
        default=20,
        ge=0,
        description=(
            "Most idle connections kept per endpoint; more are closed. Default: 20, or "
            "max_connections when smaller."
        ),
    )
    idle_timeout: Duration = Field(
        default=60.0,
        gt=0,
        description="A pooled connection idle this long is closed.",
    )
    max_lifetime: Duration = Field(
        default=600.0,
        gt=0,
        description=(
            "A connection older than this (jittered) is retired once its request finishes, so "
            "load follows new endpoints."
        ),
    )
    connect_timeout: Duration = Field(
        default=2.0,
        gt=0,
        description=(
            "Longest TCP connect (TLS handshake included unless tls.handshake_timeout is set); "
            "then connect_failed."
        ),
    )
    max_pending: int = Field(
        default=1000,
        ge=0,
        description=(
            "Requests waiting for a connection to an endpoint; one more gets 503 pool_timeout at "
            "once."
        ),
    )
    pending_timeout: Duration = Field(
        default=1.0,
        gt=0,
        description="Longest wait for a connection; then 503 pool_timeout.",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        return _default_when_absent(data, "max_idle", lambda d: min(20, int(d["max_connections"])))

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        problems: list[Problem] = []
        if self.min_idle > self.max_idle:
            problems.append(
                (("min_idle",), f"min_idle ({self.min_idle}) exceeds max_idle ({self.max_idle})")
            )
        if self.max_idle > self.max_connections:
            problems.append(
                (
                    ("max_idle",),
                    f"max_idle ({self.max_idle}) exceeds max_connections ({self.max_connections})",
                )
            )
        _raise_problems(problems)
        return self


class Http2Config(_Model):
    max_concurrent_streams: int = Field(
        default=100,
        ge=1,
        description=(
            "Streams per upstream HTTP/2 connection at most, lowered by the endpoint's "
            "SETTINGS_MAX_CONCURRENT_STREAMS. A new connection to an endpoint opens only when "
            "every open one is full, up to pool.max_connections; beyond that, requests wait in "
            "the pending queue (pool.max_pending, pool.pending_timeout)."
        ),
    )
    keepalive_interval: Duration = Field(
        default=30.0,
        gt=0,
        description="An idle upstream HTTP/2 connection is PINGed this often.",
    )
    keepalive_timeout: Duration = Field(
        default=5.0,
        gt=0,
        description=(
            "An upstream HTTP/2 connection whose PING is not answered within this is closed."
        ),
    )


class TimeoutsConfig(_Model):
    request: Duration = Field(
        default=15.0,
        gt=0,
        description=(
            "Deadline of a whole request, retries included; then 504 upstream_timeout. A request "
            "may shorten it with x-sidecar-timeout-ms; the time left is sent upstream in "
            "x-sidecar-deadline-ms."
        ),
    )


class ClusterConfig(_Model):
    name: Name = Field(
        description=(
            "Unique name: what listeners and routes refer to, and the `cluster` label of metrics."
        ),
    )
    discovery: Discovery = Field(
        description="Where the endpoints come from: `type` is static, dns or kubernetes.",
    )
    load_balancer: LoadBalancer = Field(
        default="least_request",
        description=(
            "How each request picks an endpoint: `round_robin`, `least_request` (the less busy of "
            "two random endpoints) or `random`."
        ),
    )
    protocol: UpstreamProtocol = Field(
        default="auto",
        description=(
            "What the sidecar speaks to the endpoints. `auto`: with TLS, ALPN offers h2 and "
            "http/1.1 and the endpoint's choice is used; in cleartext the app's protocol is kept "
            "(HTTP/2 as h2c, HTTP/1.1 as HTTP/1.1). `http2`: always HTTP/2 (h2c, or ALPN h2 with "
            "TLS); HTTP/1.1 app requests are sent as HTTP/2 streams and answered as HTTP/1.1. "
            "`http1`: always HTTP/1.1; gRPC requests are refused with protocol_mismatch "
            "(trailers cannot survive the trip)."
        ),
    )
    tls: TlsConfig = Field(
        default_factory=TlsConfig,
        description="TLS origination to the endpoints.",
    )
    pool: PoolConfig = Field(
        default_factory=PoolConfig,
        description="Keep-alive connection pools, one per endpoint.",
    )
    http2: Http2Config = Field(
        default_factory=Http2Config,
        description=(
            "Upstream HTTP/2 connections (protocol http2, or auto when HTTP/2 is used): "
            "multiplexing and keepalive PINGs. Ignored (with a warning) for protocol http1."
        ),
    )
    health_check: HealthCheckConfig = Field(
        default_factory=HealthCheckConfig,
        description="Active health checks of each endpoint.",
    )
    outlier_detection: OutlierConfig = Field(
        default_factory=OutlierConfig,
        description="Passive health: endpoints that keep failing requests are ejected for a while.",
    )
    circuit_breaker: CircuitBreakerConfig = Field(
        default_factory=CircuitBreakerConfig,
        description=(
            "Stops sending to a failing cluster for a while (503 circuit_open), and caps its "
            "concurrent requests."
        ),
    )
    retry: RetryConfig = Field(
        default_factory=RetryConfig,
        description="Retries, with backoff and a budget.",
    )
    timeouts: TimeoutsConfig = Field(
        default_factory=TimeoutsConfig,
        description="Deadlines of a request.",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_alpn(cls, data: Any) -> Any:
        """`tls.alpn` not given: what `protocol` speaks (an invalid protocol: pydantic says so)."""
        if not isinstance(data, Mapping):
            return data
        protocol = data.get("protocol", "auto")
        offer = ALPN_FOR.get(protocol) if isinstance(protocol, str) else None
        if offer is None:
            return data
        tls = data.get("tls", {})
        if isinstance(tls, Mapping) and "alpn" not in tls:
            return {**data, "tls": {**tls, "alpn": list(offer)}}
        if isinstance(tls, TlsConfig) and "alpn" not in tls.model_fields_set:
            return {**data, "tls": tls.model_copy(update={"alpn": list(offer)})}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _raise_problems(_cluster_problems(self.model_dump()))
        return self


def _cluster_problems(cluster: Mapping[str, Any]) -> list[Problem]:
    """The checks across a cluster's fields, over a plain mapping: the loader re-runs them on
    the raw data when one of the cluster's fields failed (see the package doc, point 4)."""
    protocol = cluster.get("protocol", "auto")
    tls = cluster.get("tls")
    alpn = tls.get("alpn") if isinstance(tls, Mapping) else None
    if protocol not in ALPN_FOR or not isinstance(alpn, list):
        return []  # invalid (pydantic says so), or not given: derived from protocol
    return _alpn_problems(protocol, alpn)


def _alpn_problems(protocol: str, alpn: list[object]) -> list[Problem]:
    """`tls.alpn` against `protocol` (whether or not TLS is enabled: the file must not say two
    different things)."""
    where = ("tls", "alpn")
    if protocol == "http1" and "h2" in alpn:
        message = (
            "offers h2 but protocol is http1: the endpoint could choose HTTP/2; remove h2, or set "
            "protocol: auto"
        )
        return [(where, message)]
    if protocol == "http2" and alpn != ["h2"]:
        if "h2" not in alpn:
            message = "protocol http2 needs h2 in alpn: the endpoint must agree to HTTP/2"
        else:
            message = (
                "protocol http2 offers only h2: with http/1.1 offered the endpoint could choose "
                "HTTP/1.1; set alpn: [h2], or protocol: auto to let the endpoint choose"
            )
        return [(where, message)]
    return []


def dynamic_cluster(host: str, port: int) -> ClusterConfig:
    """The cluster a forward proxy creates for a new `host:port`: DNS discovery, defaults
    otherwise. Its name is `join_address(host, port)`. Raises ValueError for a bad host."""
    return ClusterConfig(
        name=join_address(host, port), discovery=DnsDiscovery(type="dns", host=host, port=port)
    )
