"""The configuration of SPEC section 4: pydantic models, YAML loading with line numbers, `${VAR}`.

Theory of operation
-------------------
`load_config` / `parse_config` turn YAML text into a frozen `Config` or raise `ConfigError`
holding *every* problem found, each as `FILE:LINE: path.to.field: message` (SPEC section 2).

1. The text is composed (not constructed) into a YAML node tree, so every key keeps its line.
   The resolver is YAML 1.2's core schema, not PyYAML's YAML 1.1 one: with 1.1, the key `on`
   of `retry.on` would become the boolean True, `1:30` an integer and `no` a boolean.
2. The node tree is converted to plain dicts/lists by hand, recording path -> line of the key,
   expanding `${VAR}` / `${VAR:-default}` / `$$` in string scalars, reporting duplicate keys.
3. Pydantic validates the plain data. Single-field rules live on the fields; rules that involve
   several fields live in `model_validator`s that raise one `config_problems` error carrying a
   list of (relative path, message), so each problem points at the key at fault.
4. Pydantic does not run a model's own validator when one of its fields failed. So that a file
   with a bad duration *and* a dangling cluster reference reports both, the listener-level and
   config-level checks are plain functions over mappings, re-run on the raw data in that case.

Defaults: every section has them, and they are the embedded default of SPEC section 4. An
omitted `listeners` key means the default egress listener (127.0.0.1:15001, forward proxy for
every host, CONNECT on), so an empty file equals `default_config()` and "the smallest useful
file names one cluster" holds. An explicit `listeners: []` is an error: it would proxy nothing.
File paths (tls.ca_file, ...) are not checked for existence here: `sidecar check` often runs
where the secrets are not mounted; the TLS layer reports them when it loads them.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "Address",
    "AdminConfig",
    "BackoffConfig",
    "BudgetConfig",
    "CircuitBreakerConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DnsDiscovery",
    "DrainConfig",
    "Duration",
    "ForwardProxyConfig",
    "HealthCheckConfig",
    "KubernetesDiscovery",
    "ListenerConfig",
    "ListenerLimits",
    "OutlierConfig",
    "PoolConfig",
    "RetryConfig",
    "RouteConfig",
    "RouteMatch",
    "Size",
    "StaticDiscovery",
    "StatusConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "config_warnings",
    "default_config",
    "dynamic_cluster",
    "expand_env",
    "format_duration",
    "format_size",
    "is_loopback",
    "join_address",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "redact_secrets",
    "redacted",
    "split_address",
    "summary",
]

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]

# --- durations and sizes -----------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_DURATION_FULL = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)(?:ms|s|m|h))+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "5s", "2m", "1h", "1m30s", "1.5s", or a bare number of seconds."""
    if isinstance(value, bool):  # bool is an int: `timeout: true` must not mean 1 second
        raise ValueError("expected a duration like 250ms, 5s, 2m; got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"duration {value!r} must not be negative")
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION_FULL.fullmatch(text):
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(
                f"invalid duration {value!r}: use a number with a unit (ms, s, m, h), "
                "e.g. 250ms, 5s, 2m"
            )
    else:
        raise ValueError(f"expected a duration like 250ms, 5s, 2m; got {_kind(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"duration {value!r} must be finite")
    if seconds < 0:
        raise ValueError(f"duration {value!r} must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of `parse_duration`, in the largest unit that is exact: 0.25 -> "250ms"."""
    millis = round(seconds * 1000, 6)
    if millis != int(millis):  # sub-millisecond: rare, but must round-trip
        return f"{millis:.6f}".rstrip("0").rstrip(".") + "ms"
    whole = int(millis)
    if whole == 0:
        return "0s"
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}ms"


_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?")


def parse_size(value: object) -> int:
    """Bytes from "64KiB", "1MiB", "512B", "1KB" (1000 bytes), or a bare integer."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 64KiB or 1MiB; got a boolean")
    if isinstance(value, int):
        size: float = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"size {value!r} must be finite")
        size = value
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"size {value!r} must not be negative")
        match = _SIZE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"invalid size {value!r}: use bytes or a unit (B, KB, MB, GB, KiB, MiB, GiB), "
                "e.g. 64KiB"
            )
        size = float(match[1]) * _SIZE_UNITS[match[2] or "B"]
    else:
        raise ValueError(f"expected a size like 64KiB or 1MiB; got {_kind(value)}")
    if size < 0:
        raise ValueError(f"size {value!r} must not be negative")
    if size != int(size):
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(size)


def format_size(size: int) -> str:
    """The inverse of `parse_size`, in the largest binary unit that is exact: 65536 -> "64KiB"."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


# Floats and ints in Python; strings like "250ms" / "64KiB" in YAML and in JSON dumps, so that
# `model_dump(mode="json")` is what `/config` shows and it parses back to the same config.
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
]


def _parse_grace(value: object) -> float | str:
    if value == "auto":
        return "auto"
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("grace must be greater than 0s (or auto)")
    return seconds


def _format_grace(value: float | str) -> str:
    return value if isinstance(value, str) else format_duration(value)


# --- addresses ---------------------------------------------------------------------------------

_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


def split_address(text: str) -> tuple[str, int]:
    """(host, port) from "host:port" or "[v6]:port", host without brackets. Port 0 is allowed
    (bind an ephemeral port, as tests do); raises ValueError with a readable message."""
    if not isinstance(text, str):
        raise ValueError(f"expected an address like 127.0.0.1:15001; got {_kind(text)}")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"address {text!r} must look like [::1]:15001")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"address {text!r} has no port: use host:port, e.g. 127.0.0.1:15001")
        if ":" in host:
            raise ValueError(f"address {text!r}: IPv6 addresses need brackets, e.g. [::1]:15001")
        if not host:
            raise ValueError(f"address {text!r} has no host: use e.g. 127.0.0.1{text}")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"address {text!r}: {host!r} is not a valid host name or IP")
    if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
        raise ValueError(f"address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def join_address(host: str, port: int) -> str:
    """(host, port) -> "host:port", bracketing IPv6 literals: the inverse of `split_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for "localhost", 127.0.0.0/8, ::1 (and ::ffff:127.x). Other names are not: we will
    not resolve DNS to decide whether a listener may bind."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _check_address(text: str) -> str:
    split_address(text)
    return text


Address = Annotated[str, AfterValidator(_check_address)]


def _check_endpoint(text: str) -> str:
    if split_address(text)[1] == 0:
        raise ValueError(f"endpoint {text!r}: port must be from 1 to 65535")
    return text


def _check_host(text: str) -> str:
    """A DNS name or an IP literal (IPv6 without brackets): what discovery and SNI take."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not _HOSTNAME.fullmatch(text):
            raise ValueError(f"{text!r} is not a valid host name or IP address") from None
    return text


def _check_name(text: str) -> str:
    # Names become metric labels and log fields: keep them printable and unambiguous.
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"name {text!r} must be non-empty without spaces")
    return text


