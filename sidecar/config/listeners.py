"""Where the app connects: admin and status ports, listeners, their limits, routes and the
forward proxy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, field_validator, model_validator

from sidecar.config.addresses import Address, Name, is_loopback, split_address
from sidecar.config.base import _Bound, _Model, _truthy
from sidecar.config.errors import Problem, _raise_problems
from sidecar.config.units import Duration, Size, _kind


class AdminConfig(_Model, _Bound):
    address: Address = Field(
        default="127.0.0.1:15000",
        description=(
            "Where the admin API listens. Loopback only (127.0.0.1, ::1 or localhost): it can "
            "drain and reconfigure the sidecar."
        ),
    )

    @field_validator("address")
    @classmethod
    def _loopback_only(cls, value: str) -> str:
        if not is_loopback(split_address(value)[0]):
            raise ValueError(
                "the admin address must be loopback (127.0.0.1, ::1 or localhost): "
                "the admin API can drain and reconfigure the sidecar"
            )
        return value


class StatusConfig(_Model, _Bound):
    address: Address = Field(
        default="0.0.0.0:15020",
        description=(
            "Where the status port listens, for kubelet probes and Prometheus: /healthz, /readyz "
            "and /metrics only."
        ),
    )


class ListenerLimits(_Model):
    max_connections: int = Field(
        default=10000,
        ge=1,
        description=(
            "Open app connections on this listener; beyond it, new connections wait in the "
            "kernel's accept backlog."
        ),
    )
    header_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description=(
            "A request head must arrive in full within this, or the app gets 408 and the "
            "connection is closed."
        ),
    )
    idle_timeout: Duration = Field(
        default=300.0,
        gt=0,
        description="An app keep-alive connection with no request in flight is closed after this.",
    )
    max_header_bytes: Size = Field(
        default=64 * 1024,
        gt=0,
        description=(
            "Largest request head accepted; a larger one gets 431 (over HTTP/2, on its stream "
            "only: a gRPC call gets the Trailers-Only error; one block over 4 times this, or "
            "32 oversized blocks in a row, ends the connection as an HPACK bomb)."
        ),
    )
    max_headers: int = Field(
        default=200,
        ge=1,
        description="Most header fields (or trailer fields) in a request; more get 431.",
    )
    max_concurrent_streams: int = Field(
        default=1000,
        ge=1,
        description=(
            "HTTP/2 streams (requests) one app connection may have open at once, advertised in "
            "SETTINGS_MAX_CONCURRENT_STREAMS; a stream beyond it is refused (REFUSED_STREAM, "
            "which the app's HTTP/2 or gRPC library retries) and the connection's other "
            "streams go on; refusals count towards the rapid-reset limit."
        ),
    )


def _host_pattern(value: object) -> str:
    """An `allowed_hosts` entry: a shell glob for the host, optionally ":port" to pin the port."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a host glob like *.svc.cluster.local; got {_kind(value)}")
    if "/" in value or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not a host glob (no scheme, path or spaces)")
    host, port = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected [v6]:port")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    if not host:
        raise ValueError(f"{value!r} has no host part")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return value.lower()  # host names are case-insensitive


HostPattern = Annotated[str, BeforeValidator(_host_pattern)]


class ForwardProxyConfig(_Model):
    enabled: bool = Field(
        default=False,
        description=(
            "Serve absolute-form requests (what a client configured with http_proxy sends): each "
            "new host:port becomes a dynamic cluster with DNS discovery and the default cluster "
            "settings; one idle for 10 minutes is removed."
        ),
    )
    allowed_hosts: list[HostPattern] = Field(
        default_factory=list,
        description=(
            "Hosts the forward proxy may reach: shell-style globs matched against the host "
            "without its port (`*` matches any host, IP literals included); an entry `host:port` "
            "also pins the port. Other hosts get 403 host_not_allowed; an empty list refuses "
            "every request."
        ),
    )
    connect: bool = Field(
        default=False,
        description=(
            "Accept CONNECT tunnels (what a client sends through a proxy for https:// URLs)."
        ),
    )
    max_destinations: int = Field(
        default=256,
        ge=1,
        description=(
            "Dynamic clusters (forward-proxy destinations) at most: a new host:port beyond it "
            "evicts the least recently used idle one, or gets 503 too_many_destinations when "
            "none is idle. Shared by every forward-proxy listener (the largest value counts)."
        ),
    )


