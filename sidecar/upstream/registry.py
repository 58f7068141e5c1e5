"""The clusters by name: configured ones, and the forward proxy's dynamic `host:port` ones.

Dynamic clusters are created on the first request to a new destination and removed after
ten idle minutes (SPEC section 4). How a cluster gets its endpoints and policies is decided by
the composition root, through `build` — this module only keeps the map.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.downstream_types import ForwardTargetLike
from sidecar.upstream.cluster import Cluster

DYNAMIC_IDLE = 600.0


class ClusterSet:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        build_dynamic: Callable[[str, int], Cluster],
        retire: Callable[[Cluster], None],
    ) -> None:
        self._loop = loop
        self.static: dict[str, Cluster] = {}
        self.dynamic: dict[str, Cluster] = {}
        self._build_dynamic = build_dynamic
        self._retire = retire

    def get(self, name: str) -> Cluster | None:
        return self.static.get(name)

    def forward(self, target: ForwardTargetLike) -> Cluster:
        name = target.cluster
        cluster = self.static.get(name) or self.dynamic.get(name)
        if cluster is None:
            cluster = self.dynamic[name] = self._build_dynamic(target.host, target.port)
        return cluster

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
        return len(gone)
