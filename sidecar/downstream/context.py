"""What every app connection of one listener shares: routing, clusters, limits, counters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sidecar.downstream.router import ForwardTarget, RouteTable, route
from sidecar.downstream.tunnel import Tunnel
from sidecar.errors import NoRoute, SidecarError
from sidecar.observe.stats import ListenerStats
from sidecar.timers import Wheel
from sidecar.upstream.cluster import Cluster


class Clusters(Protocol):
    """The cluster registry as the data path sees it (see upstream/registry.py)."""

    def get(self, name: str) -> Cluster | None: ...
    def forward(self, target: ForwardTarget) -> Cluster: ...


class AppConnection(Protocol):
    """An app connection as the drain sees it (downstream/protocol.py's, kept in
    `ListenerContext.connections`): a Protocol, so that this module imports nothing above it."""

    @property
    def idle(self) -> bool: ...
    def close_if_idle(self) -> bool: ...
    def abort(self) -> None: ...


@dataclass(eq=False)
class Limits:
    max_connections: int = 10000
    header_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_header_bytes: int = 65536
    max_headers: int = 200
    max_concurrent_streams: int = 1000  # advertised to HTTP/2 apps (SPEC section 11)


@dataclass(eq=False)
class ListenerContext:
    name: str
    table: RouteTable
    clusters: Clusters
    stats: ListenerStats
    limits: Limits
    loop: asyncio.AbstractEventLoop
    wheel: Wheel
    access_log: bool = False
    # Returns an error (Draining) when new requests must be refused; None to serve.
    admit: Callable[[], SidecarError | None] = lambda: None
    connections: set[AppConnection] = field(default_factory=set)
    tunnels: set[Tunnel] = field(default_factory=set)
    # Called when connections/tunnels change, and (with watch_requests, set while draining)
    # when requests finish.
    on_change: Callable[[], None] | None = None
    watch_requests: bool = False

    def cluster_for(self, authority: bytes, path: bytes, connect: bool) -> Cluster:
        """The cluster a request goes to (a forward-proxy destination's is made on first use).
        Raises NoRoute, or the router's refusals (HostNotAllowed, ProtocolError)."""
        target = route(self.table, authority, path, connect)
        if isinstance(target, ForwardTarget):
            return self.clusters.forward(target)
        found = self.clusters.get(target)
        if found is None:
            raise NoRoute(f"cluster {target} does not exist", target)
        return found

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
