"""The admin (SPEC section 7) and status HTTP servers; they reach the data path only via hooks."""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

# Renders the scrape body and its content type, at once or awaited; `app.py` passes
# `observe.metrics.Scraper.render` (which renders off the loop), so prometheus-client stays in
# `observe/metrics.py` and this module never imports it.
MetricsRenderer = Callable[[], tuple[bytes, str] | Awaitable[tuple[bytes, str]]]

# Long enough for a `POST /drain?wait=true` answer that is being written as the process stops;
# short enough that stopping never holds the pod's grace period hostage.
SHUTDOWN_TIMEOUT = 1.0

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ReadinessHooks(Protocol):
    """What the status port needs: readiness and, to say why not ready, the drain state."""

    def ready(self) -> bool:
        """True when serving and ready (listeners bound, pools prewarmed, not draining)."""
        ...

    def drain_status(self) -> dict[str, object]:
        """{"state": "serving"|"draining"|"drained", "inflight", "connections", "elapsed"}."""
        ...


class AdminHooks(ReadinessHooks, Protocol):
    """Everything the admin port may ask of the process; `app.py` implements it."""

    async def start_drain(self, exit: bool) -> None:
        """Start a drain (idempotent); with `exit` False the process stays up once drained."""
        ...

    async def wait_drained(self) -> None:
        """Return once the drain reached `drained`."""
        ...

    async def reload(self) -> tuple[bool, str]:
        """Re-read the config file now: (applied, message)."""
        ...

    def clusters(self) -> list[dict[str, object]]:
        """The items of `GET /clusters` (SPEC section 7)."""
        ...

    def config(self) -> dict[str, object]:
        """The effective config, secrets already redacted."""
        ...


def _flag(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise web.HTTPBadRequest(text=f"{name} must be true or false, not {raw!r}\n")


def require_loopback(host: str) -> None:
    """Raise ValueError unless `host` is a loopback address (SPEC section 3: always, for admin)."""
    if host == "localhost":
        return
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"admin address must be a loopback IP, not {host!r}") from None
    if not ip.is_loopback:
        raise ValueError(f"admin address must be loopback, not {host!r}")


class _HttpServer:
    """One aiohttp app on one port: the shared start/stop and the three probe routes."""

    def __init__(self, hooks: ReadinessHooks, metrics: MetricsRenderer) -> None:
        self._probe_hooks = hooks
        self._metrics = metrics
        self._runner: web.AppRunner | None = None

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            web.get("/metrics", self._render_metrics),
        ]

    async def start(self, host: str, port: int) -> None:
        """Bind and serve. Port 0 picks a free port; read it back from `port`."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        app = web.Application()
        app.add_routes(self._routes())
        # access_log=None: these are probe and scrape hits every few seconds, not app traffic.
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            # reuse_address: a restarted sidecar rebinds while the old sockets sit in TIME_WAIT.
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    @property
    def port(self) -> int:
        """The bound port (useful after `start(host, 0)`)."""
        if self._runner is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        address = self._runner.addresses[0]
        port: int = address[1]
        return port

    async def stop(self) -> None:
        """Close the listening socket and the connections; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def __repr__(self) -> str:
        where = f"port {self.port}" if self._runner is not None else "stopped"
        return f"<{type(self).__name__} [{where}]>"

    async def _healthz(self, request: web.Request) -> web.Response:
        # Answering at all is the proof: this handler runs on the event loop it vouches for.
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._probe_hooks.ready():
            return web.json_response({"ready": True})
        state = self._probe_hooks.drain_status().get("state", "serving")
        # Not ready while serving means start-up is not finished (listeners, prewarmed pools).
        reason = "starting" if state == "serving" else "draining"
        return web.json_response({"ready": False, "reason": reason, "state": state}, status=503)

    async def _render_metrics(self, request: web.Request) -> web.Response:
        # The numbers are read on the loop thread (the data path mutates the stats dicts on
        # this thread only, so a scrape never sees one half-updated or mid-resize); the app's
        # renderer formats a copy of them in a thread (observe.metrics.Scraper).
        rendered = self._metrics()
        if inspect.isawaitable(rendered):
            rendered = await rendered
        body, content_type = rendered
        return web.Response(body=body, headers={"Content-Type": content_type})


class StatusServer(_HttpServer):
    """The status port (default 0.0.0.0:15020) for kubelet and Prometheus: only /healthz,
    /readyz and /metrics, because it may be reachable from outside the pod."""


class AdminServer(_HttpServer):
    """The admin port (127.0.0.1:15000): SPEC section 7 in full. Loopback only, always."""

    def __init__(self, hooks: AdminHooks, metrics: MetricsRenderer) -> None:
        super().__init__(hooks, metrics)
        self._hooks = hooks

    async def start(self, host: str, port: int) -> None:
        require_loopback(host)
        await super().start(host, port)

    def _routes(self) -> list[web.RouteDef]:
        return [
            *super()._routes(),
            web.get("/drain", self._drain_status),
            web.post("/drain", self._drain),
            web.get("/clusters", self._clusters),
            web.get("/config", self._config),
            web.post("/reload", self._reload),
        ]

    async def _drain_status(self, request: web.Request) -> web.Response:
        return web.json_response(self._hooks.drain_status())

    async def _drain(self, request: web.Request) -> web.Response:
        # Both flags are validated before anything starts: a typo must not half-start a drain.
        wait = _flag(request, "wait", default=False)
        exit_when_drained = _flag(request, "exit", default=True)
        await self._hooks.start_drain(exit_when_drained)
        if wait:
            # Unbounded here on purpose: the caller (`sidecar drain --timeout`) owns the deadline
            # and the drain itself ends at `drain.grace`.
            await self._hooks.wait_drained()
        return web.json_response(self._hooks.drain_status())

    async def _clusters(self, request: web.Request) -> web.Response:
        return web.json_response({"clusters": self._hooks.clusters()})

    async def _config(self, request: web.Request) -> web.Response:
        return web.json_response(self._hooks.config())

    async def _reload(self, request: web.Request) -> web.Response:
        applied, message = await self._hooks.reload()
        return web.json_response(
            {"applied": applied, "message": message}, status=200 if applied else 400
        )
