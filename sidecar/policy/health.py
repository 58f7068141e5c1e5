"""Active health checks: one asyncio task per cluster probing every endpoint each interval.

Theory of operation:

* `HealthState` is the pure per-endpoint machine (HEALTHY <-> UNHEALTHY): `unhealthy_threshold`
  consecutive failed checks make a healthy endpoint unhealthy, `healthy_threshold` consecutive
  passing checks bring it back; a result of the other kind resets the streak.
* Endpoints start HEALTHY. Envoy starts new hosts as failing until their first check passes;
  we do not, because our endpoints come from EndpointSlices whose `ready` condition already
  reflects the pod's readiness probe, and starting unhealthy would answer 503
  `no_healthy_endpoints` for up to one interval after every scale-up and at sidecar startup
  (before `/readyz`), which is exactly the start-up pain users report. A bad new endpoint is
  caught after `unhealthy_threshold` checks, and sooner by outlier detection.
* `HealthChecker` owns one scheduling task per cluster (not one per endpoint): every
  `interval` +-10% (jitter, so sidecars of one deployment do not probe in lockstep) it starts a
  check of each endpoint that has none in flight (at most `max_concurrency` probing at once,
  each bounded by `timeout`); each result is applied when it arrives. `timeout` may exceed
  `interval` (as in Envoy): a check still running delays that endpoint's next one to the first
  tick after it ends, so one endpoint never has two checks in flight, and a slow endpoint does
  not hold back the checks of the others. The checks are tasks the checker owns and cancels.
* A check that failed for lack of the sidecar's own resources (EMFILE, ENOBUFS... at socket or
  connect, SPEC section 5) is no verdict on the endpoint: it is neither counted nor applied.
* `http` checks GET `path` through one reused `aiohttp.ClientSession`; 2xx passes, anything
  else (redirects included) fails. `tcp` checks pass when a connection is established.
* Results for an endpoint removed while its probe was in flight are dropped.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import random
import ssl
from collections.abc import Callable, Iterable

import aiohttp

from sidecar.config import HealthCheckConfig
from sidecar.errors import local_shortage

log = logging.getLogger(__name__)


class Health(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


HEALTHY = Health.HEALTHY
UNHEALTHY = Health.UNHEALTHY

TRANSITIONS: dict[Health, frozenset[Health]] = {
    HEALTHY: frozenset({UNHEALTHY}),
    UNHEALTHY: frozenset({HEALTHY}),
}


class HealthState:
    """One endpoint's health from consecutive check results. Pure and synchronous."""

    __slots__ = ("_state", "_streak", "_healthy_threshold", "_unhealthy_threshold")

    def __init__(
        self, healthy_threshold: int = 2, unhealthy_threshold: int = 3, initial: Health = HEALTHY
    ) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("health thresholds must be >= 1")
        self._healthy_threshold = healthy_threshold
        self._unhealthy_threshold = unhealthy_threshold
        self._state = initial
        self._streak = 0  # consecutive results pointing away from the current state

    @property
    def state(self) -> Health:
        return self._state

    @property
    def healthy(self) -> bool:
        return self._state is HEALTHY

    def observe(self, ok: bool) -> bool:
        """Apply one check result; True when the state changed."""
        if ok == (self._state is HEALTHY):
            self._streak = 0  # confirms the current state
            return False
        self._streak += 1
        needed = self._healthy_threshold if ok else self._unhealthy_threshold
        if self._streak < needed:
            return False
        self._transition(HEALTHY if ok else UNHEALTHY)
        return True

    def _transition(self, to: Health) -> None:
        if to not in TRANSITIONS[self._state]:
            raise RuntimeError(f"health: illegal transition {self._state.value} -> {to.value}")
        self._state = to
        self._streak = 0

    def __repr__(self) -> str:
        return f"<HealthState {self._state.value} streak={self._streak}>"


