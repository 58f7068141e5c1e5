"""The whole file: `Config`, the drain section, and the checks across listeners and clusters."""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, PlainSerializer, model_validator

from sidecar.config.addresses import split_address
from sidecar.config.base import _default_when_absent, _mappings, _Model
from sidecar.config.clusters import ClusterConfig
from sidecar.config.errors import Loc, Problem, _format_path, _raise_problems
from sidecar.config.listeners import AdminConfig, ForwardProxyConfig, ListenerConfig, StatusConfig
from sidecar.config.units import Duration, _format_grace, _parse_grace


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


def default_config() -> Config:
    """The embedded default of SPEC section 4: admin 15000, status 15020, and one HTTP listener
    on 127.0.0.1:15001 forwarding to any host (CONNECT included), no clusters."""
    return Config()
