"""A cluster: its endpoints (from discovery deltas), one pool per endpoint, and the balancer.

Endpoints that leave discovery, or that turn `terminating` or not ready, stop getting new
requests at once; their pools finish the requests in flight and close idle connections
(removed endpoints drain, they are not dropped). When endpoints join, the oldest idle
connections of the others are rotated so that pool sizes follow the endpoint set; requests
themselves are balanced per request, so new endpoints get traffic from the next request on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from sidecar.discovery.endpoints import Add, Delta, Endpoint, Remove, apply_delta
from sidecar.errors import ConnectFailed, NoHealthyEndpoints
from sidecar.observe.stats import ClusterGauges, ClusterStats, EndpointGauge
from sidecar.policy.resilience import ClusterPolicies
from sidecar.timers import Wheel
from sidecar.upstream.balancer import make_balancer
from sidecar.upstream.h2settings import H2Settings
from sidecar.upstream.pool import Pool, PoolSettings, TlsHooks

if TYPE_CHECKING:
    from sidecar.config import ClusterConfig, Http2Config, UpstreamProtocol

log = logging.getLogger("sidecar.cluster")

# Up to this many serving endpoints, rotation for new ones visits every pool (see _rotate_for).
_ROTATE_SCAN: Final = 64

# The application protocols (ALPN ids) the upstream leg speaks today. A TLS origin offers the
# configured `tls.alpn` (which follows `protocol`) without the others, so that an endpoint cannot
# choose a protocol nothing here speaks: HTTP/1.1 and HTTP/2 (sidecar/upstream/http2.py).
UPSTREAM_ALPN: Final = frozenset({"http/1.1", "h2"})


class Cluster:
    __slots__ = (
        "name",
        "config",
        "settings",
        "protocol",
        "http2",
        "_h2",
        "stats",
        "tls",
        "endpoints",
        "pools",
        "_serving",
        "_serving_at",
        "_draining",
        "_balancer",
        "_loop",
        "_wheel",
        "_ready_waiters",
        "has_answer",
        "last_used",
        "policies",
        "request_timeout",
        "unresolved",
    )

    def __init__(
        self,
        config: ClusterConfig,
        loop: asyncio.AbstractEventLoop,
        wheel: Wheel,
        stats: ClusterStats,
        tls: TlsHooks | None = None,
    ) -> None:
        self.name: str = config.name
        self.config = config
        self.settings = PoolSettings.from_config(config.pool)
        # SPEC section 11, for the HTTP/2 upstream: what to speak, and its pool settings.
        self.protocol: UpstreamProtocol = config.protocol
        self.http2: Http2Config = config.http2
        self._h2 = H2Settings(
            max_concurrent_streams=config.http2.max_concurrent_streams,
            keepalive_interval=config.http2.keepalive_interval,
            keepalive_timeout=config.http2.keepalive_timeout,
            scheme=b"https" if tls is not None else b"http",
        )
        self.request_timeout: float = config.timeouts.request
        self.stats = stats
        self.tls = tls
        self._loop = loop
        self._wheel = wheel
        self.endpoints: dict[str, Endpoint] = {}
        self.pools: dict[str, Pool] = {}
        self._serving: list[Pool] = []
        self._serving_at: dict[str, int] = {}  # pool key -> its index in _serving
        # Pools of endpoints gone, finishing their work. A set, not a dict by address: an
        # endpoint that leaves, returns and leaves again may have two pools draining.
        self._draining: set[Pool] = set()
        self._balancer = make_balancer(config.load_balancer)
        self._ready_waiters: list[asyncio.Future[None]] = []
        self.has_answer = False  # discovery has answered at least once
        self.unresolved = ""  # why discovery gave up before any answer (see give_up)
        self.last_used = loop.time()
        self.policies: ClusterPolicies | None = None  # installed by policy wiring (app.py)
        stats.gauges = self.gauges

    # --- discovery ----------------------------------------------------------------------------
    def apply(self, delta: Delta) -> None:
        """Apply a discovery delta. Synchronous: the resolver calls it from the loop.

        Work is in proportion to the delta, not to the endpoint set: an `Add` or `Remove` of one
        endpoint of 5,000 touches one pool. A `Reset` (a re-list) is turned into the difference
        from what the cluster has, which is the only walk over every endpoint."""
        removed: tuple[str, ...] | list[str]
        changed: tuple[Endpoint, ...] | list[Endpoint]
        if isinstance(delta, Add):
            removed, changed = (), delta.endpoints
        elif isinstance(delta, Remove):
            removed, changed = delta.keys, ()
        else:
            current = self.endpoints
            new = apply_delta(current, delta)
            removed = [key for key in current if key not in new]
            changed = [ep for key, ep in new.items() if current.get(key) != ep]
        endpoints = self.endpoints
        for key in removed:
            if endpoints.pop(key, None) is None:
                continue
            self._unserve(key)
            gone = self.pools.get(key)
            if gone is not None:
                self._retire_pool(key, gone, "endpoint_removed")
        added = 0
        warm: list[Pool] = []
        policies = self.policies
        for ep in changed:
            key = ep.key
            if key not in endpoints:
                added += 1
            endpoints[key] = ep
            found = self.pools.get(key)
            if found is not None:
                pool = found
            else:
                # A returning endpoint gets a new pool; an old one still draining finishes.
                pool = Pool(
                    self.name, ep.ip, ep.port, self.settings, self.stats, self._loop,
                    self._wheel, self.tls, None, self.protocol, self._h2,
                )
                pool.on_connection_closed = self._on_pool_connection_closed
                self.pools[key] = pool
            # Terminating or not ready: no new requests; idle connections close now, and the
            # ones in-flight requests finish with close instead of going back to the pool.
            pool.set_terminating(not ep.serving)
            if ep.serving and (policies is None or policies.endpoint_usable(key)):
                pool.warm = True  # only serving endpoints keep min_idle connections warm
                self._serve(pool)
                warm.append(pool)
            else:
                pool.warm = False
                self._unserve(key)
        if added and len(endpoints) > added:
            self._rotate_for(added, len(endpoints))
        if not self.has_answer:
            self.has_answer = True
            for fut in self._ready_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._ready_waiters.clear()
        for pool in warm:
            pool.prewarm()

    def _retire_pool(self, key: str, pool: Pool, reason: str) -> None:
        del self.pools[key]
        pool.start_closing(reason)
        if not pool.empty:
            self._draining.add(pool)

    def _on_pool_connection_closed(self, pool: Pool) -> None:
        if pool.closing and pool.empty:
            self._draining.discard(pool)

    def _serve(self, pool: Pool) -> None:
        """`pool` takes new requests (O(1); its place in `_serving` is indexed by key)."""
        if pool.key not in self._serving_at:
            self._serving_at[pool.key] = len(self._serving)
            self._serving.append(pool)

    def _unserve(self, key: str) -> None:
        """The endpoint `key` takes no new requests (O(1): the last pool moves into its place;
        the order of `_serving` means nothing to the balancers)."""
        at = self._serving_at.pop(key, None)
        if at is None:
            return
        serving = self._serving
        last = serving.pop()
        if at < len(serving):
            serving[at] = last
            self._serving_at[last.key] = at

    def _rebuild_serving(self) -> None:
        eps = self.endpoints
        policies = self.policies
        serving = []
        for key, pool in self.pools.items():
            ep = eps.get(key)
            usable = (
                ep is not None
                and ep.serving
                and (policies is None or policies.endpoint_usable(key))
            )
            # Only serving endpoints keep min_idle connections warm (pool.py).
            was_warm = pool.warm
            pool.warm = usable
            if usable:
                serving.append(pool)
                if not was_warm:
                    pool.prewarm()  # healthy, readmitted or ready again
        self._serving = serving
        self._serving_at = {pool.key: i for i, pool in enumerate(serving)}

    def refresh(self) -> None:
        """Health or ejection changed: recompute which endpoints take new requests."""
        self._rebuild_serving()

    def _rotate_for(self, added: int, total: int) -> None:
        """Close the oldest idle connections of existing endpoints in proportion to the share
        the new endpoints should take, so the pool follows the endpoint set. With many
        endpoints, a random sample of pools as large as that share gives up its idle
        connections instead: the same number on average, at a cost in proportion to the delta
        rather than a walk over every pool."""
        share = added / total
        serving = self._serving
        if len(serving) <= _ROTATE_SCAN:
            for pool in serving:
                if pool.idle_count:
                    pool.rotate_oldest(math.ceil(pool.idle_count * share))
            return
        for pool in random.sample(serving, math.ceil(len(serving) * share)):
            if pool.idle_count:
                pool.rotate_oldest(pool.idle_count)

    async def wait_ready(self, within: float) -> bool:
        if self.has_answer:
            return True
        fut: asyncio.Future[None] = self._loop.create_future()
        self._ready_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, within)
        except TimeoutError:
            return False
        return True

    def when_ready(self, callback: Callable[[], None]) -> asyncio.Future[None]:
        """Run `callback` once discovery first answers. Returns the future (cancel to stop)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(lambda f: None if f.cancelled() else callback())
        self._ready_waiters.append(fut)
        return fut

    def give_up(self, detail: str) -> None:
        """Discovery failed before any answer and will not try again (a forward-proxy name
        that does not resolve): those waiting for the first answer go on now, and fail with
        connect_failed and `detail`."""
        self.unresolved = detail
        waiters, self._ready_waiters = self._ready_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def idle(self) -> bool:
        """Nothing in flight: no request admitted (breaker slot), holding or waiting for a
        connection, or waiting for discovery. Tunnels do not count: their sockets left the
        pools for good and outlive the cluster."""
        policies = self.policies
        if policies is not None and policies.breaker.inflight:
            return False
        for pool in self._all_pools():
            if pool.inflight or pool.pending_count or pool.active_count:
                return False
        return all(fut.done() for fut in self._ready_waiters)

    # --- per request --------------------------------------------------------------------------
    def pick(self, avoid: Pool | None = None) -> Pool:
        """An endpoint's pool for a new request. Raises NoHealthyEndpoints."""
        serving = self._serving
        if not serving:
            if not self.endpoints:
                if not self.has_answer:
                    raise ConnectFailed(self.unresolved or "endpoints not resolved yet", self.name)
                raise NoHealthyEndpoints("no endpoints", self.name)
            raise NoHealthyEndpoints(
                f"all {len(self.endpoints)} endpoints unhealthy, ejected or terminating",
                self.name,
            )
        if len(serving) == 1:
            return serving[0]
        return self._balancer.pick(serving, avoid)

    # --- observation ----------------------------------------------------------------------------
    def _all_pools(self) -> list[Pool]:
        return [*self.pools.values(), *self._draining]

    def gauges(self) -> ClusterGauges:
        g = ClusterGauges()
        serving = {p.key for p in self._serving}
        for pool in self._all_pools():
            g.active += pool.active_count
            g.idle += pool.idle_count
            g.pending += pool.pending_count
            g.streams += pool.streams
        policies = self.policies
        if policies is not None:
            g.breaker_state = policies.breaker_state_code()
        eps = self.endpoints
        out = []
        for key in self.pools:
            ep = eps.get(key)
            if key in serving:
                state = "serving"
            elif ep is None or not ep.serving:
                state = "terminating"
            elif policies is not None and policies.endpoint_ejected(key):
                state = "ejected"
            else:
                state = "unhealthy"
            out.append(EndpointGauge(key, key in serving, state))
        g.endpoints = out
        return g

    def snapshot(self) -> dict[str, Any]:
        """The `/clusters` entry of SPEC section 7."""
        policies = self.policies
        endpoints = []
        for pool in self._all_pools():
            ep = self.endpoints.get(pool.key)
            healthy = policies.endpoint_healthy(pool.key) if policies is not None else True
            ejected = policies.endpoint_ejected(pool.key) if policies is not None else False
            endpoints.append(
                {
                    "address": pool.key,
                    "healthy": healthy,
                    "ejected": ejected,
                    "terminating": ep is None or ep.terminating,
                    "ready": ep is not None and ep.ready,
                    "active": pool.active_count,
                    "idle": pool.idle_count,
                    "pending": pool.pending_count,
                    "inflight": pool.inflight,
                    "protocol": pool.protocol_name(),
                    "streams": pool.streams,
                }
            )
        handshakes = self.stats.tls_handshakes
        total = handshakes[True] + handshakes[False]
        return {
            "name": self.name,
            "breaker": policies.breaker_state_name() if policies is not None else "closed",
            "endpoints": endpoints,
            "tls_resumption_ratio": (handshakes[True] / total) if total else None,
            "discovery_answered": self.has_answer,
        }

    # --- lifecycle -----------------------------------------------------------------------------
    def prewarm(self) -> None:
        for pool in self._serving:
            pool.prewarm()

    def prewarmed(self) -> bool:
        """Every serving endpoint has its min_idle connections (or cannot: max reached)."""
        want = self.settings.min_idle
        if want == 0:
            return True
        return all(p.idle_count + p.active_count >= want for p in self._serving)

    def close_idle(self, reason: str, linger: float | None = None) -> int:
        return sum(p.close_idle(reason, linger) for p in self._all_pools())

    def start_closing(self, reason: str) -> None:
        for key, pool in list(self.pools.items()):
            self._retire_pool(key, pool, reason)
        self._serving = []
        self._serving_at = {}

    def active_connections(self) -> int:
        return sum(p.active_count for p in self._all_pools())

    def abort_all(self, reason: str) -> int:
        return sum(p.abort_all(reason) for p in self._all_pools())

    def __repr__(self) -> str:
        return f"<Cluster {self.name} endpoints={len(self.endpoints)} serving={len(self._serving)}>"