class RouteMatch(_Model):
    host: str | None = Field(
        default=None,
        description=(
            "The request's host, exactly (case-insensitive, port ignored): from the absolute-form "
            "URI, else the Host header."
        ),
    )
    host_suffix: str | None = Field(
        default=None,
        description="The request's host ends with this, e.g. `.svc.cluster.local`.",
    )
    path_prefix: str | None = Field(
        default=None,
        description="The request's path starts with this (must start with /).",
    )

    @field_validator("host", "host_suffix")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        if value is not None:
            if not value or "/" in value or any(c.isspace() for c in value):
                raise ValueError(f"{value!r} is not a host name")
            return value.lower()
        return value

    @field_validator("path_prefix")
    @classmethod
    def _slash(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"path_prefix {value!r} must start with /")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.host is None and self.host_suffix is None and self.path_prefix is None:
            _raise_problems([((), "a match needs at least one of host, host_suffix, path_prefix")])
        return self


class RouteConfig(_Model):
    match: RouteMatch = Field(
        description=(
            "What a request must fit: every key given must match; at least one of host, "
            "host_suffix, path_prefix."
        ),
    )
    cluster: str = Field(
        description="The cluster that serves matching requests (a name under `clusters`).",
    )


class ListenerConfig(_Model, _Bound):
    name: Name = Field(description="Unique name; the `listener` label of metrics and logs.")
    address: Address = Field(
        description="host:port to bind. Must be a loopback address unless `allow_remote` is true.",
    )
    protocol: Literal["http", "tcp"] = Field(
        default="http",
        description=(
            "`http`: HTTP proxying (fixed cluster, routes, forward proxy) of HTTP/1.1 and of "
            "cleartext HTTP/2 with prior knowledge (h2c, what gRPC's insecure channels send) on "
            "the same port, told apart by the connection preface; `tcp`: raw TCP passthrough to "
            "`cluster`."
        ),
    )
    routes: list[RouteConfig] = Field(
        default_factory=list,
        description=(
            "Tried in order when the listener has no fixed `cluster`: the first route whose match "
            "fits the request picks the cluster; else the forward proxy; else 404 no_route."
        ),
    )
    cluster: str | None = Field(
        default=None,
        description=(
            "Every request (for `tcp`: every connection) of this listener goes to this cluster; "
            "routes and the forward proxy are then unused. Required for `tcp`."
        ),
    )
    forward_proxy: ForwardProxyConfig = Field(
        default_factory=ForwardProxyConfig,
        description=(
            "Proxying to whatever allowed host:port a request names (HTTP_PROXY). Not for `tcp` "
            "listeners."
        ),
    )
    limits: ListenerLimits = Field(
        default_factory=ListenerLimits,
        description="Limits on the app's connections and request heads, per listener.",
    )
    allow_remote: bool = Field(
        default=False,
        description=(
            "Allow a non-loopback `address`. An egress proxy reachable from outside the pod is an "
            "open relay: without this, such an address is a config error."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _raise_problems(_listener_problems(self.model_dump()))
        return self


def _listener_problems(listener: Mapping[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    if listener.get("protocol", "http") == "tcp":
        if not listener.get("cluster"):
            problems.append((("cluster",), "a tcp listener needs a cluster to forward to"))
        if listener.get("routes"):
            problems.append((("routes",), "a tcp listener has no routes: it forwards to cluster"))
        proxy = listener.get("forward_proxy")
        if isinstance(proxy, Mapping) and _truthy(proxy.get("enabled")):
            problems.append((("forward_proxy",), "a tcp listener cannot be a forward proxy"))
    address = listener.get("address")
    if isinstance(address, str):
        try:
            host, _ = split_address(address)
        except ValueError:
            return problems  # reported by the field itself
        if not is_loopback(host) and not _truthy(listener.get("allow_remote", False)):
            problems.append(
                (
                    ("address",),
                    f"{host} is not a loopback address: an egress listener reachable from "
                    "outside the pod is an open relay; set allow_remote: true if you mean it",
                )
            )
    return problems
