"""The composition root: builds clusters, listeners, admin, metrics and discovery from a config,
owns every task, and runs the start and shutdown sequences. Nothing else wires modules."""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import ipaddress
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from sidecar import config as cfgmod
from sidecar import podinfo
from sidecar._build import compiled
from sidecar.admin.server import AdminServer, StatusServer
from sidecar.clock import MONOTONIC
from sidecar.config import ClusterConfig, Config, ForwardProxyConfig, ListenerConfig
from sidecar.discovery.endpoints import Add, Delta, Remove, Resolver
from sidecar.discovery.static import StaticResolver
from sidecar.discovery.stats import DiscoveryStats
from sidecar.downstream.context import Limits, ListenerContext
from sidecar.downstream.listener import Listener
from sidecar.downstream.router import RouteTable
from sidecar.downstream.sniff import SniffProtocol
from sidecar.downstream.tcp import TcpProxyProtocol
from sidecar.lifecycle import Counts, Drain, DrainSettings, DrainState, linger_seconds
from sidecar.observe.loop_lag import watch_loop_lag
from sidecar.observe.stats import Stats
from sidecar.policy.resilience import ClusterPolicies
from sidecar.timers import Wheel
from sidecar.upstream.cluster import UPSTREAM_ALPN, Cluster
from sidecar.upstream.registry import ClusterSet
from sidecar.upstream.tls import TlsOrigin

if TYPE_CHECKING:
    from sidecar.observe.metrics import Scraper

log = logging.getLogger("sidecar")

PREWARM_WAIT = 5.0  # longest wait for min_idle connections before declaring ready anyway
PREWARM_RETRY = 0.25  # how often failed prewarm connects are tried again during that wait
DISCOVERY_WAIT = 10.0  # longest wait for each cluster's first discovery answer


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def freeze_heap() -> None:
    """Exempt what exists now from the cyclic collector's scans (`gc.freeze`).

    Once ready, the heap is mostly modules, config, routes and pools: some 50 000 objects that
    live as long as the process. Every full collection re-scanned them all, about 25 ms with
    the loop stopped, every few seconds under connection churn; frozen, a full collection
    scans only live traffic (about 1 ms seen). Frozen objects are still freed by reference
    counting; only a frozen reference cycle that turns into garbage stays (an endpoint's pool
    from startup, removed later, say) until the next call, which unfreezes and collects first.
    Called when ready and after each config reload; the collect costs one full collection.
    Then the C heap's free pages go back to the kernel (`release_free_heap`).
    """
    gc.unfreeze()
    gc.collect()
    release_free_heap()
    gc.freeze()