async def tcp_check(ip: str, port: int) -> bool | None:
    """True when a TCP connection to ip:port is established; None when the sidecar itself
    lacked the resources to try (no verdict). Bound it with `asyncio.timeout`."""
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_connection(asyncio.Protocol, ip, port)
    except OSError as exc:
        return None if local_shortage(exc) else False
    transport.close()
    return True


async def http_check(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> bool | None:
    """True when GET `url` answers 2xx; None when the sidecar itself lacked the resources to
    try (no verdict). Bound it with `asyncio.timeout`."""
    try:
        async with session.get(
            url,
            headers=headers,
            allow_redirects=False,
            ssl=ssl_context if ssl_context is not None else True,
            server_hostname=server_hostname,
        ) as resp:
            return 200 <= resp.status < 300
    except (OSError, aiohttp.ClientError) as exc:
        return None if local_shortage(exc) else False


class _Target:
    __slots__ = ("ip", "port", "state", "url", "checking")

    def __init__(self, ip: str, port: int, state: HealthState, url: str) -> None:
        self.ip = ip
        self.port = port
        self.state = state
        self.url = url
        self.checking = False  # a check is in flight: the next one waits for it


class HealthChecker:
    """Active checks of one cluster's endpoints: `start()` once, `await stop()` at the end."""

    def __init__(
        self,
        cluster_name: str,
        check_type: str = "http",
        *,
        path: str = "/healthz",
        interval: float = 5.0,
        timeout: float = 1.0,
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 3,
        on_change: Callable[[str, bool], None] | None = None,
        stats: dict[str, int] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_concurrency: int = 64,
    ) -> None:
        if check_type not in ("http", "tcp"):
            raise ValueError(f"health check type must be 'http' or 'tcp', not {check_type!r}")
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        self.cluster_name = cluster_name
        self.check_type = check_type
        self.path = path if path.startswith("/") else "/" + path
        self.interval = interval
        self.timeout = timeout
        self._healthy_threshold = healthy_threshold
        self._unhealthy_threshold = unhealthy_threshold
        self._on_change = on_change
        # The cluster's `health_checks` counters ({"success": n, "failure": n}).
        self._stats = stats if stats is not None else {"success": 0, "failure": 0}
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._headers = {"User-Agent": "sidecar-health-check"}
        if server_hostname is not None:
            self._headers["Host"] = server_hostname
        self._targets: dict[str, _Target] = {}
        self._sem = asyncio.Semaphore(max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()  # checks in flight, started by _run
        HealthState(healthy_threshold, unhealthy_threshold)  # validate thresholds now

    @classmethod
    def from_config(
        cls,
        cluster_name: str,
        cfg: HealthCheckConfig,
        *,
        on_change: Callable[[str, bool], None] | None = None,
        stats: dict[str, int] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> HealthChecker:
        """From a cluster's `health_check` section (type http or tcp)."""
        return cls(
            cluster_name,
            cfg.type,
            path=cfg.path,
            interval=cfg.interval,
            timeout=cfg.timeout,
            healthy_threshold=cfg.healthy_threshold,
            unhealthy_threshold=cfg.unhealthy_threshold,
            on_change=on_change,
            stats=stats,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
        )

    # --- endpoints (synchronous, from the cluster) ---------------------------------------------
    def set_endpoints(self, endpoints: Iterable[tuple[str, str, int]]) -> None:
        """The endpoints to check, as (key, ip, port). Known keys keep their state."""
        new: dict[str, _Target] = {}
        for key, ip, port in endpoints:
            old = self._targets.get(key)
            if old is not None and old.ip == ip and old.port == port:
                new[key] = old
            else:
                state = HealthState(self._healthy_threshold, self._unhealthy_threshold)
                new[key] = _Target(ip, port, state, self._url(ip, port))
        self._targets = new

    def add_target(self, key: str, ip: str, port: int) -> None:
        """One endpoint joined, or changed conditions (a known address keeps its state)."""
        old = self._targets.get(key)
        if old is None or old.ip != ip or old.port != port:
            state = HealthState(self._healthy_threshold, self._unhealthy_threshold)
            self._targets[key] = _Target(ip, port, state, self._url(ip, port))

    def remove_target(self, key: str) -> None:
        self._targets.pop(key, None)

    def is_healthy(self, key: str) -> bool:
        """False only for an endpoint the checks found unhealthy; unknown keys are healthy."""
        target = self._targets.get(key)
        return target is None or target.state.healthy

    def _url(self, ip: str, port: int) -> str:
        host = f"[{ip}]" if ":" in ip else ip
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{host}:{port}{self.path}"

    # --- the task ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the cluster's check loop; call from the running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"health-check:{self.cluster_name}"
            )

    async def stop(self) -> None:
        """Cancel the loop, wait for it, close the session. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() instead of `await task`: our own caller's cancellation must still propagate.
            await asyncio.wait([task])
        checks, self._checks = self._checks, set()
        for check in checks:
            check.cancel()
        if checks:
            await asyncio.wait(checks)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            self._start_checks()
            await asyncio.sleep(self.interval * random.uniform(0.9, 1.1))

    def _start_checks(self) -> list[asyncio.Task[None]]:
        """A check, as a task we own, of every endpoint that has none in flight."""
        loop = asyncio.get_running_loop()
        started = []
        for key, target in list(self._targets.items()):
            if target.checking:
                continue  # still running: this endpoint's next check waits for it
            target.checking = True  # now, not when the task first runs
            check = loop.create_task(self._check(key, target))
            self._checks.add(check)
            # A callback, not a `finally` in _check: it runs even for a task cancelled before
            # it started.
            check.add_done_callback(functools.partial(self._check_done, target))
            started.append(check)
        return started

    def _check_done(self, target: _Target, task: asyncio.Task[None]) -> None:
        target.checking = False
        self._checks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The loop must outlive any bug in one check.
            log.error("health check failed unexpectedly", exc_info=task.exception(),
                      extra={"cluster": self.cluster_name})

    async def check_once(self) -> None:
        """Probe every endpoint that has no check in flight now, concurrently, and wait for
        the results to be applied."""
        checks = self._start_checks()
        if checks:
            # wait() rather than gather(): cancelling us leaves the checks to stop().
            await asyncio.wait(checks)

    async def _check(self, key: str, target: _Target) -> None:
        """One check of `target`; `_check_done` clears its `checking`."""
        async with self._sem:
            try:
                async with asyncio.timeout(self.timeout):
                    ok = await self._probe(target)
            except TimeoutError:
                ok = False
        if ok is None:
            return  # the sidecar's own shortage: no verdict on the endpoint
        if self._targets.get(key) is not target:
            return  # removed (or replaced) while the probe was in flight
        self._stats["success" if ok else "failure"] += 1
        if target.state.observe(ok):
            healthy = target.state.healthy
            log.warning(
                "endpoint %s", "healthy" if healthy else "unhealthy",
                extra={"cluster": self.cluster_name, "endpoint": key},
            )
            if self._on_change is not None:
                self._on_change(key, healthy)

    async def _probe(self, target: _Target) -> bool | None:
        if self.check_type == "tcp":
            return await tcp_check(target.ip, target.port)
        if self._session is None:
            # Created lazily inside the loop; one session (and connection pool) per checker.
            self._session = aiohttp.ClientSession(
                trust_env=False,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return await http_check(
            self._session,
            target.url,
            headers=self._headers,
            ssl_context=self._ssl,
            # SNI and certificate name; meaningless without TLS.
            server_hostname=self._server_hostname if self._ssl is not None else None,
        )

    def __repr__(self) -> str:
        unhealthy = sum(1 for t in self._targets.values() if not t.state.healthy)
        return (f"<HealthChecker {self.cluster_name} {self.check_type} "
                f"[Endpoints: {len(self._targets)}, {unhealthy} unhealthy]>")