def _empty_to_none(value: object) -> object:
    # `sni: ${SNI:-}` should mean "not set", not an empty SNI.
    return None if value == "" else value


Name = Annotated[str, AfterValidator(_check_name)]
OptionalPath = Annotated[str | None, BeforeValidator(_empty_to_none)]

_K8S_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

# --- the models --------------------------------------------------------------------------------

_PROBLEMS = "config_problems"


def _raise_problems(problems: Sequence[Problem]) -> None:
    """Raise one pydantic error that carries several located problems (see the module doc)."""
    if problems:
        text = "; ".join(f"{_format_path(loc) or 'here'}: {msg}" for loc, msg in problems)
        raise PydanticCustomError(_PROBLEMS, "{summary}", {"summary": text, "problems": problems})


def _default_when_absent(data: Any, field: str, compute: Callable[[Mapping[str, Any]], Any]) -> Any:
    """Derive a default from a sibling the user did set, so that `max_connections: 10` alone
    is not an error about `max_idle: 20`, a key the user never wrote."""
    if isinstance(data, Mapping) and field not in data:
        try:
            value = compute(data)
        except (KeyError, TypeError, ValueError):
            return data  # the sibling is absent or invalid: pydantic will say so
        if value is not None:
            return {**data, field: value}
    return data


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Bound:
    """`host` and `port` of a model's `address` field (a mixin, so field order stays as in YAML)."""

    if TYPE_CHECKING:
        address: str

    @property
    def host(self) -> str:
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        return split_address(self.address)[1]


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
        description="Largest request head accepted; a larger one gets 431.",
    )
    max_headers: int = Field(
        default=200,
        ge=1,
        description="Most header fields (or trailer fields) in a request; more get 431.",
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
            "`http`: HTTP/1.1 proxying (fixed cluster, routes, forward proxy); `tcp`: raw TCP "
            "passthrough to `cluster`."
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
    alpn: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["http/1.1"],
        description="ALPN protocols offered in the handshake.",
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


class HealthCheckConfig(_Model):
    type: Literal["http", "tcp", "none"] = Field(
        default="none",
        description=(
            "Active health checks: `http` (GET `path`, healthy on 2xx), `tcp` (a connect "
            "succeeds) or `none` (outlier detection still applies)."
        ),
    )
    path: str = Field(
        default="/healthz",
        description="Path requested by `http` checks (must start with /).",
    )
    interval: Duration = Field(
        default=5.0,
        gt=0,
        description="Time between two checks of an endpoint.",
    )
    timeout: Duration = Field(
        default=1.0,
        gt=0,
        description=(
            "A check without an answer within this fails. Default: 1s, or interval when shorter; "
            "never longer than interval."
        ),
    )
    healthy_threshold: int = Field(
        default=2,
        ge=1,
        description="Consecutive passed checks that make an unhealthy endpoint healthy again.",
    )
    unhealthy_threshold: int = Field(
        default=3,
        ge=1,
        description=(
            "Consecutive failed checks that make an endpoint unhealthy (it gets no requests)."
        ),
    )

    @field_validator("path")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path {value!r} must start with /")
        return value

    # `timeout` may exceed `interval` (as in Envoy): a check still running delays that
    # endpoint's next one, checks of one endpoint never overlap (policy/health.py).


class OutlierConfig(_Model):
    consecutive_failures: int = Field(
        default=5,
        ge=1,
        description=(
            "Consecutive failed requests (connect failures, resets, timeouts, 5xx) that eject an "
            "endpoint."
        ),
    )
    base_ejection_time: Duration = Field(
        default=30.0,
        gt=0,
        description=(
            "Length of a first ejection; an endpoint ejected again stays out base_ejection_time "
            "times the number of its ejections, up to max_ejection_time."
        ),
    )
    max_ejection_time: Duration = Field(
        default=300.0,
        gt=0,
        description="Longest ejection. Default: 5m, or base_ejection_time when longer.",
    )
    max_ejection_percent: int = Field(
        default=50,
        ge=0,
        le=100,
        description="At most this percentage of a cluster's endpoints is ejected at once.",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        return _default_when_absent(
            data, "max_ejection_time", lambda d: max(300.0, parse_duration(d["base_ejection_time"]))
        )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.max_ejection_time < self.base_ejection_time:
            message = "must not be shorter than base_ejection_time"
            _raise_problems([(("max_ejection_time",), message)])
        return self


class CircuitBreakerConfig(_Model):
    failure_rate_threshold: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "The breaker opens when this share of the requests in the rolling window failed "
            "(connect failures, resets, timeouts, 5xx)."
        ),
    )
    minimum_requests: int = Field(
        default=20,
        ge=1,
        description="Requests the window must hold before the failure rate counts.",
    )
    window: Duration = Field(
        default=10.0,
        gt=0,
        description="Length of the rolling window the failure rate is measured over.",
    )
    open_duration: Duration = Field(
        default=30.0,
        gt=0,
        description=(
            "How long an open breaker refuses requests (503 circuit_open) before it lets trial "
            "requests through (half-open)."
        ),
    )
    half_open_max_requests: int = Field(
        default=5,
        ge=1,
        description=(
            "Trial requests let through while half-open; their outcome closes or reopens the "
            "breaker."
        ),
    )
    max_concurrent_requests: int = Field(
        default=1000,
        ge=1,
        description="Requests in flight to the cluster at once; one more gets 503 circuit_open.",
    )