def release_free_heap() -> None:
    """Return the C heap's free pages to the kernel (glibc's `malloc_trim`). The start-up
    (reading and validating the config, building every model's validator) frees about 1 MiB
    that glibc would keep mapped, and in RSS, for the life of the pod; idle RSS is 0.5 MiB lower
    with it (ctypes costs the rest). A few milliseconds, when ready and after a reload; where
    the C library has no `malloc_trim` (musl), nothing."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class App:
    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.stats = Stats()
        self.discovery_stats: dict[str, DiscoveryStats] = {}
        # /metrics: the numbers copied on the loop, the text made in a thread (SPEC section 5:
        # a scrape costs the loop at most 50 ms, even with max_destinations clusters). Built at
        # the first scrape: prometheus-client (about 2.4 MiB of RSS) is imported only then.
        self._scraper: Scraper | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # A cluster's own tasks (discovery, TLS file watch), keyed by the Cluster object, not its
        # name: a reload that changes a cluster builds the new one before retiring the old one
        # under the same name, and retiring must stop only the old one's tasks.
        self._cluster_tasks: dict[Cluster, list[asyncio.Task[Any]]] = {}
        self.listeners: dict[str, Listener] = {}
        self.contexts: dict[str, ListenerContext] = {}
        self.ready = False
        self._signals = 0
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.wheel: Wheel = None  # type: ignore[assignment]
        self.clusters: ClusterSet = None  # type: ignore[assignment]
        self.drain: Drain = None  # type: ignore[assignment]
        self.admin: AdminServer | None = None
        self.status: StatusServer | None = None
        self._config_stamp: tuple[int, int, int] | None = None
        self._auto_grace = podinfo.FALLBACK  # drain.grace: auto, until the pod spec is read
        self._grace_task: asyncio.Task[Any] | None = None

    @property
    def scraper(self) -> Scraper:
        if self._scraper is None:
            # Lazily (`render_metrics` imports it off the loop first): a sidecar nobody
            # scrapes never loads prometheus-client.
            from sidecar.observe.metrics import DiscoveryCollector, Scraper

            self._scraper = Scraper(
                self.stats, [DiscoveryCollector(lambda: list(self.discovery_stats.items()))]
            )
        return self._scraper

    async def render_metrics(self) -> tuple[bytes, str]:
        if self._scraper is None:
            # The first scrape imports prometheus-client: 15-45 ms of module code on this
            # 2-core VM, run in a worker thread so that the loop, which gets the GIL back every
            # switch interval, goes on serving (SPEC section 5: 50 ms per scrape, the first too).
            await asyncio.to_thread(importlib.import_module, "sidecar.observe.metrics")
        return await self.scraper.render()

    # --- tasks ---------------------------------------------------------------------------------
    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", exc_info=task.exception(),
                      extra={"fields": {"task": task.get_name()}})

    # --- clusters ---------------------------------------------------------------------------------
    def _default_sni(self, c: ClusterConfig) -> str | None:
        d = c.discovery
        if d.type == "dns":
            return str(d.host)
        if d.type == "kubernetes":
            ns = d.namespace or os.environ.get("POD_NAMESPACE", "default")
            return f"{d.service}.{ns}.svc"
        host = str(d.endpoints[0]).rsplit(":", 1)[0].strip("[]") if d.endpoints else None
        return None if host is None or _is_ip(host) else host

    def _resolver(self, c: ClusterConfig, dynamic: Cluster | None = None) -> Resolver:
        d = c.discovery
        stats = self.discovery_stats[c.name] = DiscoveryStats()
        if d.type == "static":
            return StaticResolver([str(e) for e in d.endpoints])
        if d.type == "dns":
            if _is_ip(str(d.host)):
                return StaticResolver([cfgmod.join_address(str(d.host), int(d.port))])
            from sidecar.discovery.dns import DnsResolver

            if dynamic is not None:
                # A forward-proxy name that does not resolve is given up at once (and
                # remembered as failing), not retried in a loop; its failures share one
                # throttled log line.
                clusters, cluster = self.clusters, dynamic
                return DnsResolver(
                    str(d.host), int(d.port), float(d.refresh), stats=stats,
                    on_unresolved=lambda detail: clusters.unresolvable(cluster, detail),
                    log_site="dns:forward_proxy",
                )
            return DnsResolver(str(d.host), int(d.port), float(d.refresh), stats=stats)
        from sidecar.discovery.kubernetes import KubernetesResolver

        return KubernetesResolver(str(d.service), d.namespace, d.port, stats=stats)

    def build_cluster(self, c: ClusterConfig, dynamic: bool = False) -> Cluster:
        stats = self.stats.cluster(c.name)
        try:
            tls = TlsOrigin.from_config(c.tls, self._default_sni(c) or "", speaks=UPSTREAM_ALPN)
        except ValueError as exc:  # a TLS file that does not load, a missing sni: a config error
            raise ValueError(f"cluster {c.name}: {exc}") from exc
        cluster = Cluster(c, self.loop, self.wheel, stats, tls)
        cluster.policies = policies = ClusterPolicies(
            c.name,
            c,
            stats,
            MONOTONIC,
            cluster.refresh,
            ssl_context=tls.context_for_connect() if tls is not None else None,
            server_hostname=tls.server_hostname if tls is not None else None,
        )
        resolver = self._resolver(c, cluster if dynamic else None)

        def emit(delta: Delta) -> None:
            cluster.apply(delta)
            # In proportion to the delta: an event of one slice of 5,000 endpoints touches the
            # policies of its endpoints only.
            if isinstance(delta, Add):
                policies.endpoints_added([(ep.key, ep.ip, ep.port) for ep in delta.endpoints])
            elif isinstance(delta, Remove):
                policies.endpoints_removed(delta.keys)
            else:
                policies.set_endpoints(
                    [(k, ep.ip, ep.port) for k, ep in cluster.endpoints.items()]
                )

        tasks = self._cluster_tasks[cluster] = []
        tasks.append(self.spawn(resolver.run(emit), f"discovery:{c.name}"))
        if policies.health is not None:
            policies.health.start()
        if tls is not None:
            tasks.append(self.spawn(tls.watch(5.0), f"tls-reload:{c.name}"))
        return cluster

    def retire_cluster(self, cluster: Cluster) -> None:
        if self.clusters.static.get(cluster.name) is not cluster:
            self.discovery_stats.pop(cluster.name, None)
        for task in self._cluster_tasks.pop(cluster, []):
            task.cancel()
        if cluster.policies is not None and cluster.policies.health is not None:
            self.spawn(cluster.policies.health.stop(), f"health-stop:{cluster.name}")
        cluster.start_closing("drain")

    def _retire_dynamic(self, cluster: Cluster) -> None:
        """A forward-proxy destination goes (idle, evicted or unresolvable): its pools close
        gracefully and its metric series go with it, so that the series stay bounded too."""
        self.retire_cluster(cluster)
        if self.stats.clusters.get(cluster.name) is cluster.stats:
            del self.stats.clusters[cluster.name]

    def _max_destinations(self, cfg: Config) -> int:
        """Dynamic clusters are shared by every forward-proxy listener: the bound is the
        largest `max_destinations` among them."""
        limits = [lc.forward_proxy.max_destinations for lc in cfg.listeners
                  if lc.forward_proxy.enabled]
        return max(limits) if limits else ForwardProxyConfig().max_destinations

    def _build_dynamic(self, host: str, port: int) -> Cluster:
        """A forward-proxy destination's cluster. Raises ValueError for a host that is no host
        name (the registry answers it 400)."""
        return self.build_cluster(cfgmod.dynamic_cluster(host, port), dynamic=True)

    # --- listeners --------------------------------------------------------------------------------
    def _own_addresses(self) -> frozenset[tuple[str, int]]:
        return frozenset((li.host, li.port) for li in self.listeners.values())

    def _context(self, lc: ListenerConfig) -> ListenerContext:
        lim = lc.limits
        ctx = ListenerContext(
            name=lc.name,
            table=RouteTable.from_config(lc, frozenset({(lc.host, lc.port)})),
            clusters=self.clusters,
            stats=self.stats.listener(lc.name),
            limits=Limits(lim.max_connections, lim.header_timeout, lim.idle_timeout,
                          lim.max_header_bytes, lim.max_headers,
                          lim.max_concurrent_streams),
            loop=self.loop,
            wheel=self.wheel,
            access_log=self.config.access_log,
            admit=self.drain.admit,
        )
        return ctx

    def start_listener(self, lc: ListenerConfig) -> None:
        ctx = self._context(lc)
        ctx.watch_requests = self.drain.state is not DrainState.SERVING
        if lc.protocol == "tcp":
            assert lc.cluster is not None
            cluster_name = lc.cluster
            factory: Any = lambda: TcpProxyProtocol(ctx, cluster_name)  # noqa: E731
        else:
            # HTTP/1.1 or HTTP/2 (h2c prior knowledge): the first bytes decide (SPEC 11).
            factory = functools.partial(SniffProtocol, ctx)
        listener = Listener(
            lc.name, lc.host, lc.port, factory, ctx.stats, self.loop,
            max_connections=lc.limits.max_connections, allow_remote=lc.allow_remote,
        )
        listener.bind()

        def changed() -> None:
            listener.capacity_changed()
            self.drain.check()

        ctx.on_change = changed
        self.listeners[lc.name] = listener
        self.contexts[lc.name] = ctx
        for name in self._clusters_of(lc):
            self.stats.cluster(name).expect_listener(lc.name)
        # Every listener knows all listener addresses, so the forward proxy refuses loops.
        own = self._own_addresses()
        for c in self.contexts.values():
            c.table = RouteTable.from_config(self.config.listener(c.name) or lc, own)

    def _clusters_of(self, lc: ListenerConfig) -> set[str]:
        names = {r.cluster for r in lc.routes}
        if lc.cluster:
            names.add(lc.cluster)
        return names

    # --- drain hooks ------------------------------------------------------------------------------
    def _counts(self) -> Counts:
        inflight = sum(c.stats.inflight for c in self.contexts.values())
        conns = sum(c.stats.downstream_connections for c in self.contexts.values())
        active = sum(c.active_connections() for c in self.clusters.all())
        return Counts(inflight=inflight, connections=conns, upstream_active=active)

    def _close_idle_upstream(self, linger: int) -> int:
        return sum(c.close_idle("drain", linger) for c in self.clusters.all())

    def _close_idle_downstream(self) -> int:
        n = 0
        for ctx in self.contexts.values():
            for proto in list(ctx.connections):
                n += proto.close_if_idle()
        return n

    def _abort_everything(self) -> int:
        n = 0
        for ctx in self.contexts.values():
            for proto in list(ctx.connections):
                if not proto.idle:
                    log.warning("aborting app connection at grace",
                                extra={"fields": {"listener": ctx.name, "exchange": repr(proto)}})
                    proto.abort()
                    n += 1
            for tunnel in list(ctx.tunnels):
                # Two sockets (the app's and the upstream one, no longer in any pool): each
                # one still open is reset and counted, as for an HTTP request (app + upstream).
                ends = sum(not end.closed for end in (tunnel.app, tunnel.upstream))
                log.warning("aborting tunnel at grace",
                            extra={"fields": {"listener": ctx.name, "sockets": ends}})
                tunnel.abort()
                n += ends
        for cluster in self.clusters.all():
            n += cluster.abort_all("drain")
        self.stats.process.drain_aborted += n
        return n

    def _on_drain_state(self, state: DrainState) -> None:
        self.stats.process.drain_state = int(state)
        for ctx in self.contexts.values():
            ctx.watch_requests = state is not DrainState.SERVING

    def _drain_settings(self, cfg: Config) -> DrainSettings:
        d = cfg.drain
        grace = self._auto_grace if d.grace == "auto" else float(d.grace)
        return DrainSettings(grace, min(d.accept_period, grace), d.linger,
                             d.exit_on_zero_connections)

    async def _resolve_auto_grace(self) -> None:
        """`drain.grace: auto`: until the pod spec is read (bounded), the fallback applies."""
        result = await podinfo.auto_grace()
        self._auto_grace = result.seconds
        if self.config.drain.grace == "auto" and not self.drain.update(
            self._drain_settings(self.config)
        ):
            log.warning("drain.grace: auto resolved after the drain started; keeping the fallback",
                        extra={"fields": {"grace_s": self.drain.settings.grace}})

    # --- start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.wheel = Wheel(self.loop)
        cfg = self.config
        self.drain = Drain(
            self.loop,
            self._drain_settings(cfg),
            self._counts,
            self._close_idle_upstream,
            self._close_idle_downstream,
            self._abort_everything,
            self._on_drain_state,
        )
        self.clusters = ClusterSet(self.loop, self._build_dynamic, self._retire_dynamic,
                                   self._max_destinations(cfg), self.stats.process)
        # Signals are handled from here on (before the first await of the start-up): a pod
        # deleted while the sidecar starts gets a drain and exit 0, not death by SIGTERM.
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.loop.add_signal_handler(sig, self._on_signal)
            except (NotImplementedError, RuntimeError):
                pass
        for c in cfg.clusters:
            self.clusters.static[c.name] = self.build_cluster(c)
        hooks = Hooks(self)
        metrics = self.render_metrics
        self.admin = AdminServer(hooks, metrics)
        self.status = StatusServer(hooks, metrics)
        await self.admin.start(cfg.admin.host, cfg.admin.port)
        await self.status.start(cfg.status.host, cfg.status.port)
        for lc in cfg.listeners:
            self.start_listener(lc)
        self.spawn(watch_loop_lag(self.stats.process.event_loop_lag), "loop-lag")
        self.spawn(self._housekeeping(), "housekeeping")
        if self.config_path:
            self.spawn(self._watch_config(), "config-watch")
        if cfg.drain.grace == "auto":
            self._grace_task = self.spawn(self._resolve_auto_grace(), "grace-auto")
        self.spawn(self._become_ready(), "readiness")
        log.info(
            "sidecar started",
            extra={"fields": {
                "listeners": {n: f"{li.host}:{li.port}" for n, li in self.listeners.items()},
                "admin": f"{cfg.admin.host}:{self.admin.port}",
                "status": f"{cfg.status.host}:{self.status.port}",
                "clusters": [c.name for c in cfg.clusters],
                "config": self.config_path or "<embedded default>",
                "compiled": compiled(),  # the request path built with mypyc (setup.py)
            }},
        )
        for warning in cfgmod.config_warnings(cfg):
            log.warning(warning)

    async def _become_ready(self) -> None:
        """Ready once every static cluster has endpoints and its min_idle prewarmed (bounded),
        and `grace: auto` is resolved (bounded too), so a drain uses the pod's number."""
        if self._grace_task is not None:
            await asyncio.wait({self._grace_task}, timeout=podinfo.READ_TIMEOUT + 1.0)
        clusters = list(self.clusters.static.values())
        await asyncio.gather(*(c.wait_ready(DISCOVERY_WAIT) for c in clusters))
        deadline = self.loop.time() + PREWARM_WAIT
        next_try = 0.0
        while self.loop.time() < deadline and not all(c.prewarmed() for c in clusters):
            if self.drain.state is not DrainState.SERVING:
                return  # stopping before we were ready: no connections to open any more
            if self.loop.time() >= next_try:
                # Again and again: a connect that failed (upstream not listening yet) is not
                # retried by the pool on its own; prewarm() only opens what is missing.
                for c in clusters:
                    c.prewarm()
                next_try = self.loop.time() + PREWARM_RETRY
            await asyncio.sleep(0.05)  # noqa: ASYNC110 (pools have no "prewarmed" event)
        missing = [c.name for c in clusters if not (c.has_answer and c.prewarmed())]
        if missing:
            log.warning("ready without full prewarm", extra={"fields": {"clusters": missing}})
        freeze_heap()
        self.ready = True
        log.info("ready")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for cluster in self.clusters.all():
                if cluster.policies is not None:
                    cluster.policies.tick()
            self.clusters.sweep()

    # --- reload -----------------------------------------------------------------------------------
    def _stamp(self) -> tuple[int, int, int] | None:
        assert self.config_path is not None
        try:
            st = os.stat(os.path.realpath(self.config_path))
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    async def _watch_config(self) -> None:
        """Polls the file (through its symlinks, as Kubernetes swaps a ConfigMap's `..data`)."""
        self._config_stamp = self._stamp()
        while True:
            await asyncio.sleep(1.0)
            stamp = self._stamp()
            if stamp is not None and stamp != self._config_stamp:
                self._config_stamp = stamp
                await self.reload()

    async def reload(self) -> tuple[bool, str]:
        if not self.config_path:
            return False, "running on the embedded default: there is no file to reload"
        try:
            new = cfgmod.load_config(self.config_path)
        except cfgmod.ConfigError as exc:
            self.stats.process.config_reloads["rejected"] += 1
            log.error("config reload rejected; the old config keeps running",
                      extra={"fields": {"errors": exc.format().splitlines()}})
            return False, exc.format()
        try:
            self._apply(new)
        except (OSError, ValueError) as exc:
            self.stats.process.config_reloads["rejected"] += 1
            log.error("config reload could not be applied", extra={"fields": {"error": str(exc)}})
            return False, str(exc)
        self.stats.process.config_reloads["success"] += 1
        freeze_heap()  # let the replaced config's garbage go, freeze the new one
        log.info("config reloaded", extra={"fields": {"file": self.config_path}})
        return True, "applied"

    def _apply(self, new: Config) -> None:
        """Apply a validated config without dropping established connections: changed clusters
        get new pools (old ones finish their requests and close), listeners are re-routed in
        place; new listeners bind, removed ones stop accepting."""
        old = self.config
        for lc in new.listeners:
            prev = old.listener(lc.name)
            if prev is not None and (prev.address != lc.address or prev.protocol != lc.protocol):
                raise ValueError(f"listener {lc.name}: address/protocol changes need a restart")
        old_clusters = {c.name: c for c in old.clusters}
        new_static: dict[str, Cluster] = {}
        built: list[Cluster] = []
        saved_stats = dict(self.discovery_stats)
        try:
            for c in new.clusters:
                existing = self.clusters.static.get(c.name)
                if existing is not None and old_clusters.get(c.name) == c:
                    new_static[c.name] = existing
                else:
                    new_static[c.name] = self.build_cluster(c)
                    built.append(new_static[c.name])
        except BaseException:
            # Nothing of a config that cannot be applied may keep running (discovery, health
            # checks, TLS watches), and the running clusters keep their discovery stats.
            for cluster in built:
                self.retire_cluster(cluster)
            self.discovery_stats.clear()
            self.discovery_stats.update(saved_stats)
            raise
        for name, cluster in self.clusters.static.items():
            if new_static.get(name) is not cluster:
                self.retire_cluster(cluster)
        self.clusters.static = new_static
        self.clusters.max_destinations = self._max_destinations(new)
        self.config = new
        if new.drain != old.drain:
            self.drain.update(self._drain_settings(new))  # ignored once a drain has started
        for name in list(self.listeners):
            if new.listener(name) is None:
                self.listeners.pop(name).stop_accepting()
                self.contexts.pop(name)
        for lc in new.listeners:
            if lc.name not in self.listeners:
                self.start_listener(lc)
        own = self._own_addresses()
        for name, ctx in self.contexts.items():
            found = new.listener(name)
            assert found is not None
            ctx.table = RouteTable.from_config(found, own)
            ctx.access_log = new.access_log
            for cname in self._clusters_of(found):
                self.stats.cluster(cname).expect_listener(name)
        for cluster in new_static.values():
            cluster.prewarm()

    # --- run and stop -----------------------------------------------------------------------------
    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("signal: draining")
            self.drain.start(exit_when_drained=True)
        else:
            log.warning("second signal: aborting now")
            self.drain.abort_now()

    async def run(self) -> int:
        await self.start()
        while True:
            await self.drain.done.wait()
            if self.drain.exit_when_drained:
                break
            # Drained but asked to stay up (POST /drain?exit=false): a signal (or a later drain
            # request that allows exiting) sets `done` again with exit_when_drained on.
            self.drain.done.clear()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        for listener in self.listeners.values():
            listener.stop_accepting()
        linger = linger_seconds(self.drain.settings.linger)
        for cluster in self.clusters.all():
            cluster.close_idle("drain", linger)
        for cluster in self.clusters.all():
            if cluster.policies is not None and cluster.policies.health is not None:
                await cluster.policies.health.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.admin is not None:
            await self.admin.stop()
        if self.status is not None:
            await self.status.stop()
        log.info("stopped")


class Hooks:
    """What the admin and status servers may ask of the running sidecar."""

    def __init__(self, app: App) -> None:
        self.app = app

    def ready(self) -> bool:
        return self.app.ready and self.app.drain.state is DrainState.SERVING

    def drain_status(self) -> dict[str, object]:
        return self.app.drain.status()

    async def start_drain(self, exit: bool) -> None:
        self.app.drain.start(exit_when_drained=exit)

    async def wait_drained(self) -> None:
        while self.app.drain.state is not DrainState.DRAINED:
            await self.app.drain.done.wait()

    async def reload(self) -> tuple[bool, str]:
        return await self.app.reload()

    def clusters(self) -> list[dict[str, object]]:
        return [c.snapshot() for c in self.app.clusters.all()]

    def config(self) -> dict[str, object]:
        return cfgmod.redacted(self.app.config)
