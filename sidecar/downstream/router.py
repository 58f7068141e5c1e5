"""Pure routing: a request's authority and path -> a cluster name, a forward target, or a refusal.

Order (SPEC section 5): the listener's fixed cluster; else the first route whose match fits
the authority (absolute-form target first, then Host) and path; else the forward proxy for
allowed hosts; else 404 `no_route`. No I/O and no state: easy to test exhaustively.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from sidecar.errors import HostNotAllowed, NoRoute, ProtocolError, SidecarError

if TYPE_CHECKING:
    from sidecar.config import ListenerConfig


@dataclass(frozen=True, slots=True)
class Route:
    cluster: str
    host: str | None = None
    host_suffix: str | None = None
    path_prefix: bytes | None = None

    def matches(self, host: str, path: bytes) -> bool:
        if self.host is not None and host != self.host:
            return False
        if self.host_suffix is not None and not host.endswith(self.host_suffix):
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)


@dataclass(frozen=True, slots=True)
class ForwardTarget:
    """Forward-proxy destination: becomes the dynamic cluster "host:port"."""

    host: str
    port: int

    @property
    def cluster(self) -> str:
        return host_port(self.host, self.port)


Decision = ForwardTarget | tuple[type[SidecarError], str]


@dataclass(frozen=True, slots=True)
class RouteTable:
    cluster: str | None = None
    routes: tuple[Route, ...] = ()
    forward: bool = False
    allowed: tuple[tuple[str, int | None], ...] = ()  # (glob, pinned port)
    connect: bool = False
    own_addresses: frozenset[tuple[str, int]] = field(default_factory=frozenset)
    # (authority, connect) -> (host, port, forward decision): the same few destinations come
    # back on every request, and globbing plus address parsing per request showed in profiles.
    cache: dict[tuple[bytes, bool], tuple[str, int, Decision]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_config(
        cls, listener: ListenerConfig, own_addresses: frozenset[tuple[str, int]]
    ) -> RouteTable:
        routes = tuple(
            Route(
                cluster=r.cluster,
                host=r.match.host.lower() if r.match.host else None,
                host_suffix=r.match.host_suffix.lower() if r.match.host_suffix else None,
                path_prefix=r.match.path_prefix.encode() if r.match.path_prefix else None,
            )
            for r in listener.routes
        )
        fp = listener.forward_proxy
        allowed = [_allowed_entry(entry) for entry in fp.allowed_hosts]
        return cls(
            cluster=listener.cluster,
            routes=routes,
            forward=fp.enabled,
            allowed=tuple(allowed),
            connect=fp.connect,
            own_addresses=own_addresses,
        )


def _allowed_entry(entry: str) -> tuple[str, int | None]:
    """An allowed_hosts entry -> (host glob, pinned port). `[v6]` and `[v6]:port` lose their
    brackets: requests are matched by the bare host, and in a glob `[::1]` would be a
    character class matching one character."""
    entry = entry.lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1 and entry.rsplit(":", 1)[1].isdigit():
        host, port_text = entry.rsplit(":", 1)
        return host, int(port_text)
    return entry, None


def split_authority(authority: bytes, default_port: int) -> tuple[str, int]:
    """b"Host:8080" -> ("host", 8080); b"[::1]:80" -> ("::1", 80). Raises ProtocolError."""
    text = authority.decode("latin-1").strip().lower()
    if not text:
        raise ProtocolError("request has no authority (Host)")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ProtocolError("bad IPv6 authority")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not port_text:
        return host, default_port
    # ASCII digits only: str.isdigit() is also true for '²', which int() refuses.
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) or not (
        0 < int(port_text) < 65536
    ):
        raise ProtocolError("bad port in authority")
    return host, int(port_text)


def host_port(host: str, port: int) -> str:
    """`host:port` as written in an authority: an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_allowed(table: RouteTable, host: str, port: int) -> bool:
    for glob, pinned in table.allowed:
        if pinned is not None and pinned != port:
            continue
        if glob == "*" or fnmatch.fnmatchcase(host, glob):
            return True
    return False


def _local(host: str) -> bool:
    """An address that reaches this host: loopback, or unspecified (connecting to 0.0.0.0 or
    :: reaches the local host on Linux)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _is_self(table: RouteTable, host: str, port: int) -> bool:
    """Forwarding to our own listener would loop until file descriptors run out."""
    if not table.own_addresses:
        return False
    for own_host, own_port in table.own_addresses:
        if own_port != port:
            continue
        # A listener on a loopback or wildcard address is reached through any local address.
        if host == own_host or (_local(host) and _local(own_host)):
            return True
    return False


def route(
    table: RouteTable, authority: bytes, path: bytes, connect: bool
) -> str | ForwardTarget:
    """The cluster name, or a ForwardTarget. Raises NoRoute / HostNotAllowed / ProtocolError."""
    if table.cluster is not None:
        return table.cluster
    key = (authority, connect)
    hit = table.cache.get(key)
    if hit is None:
        host, port = split_authority(authority, 443 if connect else 80)
        if len(table.cache) >= _CACHE_MAX:
            table.cache.clear()
        hit = table.cache[key] = (host, port, _forward_decision(table, host, port, connect))
    host, port, decision = hit
    for r in table.routes:
        if r.matches(host, path):
            return r.cluster
    if isinstance(decision, ForwardTarget):
        return decision
    kind, detail = decision
    raise kind(detail)


_CACHE_MAX: Final = 4096


def _forward_decision(table: RouteTable, host: str, port: int, connect: bool) -> Decision:
    """What the forward proxy does with host:port: a target, or the refusal to raise (kept as
    a class and text, since a raised exception is mutated on its way to the app)."""
    if table.forward and (table.connect or not connect):
        if not _host_allowed(table, host, port):
            return HostNotAllowed, f"{host_port(host, port)} is not in forward_proxy.allowed_hosts"
        if _is_self(table, host, port):
            return HostNotAllowed, f"{host_port(host, port)} is this sidecar's own listener"
        return ForwardTarget(host, port)
    if connect and table.forward:
        return HostNotAllowed, "CONNECT is not enabled on this listener"
    return NoRoute, f"no route for {host}"