_RETRY_WORDS = ("connect-failure", "reset", "timeout", "5xx")


def _retry_condition(value: object) -> str:
    # `on: [503]` (a YAML integer) is as clear as `on: ["503"]`: accept both.
    text = "" if isinstance(value, bool) else str(value).lower()
    if text in _RETRY_WORDS or re.fullmatch(r"5\d\d", text):
        return text
    raise ValueError(
        f"unknown retry condition {value!r}: use connect-failure, reset, timeout, 5xx "
        'or a 5xx status like "503"'
    )


class BackoffConfig(_Model):
    base: Duration = Field(
        default=0.025,
        gt=0,
        description=(
            "Wait before the first retry; it doubles with each further retry, with full jitter."
        ),
    )
    max: Duration = Field(
        default=1.0,
        gt=0,
        description="Longest wait between tries. Default: 1s, or base when longer.",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        return _default_when_absent(data, "max", lambda d: max(1.0, parse_duration(d["base"])))

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.max < self.base:
            _raise_problems([(("max",), "must not be shorter than base")])
        return self


class BudgetConfig(_Model):
    ratio: float = Field(
        default=0.2,
        ge=0,
        description=(
            "Retries allowed as a share of requests (0.2: one retry per five requests), on top of "
            "min_per_second. A retry beyond the budget is skipped and counted."
        ),
    )
    min_per_second: float = Field(
        default=10,
        ge=0,
        description=(
            "Retries allowed per second whatever the ratio, so a quiet cluster can still retry."
        ),
    )


class RetryConfig(_Model):
    attempts: int = Field(
        default=3,
        ge=1,
        description=(
            "Total tries, the first included: 1 means no retry. A request may ask for 1 to 10 "
            "with x-sidecar-retry-attempts."
        ),
    )
    on: list[Annotated[str, BeforeValidator(_retry_condition)]] = Field(
        default_factory=lambda: ["connect-failure", "reset", "502", "503", "504"],
        description=(
            "Failures that are retried: connect-failure, reset, timeout, 5xx (any 5xx answer) or "
            'one status such as "503". Retry-After is honoured.'
        ),
    )
    idempotent_only: bool = Field(
        default=True,
        description=(
            "Retry only idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and requests "
            "carrying Idempotency-Key. A try that failed before any byte was sent is retried "
            "whatever the method."
        ),
    )
    per_try_timeout: Duration = Field(
        default=2.0,
        gt=0,
        description=(
            "Deadline of one try; a try that passes it fails as a timeout (and may be retried)."
        ),
    )
    backoff: BackoffConfig = Field(
        default_factory=BackoffConfig,
        description="Wait between tries: exponential, full jitter.",
    )
    budget: BudgetConfig = Field(
        default_factory=BudgetConfig,
        description=(
            "Retries allowed across all requests of the cluster, so retries cannot multiply an "
            "outage."
        ),
    )
    max_body_bytes: Size = Field(
        default=64 * 1024,
        description=(
            "Request bodies up to this size are kept for replay; larger ones are not retried once "
            "sent."
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
    load_balancer: Literal["round_robin", "least_request", "random"] = Field(
        default="least_request",
        description=(
            "How each request picks an endpoint: `round_robin`, `least_request` (the less busy of "
            "two random endpoints) or `random`."
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


class DrainConfig(_Model):
    grace: Annotated[
        float | Literal["auto"],
        BeforeValidator(_parse_grace),
        PlainSerializer(_format_grace, return_type=str, when_used="json"),
    ] = Field(
        default=25.0,
        description=(
            "Longest wait for in-flight work once a drain starts (keep it below the pod's "
            "terminationGracePeriodSeconds); what is still busy then is aborted. `auto`: the "
            "pod's terminationGracePeriodSeconds (read through the Kubernetes API with POD_NAME / "
            "POD_NAMESPACE) minus a safety margin; 25s outside Kubernetes."
        ),
    )
    accept_period: Duration = Field(
        default=5.0,
        description=(
            "New app requests are still served this long after a drain starts; later ones get 503 "
            "draining. Default: 5s, or grace when shorter; never longer than grace."
        ),
    )
    linger: Duration = Field(
        default=5.0,
        description="A graceful close (FIN) not finished within this is reset; 0 resets at once.",
    )
    exit_on_zero_connections: bool = Field(
        default=True,
        description=(
            "true: after accept_period, keep serving the app's requests for as long as it holds "
            "connections to the sidecar (an app shutting down still needs its outbound calls); "
            "drained once nothing is in flight and no app connection is left. false: after "
            "accept_period new requests get 503 draining and idle app connections are closed; "
            "drained once nothing is in flight."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        return _default_when_absent(data, "accept_period", _default_accept_period)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if isinstance(self.grace, float) and self.accept_period > self.grace:
            _raise_problems([(("accept_period",), "must not be longer than grace")])
        return self


def _default_accept_period(data: Mapping[str, Any]) -> float | None:
    grace = _parse_grace(data["grace"])
    return None if isinstance(grace, str) else min(5.0, grace)


def _default_listeners() -> list[ListenerConfig]:
    """The egress listener of the embedded default (SPEC section 4)."""
    return [
        ListenerConfig(
            name="egress",
            address="127.0.0.1:15001",
            forward_proxy=ForwardProxyConfig(enabled=True, allowed_hosts=["*"], connect=True),
        )
    ]


class Config(_Model):
    admin: AdminConfig = Field(
        default_factory=AdminConfig,
        description="The admin API: health, readiness, metrics, drain, reload, config, clusters.",
    )
    status: StatusConfig = Field(
        default_factory=StatusConfig,
        description="The status port, for kubelet and Prometheus.",
    )
    listeners: list[ListenerConfig] = Field(
        default_factory=_default_listeners,
        description=(
            "Where the app connects. Default: the egress listener of the embedded default "
            "(127.0.0.1:15001, forward proxy to every host, CONNECT on); an explicit empty list "
            "is an error."
        ),
    )
    clusters: list[ClusterConfig] = Field(
        default_factory=list,
        description="The upstream services the sidecar proxies to.",
    )
    drain: DrainConfig = Field(
        default_factory=DrainConfig,
        description="What happens on SIGTERM, `sidecar drain` or POST /drain.",
    )
    access_log: bool = Field(default=True, description="One log line per request, at info level.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _raise_problems(_config_problems(self.model_dump()))
        return self

    def cluster(self, name: str) -> ClusterConfig | None:
        return next((c for c in self.clusters if c.name == name), None)

    def listener(self, name: str) -> ListenerConfig | None:
        return next((li for li in self.listeners if li.name == name), None)


# --- checks across fields, over plain mappings (see the module doc, point 4) -------------------

_TRUE = {"1", "on", "t", "true", "y", "yes"}  # what pydantic's lax bool accepts as True


def _truthy(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in _TRUE)


def _mappings(value: object) -> list[tuple[int, Mapping[str, Any]]]:
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, Mapping)]


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


def _bind_key(address: str) -> tuple[frozenset[str], int] | None:
    """Which local IPs a bind takes, coarsely: "*" for a wildcard, both loopbacks for localhost."""
    try:
        host, port = split_address(address)
    except ValueError:
        return None
    host = host.lower()
    if host == "localhost":
        return frozenset({"127.0.0.1", "::1"}), port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return frozenset({host}), port
    return frozenset({"*"} if ip.is_unspecified else {ip.compressed}), port


def _config_problems(config: Mapping[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    listeners = config.get("listeners")
    if listeners is None:
        listeners = [li.model_dump() for li in _default_listeners()]
    if isinstance(listeners, list) and not listeners:
        problems.append((("listeners",), "no listeners defined: the sidecar would proxy nothing"))
    listeners = _mappings(listeners)
    clusters = _mappings(config.get("clusters"))

    for section, items in (("listeners", listeners), ("clusters", clusters)):
        first: dict[str, int] = {}
        for i, item in items:
            name = item.get("name")
            if isinstance(name, str):
                if name in first:
                    message = f"duplicate name {name!r} (first used by {section}[{first[name]}])"
                    problems.append(((section, i, "name"), message))
                else:
                    first[name] = i

    defined = {c["name"] for _, c in clusters if isinstance(c.get("name"), str)}
    for i, listener in listeners:
        fixed: Loc = ("listeners", i, "cluster")
        refs: list[tuple[Loc, object]] = [(fixed, listener.get("cluster"))]
        for j, route in _mappings(listener.get("routes")):
            refs.append((("listeners", i, "routes", j, "cluster"), route.get("cluster")))
        for loc, ref in refs:
            if isinstance(ref, str) and ref not in defined:
                problems.append((loc, _unknown_cluster(ref, defined)))

    binds: list[tuple[Loc, object]] = []
    for section, default in (("admin", "127.0.0.1:15000"), ("status", "0.0.0.0:15020")):
        value = config.get(section)
        address = value.get("address", default) if isinstance(value, Mapping) else default
        binds.append(((section, "address"), address))
    binds += [(("listeners", i, "address"), li.get("address")) for i, li in listeners]
    taken: list[tuple[Loc, frozenset[str], int]] = []
    for loc, address in binds:
        key = _bind_key(address) if isinstance(address, str) else None
        if key is None:
            continue
        hosts, port = key
        for other_loc, other_hosts, other_port in taken:
            # Port 0 asks the kernel for a fresh port: never a conflict.
            if port and port == other_port and ("*" in hosts | other_hosts or hosts & other_hosts):
                problems.append((loc, f"{address} conflicts with {_format_path(other_loc)}"))
                break
        taken.append((loc, hosts, port))
    return problems


def _unknown_cluster(name: str, defined: set[str]) -> str:
    if not defined:
        return f"unknown cluster {name!r}: no clusters are defined"
    close = difflib.get_close_matches(name, sorted(defined), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown cluster {name!r}{hint}; defined: {', '.join(sorted(defined))}"


# --- YAML with line numbers --------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars (see the module doc, point 1)."""

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}


for _tag, _regex, _first in (
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", ["<"]),
):
    _Loader.add_implicit_resolver(_tag, re.compile(_regex), _first)

_TAG = "tag:yaml.org,2002:"
_MAX_NODES = 100_000  # aliases can expand a small file enormously ("billion laughs")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_env(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand `${VAR}`, `${VAR:-default}` (default when unset or empty) and `$$` (a literal
    `$`); any other `$` is kept. Returns the text and the problems (unset variables, ...)."""
    out: list[str] = []
    errors: list[str] = []
    i = 0
    while i < len(text):
        dollar = text.find("$", i)
        if dollar < 0:
            out.append(text[i:])
            break
        out.append(text[i:dollar])
        follower = text[dollar + 1 : dollar + 2]
        if follower == "$":
            out.append("$")
            i = dollar + 2
            continue
        if follower != "{":
            out.append("$")
            i = dollar + 1
            continue
        end = text.find("}", dollar + 2)
        if end < 0:
            errors.append(f"unterminated ${{ in {text!r} (write $$ for a literal $)")
            out.append(text[dollar:])
            break
        body = text[dollar + 2 : end]
        name, has_default, default = body.partition(":-")
        if not _ENV_NAME.fullmatch(name):
            errors.append(f"invalid reference ${{{body}}}: use ${{NAME}} or ${{NAME:-default}}")
        elif has_default:
            out.append(environ.get(name) or default)
        elif name in environ:
            out.append(environ[name])
        else:
            errors.append(f"environment variable {name} is not set (use ${{{name}:-default}})")
        i = end + 1
    return "".join(out), errors


class _Reader:
    """Node tree -> plain data, recording the line of every key and the problems met."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.lines: dict[Loc, int] = {(): 1}
        self.problems: list[tuple[Loc, int, str]] = []
        self._nodes = 0
        self._active: set[int] = set()  # nodes being read: a recursive alias would loop forever

    def read(self, node: yaml.Node, loc: Loc, line: int) -> Any:
        self._nodes += 1
        if self._nodes > _MAX_NODES:
            raise _TooLarge
        if id(node) in self._active:
            self.problems.append((loc, line, "recursive alias"))
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc, line)
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _TAG + "seq":
                    self.problems.append((loc, line, f"unsupported YAML tag {node.tag}"))
                    return None
                items = []
                for index, item in enumerate(node.value):
                    item_line = item.start_mark.line + 1
                    self.lines[(*loc, index)] = item_line
                    items.append(self.read(item, (*loc, index), item_line))
                return items
            return self._scalar(node, loc, line)
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, loc: Loc, line: int) -> Any:
        if node.tag != _TAG + "map":
            self.problems.append((loc, line, f"unsupported YAML tag {node.tag}"))
            return None
        result: dict[str, Any] = {}
        merges: list[yaml.Node] = []
        explicit: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                is_list = isinstance(value_node, yaml.SequenceNode)
                merges.extend(value_node.value if is_list else [value_node])
            else:
                explicit.append((key_node, value_node))
        # `<<: [*a, *b]`: explicit keys win over merged ones, earlier sources over later ones.
        for source in reversed(merges):
            merged = self.read(source, loc, source.start_mark.line + 1)
            if isinstance(merged, dict):
                result.update(merged)
            else:
                self.problems.append((loc, source.start_mark.line + 1, "<< needs a mapping"))
        seen: dict[str, int] = {}
        for key_node, value_node in explicit:
            key_line = key_node.start_mark.line + 1
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key_node.tag != _TAG + "str" or not isinstance(key, str):
                self.problems.append((loc, key_line, "keys must be strings"))
                continue
            if key in seen:
                message = f"duplicate key (first at line {seen[key]})"
                self.problems.append(((*loc, key), key_line, message))
            seen[key] = key_line
            self.lines[(*loc, key)] = key_line
            result[key] = self.read(value_node, (*loc, key), key_line)
        return result

    def _scalar(self, node: yaml.Node, loc: Loc, line: int) -> Any:
        tag, text = node.tag, node.value
        try:
            if tag == _TAG + "str":
                value, errors = expand_env(text, self.environ)
                self.problems.extend((loc, line, e) for e in errors)
                return value
            if tag == _TAG + "null":
                return None
            if tag == _TAG + "bool":
                if text.lower() not in ("true", "false"):
                    raise ValueError(f"invalid boolean {text!r}")
                return text.lower() == "true"
            if tag == _TAG + "int":
                if text.startswith(("0x", "0o")):
                    return int(text[2:], 16 if text[1] == "x" else 8)
                return int(text, 10)
            if tag == _TAG + "float":
                return float(text.replace("inf", "Inf").replace("Inf", "inf").lower())
        except ValueError as exc:
            self.problems.append((loc, line, str(exc)))
            return None
        self.problems.append((loc, line, f"unsupported YAML tag {tag}"))
        return None


class _TooLarge(Exception):
    pass


# --- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: `file`, the 1-based `line` of the offending key (0: no line, e.g. the file
    cannot be read), the dotted `path` (`listeners[0].limits.header_timeout`) and `message`."""

    file: str
    line: int
    path: str
    message: str

    def format(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class ConfigError(Exception):
    """A config that cannot be used. `issues` holds every problem found, in file order."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__(self.format())

    def format(self) -> str:
        """One line per issue, `FILE:LINE: path: message`, as `sidecar check` prints them."""
        return "\n".join(issue.format() for issue in self.issues)


def _format_path(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _data_loc(loc: Sequence[str | int], data: Any) -> Loc:
    """A pydantic error location -> the path in the data: drops the union tags pydantic inserts
    (`discovery.dns.host` -> `discovery.host`); keeps a last element that is absent (missing)."""
    path: list[str | int] = []
    cursor = data
    for index, part in enumerate(loc):
        present = isinstance(cursor, Mapping) and part in cursor
        if present or isinstance(cursor, list) and isinstance(part, int) and part < len(cursor):
            cursor = cursor[part]
        elif index == len(loc) - 1 and isinstance(cursor, Mapping):
            cursor = None
        else:
            continue
        path.append(part)
    return tuple(path)


def _unwrap(annotation: Any, value: Any) -> Any:
    """A field's annotation -> the model class the value is validated as, or None."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = get_args(annotation)
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            tag = value.get("type") if isinstance(value, Mapping) else None
            chosen = [
                m
                for m in models
                if len(models) == 1 or tag in get_args(m.model_fields["type"].annotation)
            ]
            if not chosen:
                return None
            annotation = chosen[0]
        else:
            return annotation


def _known_keys(loc: Loc, data: Any) -> list[str]:
    """The keys the mapping at `loc` may hold, for "did you mean" hints."""
    annotation: Any = Config
    cursor = data
    for part in loc:
        annotation = _unwrap(annotation, cursor)
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if isinstance(part, int) and get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
            cursor = cursor[part] if isinstance(cursor, list) else None
        elif isinstance(part, str) and is_model and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
            cursor = cursor.get(part) if isinstance(cursor, Mapping) else None
        else:
            return []
    annotation = _unwrap(annotation, cursor)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _issues_from(exc: ValidationError, data: Any) -> tuple[list[Problem], set[Loc]]:
    """Pydantic's errors -> located problems, and the locations of the models whose own
    cross-field checks ran and failed."""
    problems: list[Problem] = []
    checked: set[Loc] = set()
    for error in exc.errors(include_url=False):
        loc = _data_loc(error["loc"], data)
        kind = error["type"]
        if kind == _PROBLEMS:
            checked.add(loc)
            problems.extend(((*loc, *rel), msg) for rel, msg in error["ctx"]["problems"])
            continue
        message = str(error["msg"])
        if kind == "extra_forbidden":
            known = _known_keys(loc[:-1], data)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("union_tag_not_found", "union_tag_invalid"):
            loc = (*loc, "type")
            message = "type must be one of static, dns, kubernetes" + (
                f", not {error['ctx']['tag']!r}" if kind == "union_tag_invalid" else ""
            )
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"must be a mapping, not {_kind(error['input'])}"
        elif kind == "list_type":
            message = f"must be a list, not {_kind(error['input'])}"
        else:
            message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if message.startswith("Input should be"):
                message = "must be" + message.removeprefix("Input should be")
        problems.append((loc, message))
    return problems, checked


def _locate(loc: Loc, lines: Mapping[Loc, int]) -> int:
    """The line of the key at `loc`, or of its nearest present ancestor (a missing key)."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


# --- loading -----------------------------------------------------------------------------------


def parse_config(
    text: str, source: str = "<string>", environ: Mapping[str, str] | None = None
) -> Config:
    """YAML text -> `Config`, or `ConfigError` with every problem located (see the module doc)."""
    env = os.environ if environ is None else environ
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        where = f" (column {mark.column + 1})" if mark is not None else ""
        message = f"{exc.problem or exc.context or 'invalid YAML'}{where}"
        raise ConfigError([ConfigIssue(source, line, "<yaml>", message)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(source, 1, "<yaml>", str(exc))]) from None

    reader = _Reader(env)
    try:
        data: Any = {} if node is None else reader.read(node, (), 1)
    except _TooLarge:
        raise ConfigError(
            [ConfigIssue(source, 1, "<yaml>", "too many nodes after expanding aliases")]
        ) from None
    if data is None:  # a document that is only `~` or whose root failed to read
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue(source, 1, "<root>", f"must be a mapping of sections, not {_kind(data)}")]
        )

    located: list[tuple[Loc, int, str]] = list(reader.problems)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems, checked = _issues_from(exc, data)
        # Pydantic skips the checks of a model when one of its fields failed: re-run those
        # of listeners and of the whole config on the raw data, so one pass reports everything
        # (a Config-level error means every field passed, the checks ran: nothing to re-run).
        for index, listener in _mappings(data.get("listeners")):
            here: Loc = ("listeners", index)
            failed = any(loc[:2] == here and len(loc) > 2 for loc, _ in problems)
            if failed and here not in checked:
                problems += [((*here, *rel), m) for rel, m in _listener_problems(listener)]
        if () not in checked:
            problems += _config_problems(data)
        # A value the reader already complained about (an unset ${VAR}, say) was replaced:
        # further complaints about it would only be noise.
        blamed = [loc for loc, _, _ in reader.problems]
        for loc, message in problems:
            if not any(loc[: len(b)] == b for b in blamed):
                located.append((loc, _locate(loc, reader.lines), message))
    else:
        if not located:
            return config

    unique = dict.fromkeys((line, _format_path(loc) or "<root>", msg) for loc, line, msg in located)
    ordered = sorted(unique, key=lambda issue: issue[0])  # stable: file order, then found order
    raise ConfigError([ConfigIssue(source, line, path, msg) for line, path, msg in ordered])


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and parse a config file; an unreadable file is a `ConfigError` (line 0, `<file>`)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(path, 0, "<file>", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(path, 0, "<file>", f"cannot read: {exc}")]) from None
    return parse_config(text, source=path, environ=environ)


def default_config() -> Config:
    """The embedded default of SPEC section 4: admin 15000, status 15020, and one HTTP listener
    on 127.0.0.1:15001 forwarding to any host (CONNECT included), no clusters."""
    return Config()


def dynamic_cluster(host: str, port: int) -> ClusterConfig:
    """The cluster a forward proxy creates for a new `host:port`: DNS discovery, defaults
    otherwise. Its name is `join_address(host, port)`. Raises ValueError for a bad host."""
    return ClusterConfig(
        name=join_address(host, port), discovery=DnsDiscovery(type="dns", host=host, port=port)
    )


# --- showing a config --------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"token|passw|secret|credential|api[_-]?key|private", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_secrets(value: Any) -> Any:
    """A copy of JSON-like data with the value of every secret-looking key replaced. The
    config holds paths to key files, never their content; this guards fields to come."""
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


def config_warnings(config: Config) -> list[str]:
    """Valid but suspicious settings, for the log at start and for `/config`."""
    warnings: list[str] = []
    for listener in config.listeners:
        who = f"listener {listener.name}"
        if listener.allow_remote and not is_loopback(listener.host):
            warnings.append(f"{who}: {listener.address} accepts connections from outside the pod")
        if listener.protocol == "http":
            proxy = listener.forward_proxy
            if listener.cluster is None and not listener.routes and not proxy.enabled:
                warnings.append(f"{who}: no cluster, routes or forward_proxy: every request 404s")
            if listener.cluster is not None and (listener.routes or proxy.enabled):
                warnings.append(f"{who}: the fixed cluster takes every request: routes unused")
            if proxy.enabled and not proxy.allowed_hosts:
                warnings.append(f"{who}: forward_proxy has no allowed_hosts: every request 403s")
    for cluster in config.clusters:
        who = f"cluster {cluster.name}"
        tls = cluster.tls
        if tls.insecure_skip_verify:
            warnings.append(f"{who}: tls.insecure_skip_verify: upstream certificates not verified")
        if not tls.enabled and (tls.sni or tls.ca_file or tls.cert_file or tls.key_file):
            warnings.append(f"{who}: tls settings are ignored because tls.enabled is false")
        if cluster.retry.per_try_timeout > cluster.timeouts.request:
            warnings.append(f"{who}: retry.per_try_timeout exceeds timeouts.request")
    return warnings


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as JSON-able data for `/config` and `sidecar config-dump`: durations
    and sizes as strings ("250ms", "64KiB"), secrets never, plus a top-level `warnings` list."""
    data: dict[str, Any] = redact_secrets(config.model_dump(mode="json"))
    data["warnings"] = config_warnings(config)
    return data


def summary(config: Config, source: str) -> str:
    """The line `sidecar check` prints for a valid file: `FILE: ok: 2 listeners, 3 clusters`."""

    def count(n: int, word: str) -> str:
        return f"{n} {word}" if n == 1 else f"{n} {word}s"

    listeners, clusters = len(config.listeners), len(config.clusters)
    return f"{source}: ok: {count(listeners, 'listener')}, {count(clusters, 'cluster')}"
