"""The clusters by name: configured ones, and the forward proxy's dynamic `host:port` ones.

Dynamic clusters are created on the first request to a new destination and removed after
ten idle minutes (SPEC section 4). They are bounded (SPEC section 5): at most
`max_destinations` exist; a new destination beyond that evicts the least recently used idle
one (nothing in flight, nothing waiting), or is refused with 503 `too_many_destinations` when
every one is busy. A destination whose name does not resolve is dropped at once and
remembered as failing for `NEGATIVE_TTL` seconds: requests to it meanwhile get 502
`connect_failed` without a lookup, instead of a resolver retrying it forever. How a cluster
gets its endpoints and policies is decided by the composition root, through `build`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from sidecar.downstream_types import ForwardTargetLike
from sidecar.errors import ConnectFailed, ProtocolError, TooManyDestinations
from sidecar.observe.stats import ProcessStats
from sidecar.upstream.cluster import Cluster

DYNAMIC_IDLE: Final = 600.0
NEGATIVE_TTL: Final = 5.0  # how long a name that did not resolve is answered without a lookup
DEFAULT_MAX_DESTINATIONS: Final = 256


class ClusterSet:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        build_dynamic: Callable[[str, int], Cluster],
        retire: Callable[[Cluster], None],
        max_destinations: int = DEFAULT_MAX_DESTINATIONS,
        stats: ProcessStats | None = None,
    ) -> None:
        self._loop = loop
        self.static: dict[str, Cluster] = {}
        self.dynamic: dict[str, Cluster] = {}
        self._build_dynamic = build_dynamic
        self._retire = retire
        self.max_destinations = max_destinations
        # name -> (answer without a lookup until, why): insertion order is expiry order.
        self._failing: dict[str, tuple[float, str]] = {}
        self._stats = stats if stats is not None else ProcessStats()

    def get(self, name: str) -> Cluster | None:
        return self.static.get(name)

    def forward(self, target: ForwardTargetLike) -> Cluster:
        name = target.cluster
        cluster = self.static.get(name) or self.dynamic.get(name)
        if cluster is None:
            cluster = self._new_dynamic(target, name)
        return cluster

    def _new_dynamic(self, target: ForwardTargetLike, name: str) -> Cluster:
        failing = self._failing.get(name)
        if failing is not None:
            until, detail = failing
            if self._loop.time() < until:
                raise ConnectFailed(detail, name)
            del self._failing[name]
        if len(self.dynamic) >= self.max_destinations:
            self._make_room(name)
        try:
            built = self._build_dynamic(target.host, target.port)
        except ValueError as exc:  # pydantic's ValidationError is one
            # allowed_hosts let it through (`*` matches anything), but it is no host name
            # ("up-a@127.0.0.1"): that is about what the app sent, a 400.
            raise ProtocolError(f"{target.host!r} is not a valid host name") from exc
        cluster = self.dynamic[name] = built
        self._counted("created")
        return cluster

    def _counted(self, event: str) -> None:
        stats = self._stats
        stats.forward_events[event] += 1
        stats.forward_destinations = len(self.dynamic)

    def _make_room(self, name: str) -> None:
        """Evict least recently used idle dynamic clusters down to one below the limit (after a
        reload lowered it, possibly several), or refuse `name`. O(n) in the dynamic clusters,
        and only when a new destination arrives at the limit: nothing is kept in order per
        request (`Cluster.last_used` is set by the exchange anyway)."""
        excess = len(self.dynamic) - self.max_destinations + 1
        idle = sorted(
            (c for c in self.dynamic.values() if c.idle()), key=lambda c: c.last_used
        )
        if len(idle) < excess:
            self._counted("refused")
            raise TooManyDestinations(
                f"{name}: all {len(self.dynamic)} forward-proxy destinations are busy "
                f"(forward_proxy.max_destinations: {self.max_destinations})",
                name,
            )
        for victim in idle[:excess]:
            del self.dynamic[victim.name]
            self._counted("evicted")
            self._retire(victim)

    def unresolvable(self, cluster: Cluster, detail: str) -> None:
        """A dynamic cluster's name did not resolve before it ever had endpoints: answer who
        waits with connect_failed now, drop the cluster (its resolver stops), and answer the
        name without a lookup for NEGATIVE_TTL seconds."""
        name = cluster.name
        if self.dynamic.get(name) is not cluster:
            return
        del self.dynamic[name]
        self._counted("unresolvable")
        failing = self._failing
        failing.pop(name, None)
        failing[name] = (self._loop.time() + NEGATIVE_TTL, detail)
        # Bounded: at most a few times the destinations; the oldest (first to expire) go.
        while len(failing) > 4 * self.max_destinations:
            del failing[next(iter(failing))]
        self._retire(cluster)
        cluster.give_up(detail)

    def all(self) -> list[Cluster]:
        return [*self.static.values(), *self.dynamic.values()]

    def sweep(self) -> int:
        """Remove dynamic clusters unused for DYNAMIC_IDLE seconds with nothing in flight."""
        now = self._loop.time()
        gone = [
            name
            for name, c in self.dynamic.items()
            if now - c.last_used > DYNAMIC_IDLE and c.active_connections() == 0
        ]
        for name in gone:
            self._retire(self.dynamic.pop(name))
            self._counted("expired")
        failing = self._failing
        while failing and next(iter(failing.values()))[0] <= now:
            del failing[next(iter(failing))]
        return len(gone)
