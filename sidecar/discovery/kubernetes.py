"""`discovery: {type: kubernetes, ...}`: list + watch of a Service's EndpointSlices, as Resets."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from sidecar.discovery.dns import backoff_delays, sort_key
from sidecar.discovery.endpoints import Delta, DoesNotExist, Emit, Endpoint, Reset
from sidecar.discovery.stats import DiscoveryStats

# Theory of operation (the reflector pattern of client-go, kept small):
#
# - list the Service's EndpointSlices (label `kubernetes.io/service-name=<service>`), remember the
#   list's resourceVersion, publish the merged set;
# - watch from that resourceVersion with bookmarks and a server-side `timeoutSeconds`, so streams
#   are recycled; apply ADDED/MODIFIED/DELETED per slice name, publish after each change, and
#   remember every event's (and bookmark's) resourceVersion;
# - a stream that ends or breaks is watched again from the last resourceVersion; a 410 Expired
#   (sent in-stream, raised by kubernetes-asyncio as ApiException(410)) means that version is gone:
#   list again;
# - any other failure (401/403, API server down, timeouts) keeps the last endpoints: nothing is
#   emitted, the error is logged and counted, and the next attempt waits a jittered backoff.
#
# Publishing is deduplicated: an event that changes nothing our cluster can see (another port, a
# label, a bookmark) emits nothing. No slice at all means the Service does not exist (yet): that is
# `DoesNotExist`; a Service without endpoints still has a slice, and gives an empty `Reset`.
#
# kubernetes_asyncio is imported here and nowhere else in the sidecar (and aiohttp only for the
# exception types the client lets through).

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_PATH = f"{SERVICE_ACCOUNT_DIR}/token"
CA_PATH = f"{SERVICE_ACCOUNT_DIR}/ca.crt"
NAMESPACE_PATH = f"{SERVICE_ACCOUNT_DIR}/namespace"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# Builds a kubernetes_asyncio `ApiClient`; whoever calls it owns the client and closes it.
ApiFactory = Callable[[], Awaitable[Any]]

# client-go re-reads a service-account token file at least this often.
_TOKEN_REREAD_SECONDS = 60.0


def pod_namespace(
    environ: Mapping[str, str] | None = None, namespace_path: str = NAMESPACE_PATH
) -> str:
    """The pod's own namespace: `POD_NAMESPACE` (downward API), else the service account's
    namespace file, else "default"."""
    env = os.environ if environ is None else environ
    if env.get("POD_NAMESPACE"):
        return env["POD_NAMESPACE"]
    try:
        namespace = Path(namespace_path).read_text().strip()
    except OSError:
        namespace = ""
    return namespace or "default"


class _TokenFile:
    """`Configuration.refresh_api_key_hook`: the bearer token, re-read when its file changes.

    kubernetes-asyncio's own in-cluster hook re-reads the token only once a minute (its
    TOKEN_REFRESH_PERIOD). The kubelet rotates a projected token by swapping the volume's `..data`
    symlink, so one stat per request (no read) notices the new file at once and we switch before
    the old token is revoked; the periodic re-read stays as a backstop."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._read_at = float("-inf")

    def __call__(self, configuration: Any) -> None:
        try:
            st = os.stat(self._path)  # follows the ..data symlink
        except OSError:
            return  # keep the token we have; a 401 will say if it is no good
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        now = time.monotonic()
        if stamp == self._stamp and now - self._read_at < _TOKEN_REREAD_SECONDS:
            return
        try:
            token = Path(self._path).read_text().strip()
        except OSError:
            return
        if token:
            configuration.api_key["BearerToken"] = f"Bearer {token}"
            self._stamp, self._read_at = stamp, now


def in_cluster(
    *,
    token_path: str = TOKEN_PATH,
    ca_path: str = CA_PATH,
    environ: Mapping[str, str] | None = None,
) -> ApiFactory:
    """Clients for the in-cluster API server: `KUBERNETES_SERVICE_HOST`/`_PORT`, the
    service-account token (re-read when it rotates) and CA. Paths are overridable for tests."""

    async def build() -> Any:
        configuration = client.Configuration()
        config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration,
            try_refresh_token=False,  # its once-a-minute hook; ours below replaces it
            token_filename=token_path,
            cert_filename=ca_path,
            environ=dict(os.environ if environ is None else environ),
        )
        configuration.refresh_api_key_hook = _TokenFile(token_path)
        return client.ApiClient(configuration)

    return build


def kubeconfig(path: str | None = None, *, context: str | None = None) -> ApiFactory:
    """Clients from a kubeconfig: `path`, else `KUBECONFIG` (a ':'-separated list is merged),
    else ~/.kube/config; read when a client is built, so a fixed file is picked up on retry."""

    async def build() -> Any:
        files = path or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        configuration = client.Configuration()
        await config.load_kube_config(
            config_file=files,
            context=context,
            client_configuration=configuration,
            persist_config=False,  # never write back to the user's kubeconfig
        )
        return client.ApiClient(configuration)

    return build


def default_api(
    *,
    environ: Mapping[str, str] | None = None,
    token_path: str = TOKEN_PATH,
    ca_path: str = CA_PATH,
) -> ApiFactory:
    """In-cluster credentials when running in a pod (`KUBERNETES_SERVICE_HOST` set), else the
    kubeconfig (SPEC section 4)."""
    env = os.environ if environ is None else environ
    if env.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(token_path=token_path, ca_path=ca_path, environ=environ)
    return kubeconfig()


class _BadResponse(Exception):
    """The API server's answer is not what the protocol promises."""


class KubernetesResolver:
    """Endpoints of one Service port from its EndpointSlices, as deduplicated `Reset`s.

    `port` is a port name (the Service's `ports[].name`, resolved per slice, so slices with
    different target ports for one name are each right) or a number. A number is matched against
    the slices' port numbers, which are target ports; when a slice has a single TCP port and the
    number is not it, the number is taken to be the Service port and that single port is used.

    `api` builds API clients (see `in_cluster`, `kubeconfig`, `default_api`, the default); a new
    client is built after credential and connection errors, so a rotated token, CA or kubeconfig
    is picked up.
    """

    def __init__(
        self,
        service: str,
        namespace: str | None,
        port: int | str,
        *,
        api: ApiFactory | None = None,
        stats: DiscoveryStats | None = None,
        watch_timeout: float = 300.0,
        request_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.service = service
        self.namespace = namespace or pod_namespace()
        self.port: int | str = int(port) if isinstance(port, str) and port.isdigit() else port
        self.stats = stats if stats is not None else DiscoveryStats()
        self._api = api if api is not None else default_api()
        self._selector = f"{SERVICE_NAME_LABEL}={service}"
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._backoff = (backoff_initial, backoff_max)

        self._client: Any = None
        self._resource_version: str | None = None  # None: the next step is a list
        self._slices: dict[str, tuple[Endpoint, ...]] = {}  # slice name -> endpoints for our port
        self._published: Delta | None = None
        self._lists = 0
        self._warned: set[tuple[str, str]] = set()  # (slice, problem) already logged

    async def run(self, emit: Emit) -> None:
        delays = backoff_delays(*self._backoff)
        expired_in_a_row = 0
        watched_since_list = False
        try:
            while True:
                try:
                    if self._client is None:
                        self._client = await self._build_client()
                    api = client.DiscoveryV1Api(self._client)
                    if self._resource_version is None:
                        await self._list(api, emit)
                        watched_since_list = False
                        delays = backoff_delays(*self._backoff)
                    if watched_since_list:
                        self.stats.watch_restarts += 1
                    watched_since_list = True
                    await self._watch(api, emit)
                    delays = backoff_delays(*self._backoff)
                    expired_in_a_row = 0
                    continue  # the stream ended at its timeout: watch again from where it was
                except _ConfigError as exc:
                    self._failed("config", exc.__cause__ or exc)
                except ApiException as exc:
                    if exc.status == 410:
                        # The version we hold is compacted away: only a fresh list can resync.
                        # Relist at once; only a 410 straight after a relist waits first.
                        self._resource_version = None
                        expired_in_a_row += 1
                        log.info("k8s_watch_expired", extra=self._where())
                        if expired_in_a_row == 1:
                            continue
                    else:
                        kind = {401: "unauthorized", 403: "forbidden"}.get(exc.status, "api")
                        self._failed(kind, exc)
                        if exc.status == 401:
                            # The token may have rotated or expired: a new client reads it again
                            # (kubeconfig credential plugins included).
                            await self._close_client()
                except TimeoutError as exc:  # before OSError: TimeoutError is one
                    self._failed("timeout", exc)
                    await self._close_client()
                except (OSError, aiohttp.ClientError) as exc:
                    # Unreachable, reset, TLS failure. A new client after the backoff also reads
                    # a rotated CA or kubeconfig.
                    self._failed("connection", exc)
                    await self._close_client()
                except (_BadResponse, ValueError) as exc:
                    self._failed("bad_response", exc)
                except Exception as exc:
                    # Never out of run(): a bug must not end discovery for the cluster.
                    self.stats.error("unexpected")
                    log.exception("k8s_discovery_unexpected", extra=self._where(error=repr(exc)))
                await asyncio.sleep(next(delays))
        finally:
            await self._close_client()

    # -- one list, one watch -------------------------------------------------------------------

    async def _list(self, api: Any, emit: Emit) -> None:
        result = await api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=self._selector,
            _request_timeout=(self._connect_timeout, self._request_timeout),
        )
        version = result.metadata.resource_version if result.metadata else None
        if not version:
            raise _BadResponse("EndpointSliceList without metadata.resourceVersion")
        self._slices = {
            sl.metadata.name: self._endpoints_of(sl) for sl in result.items or () if sl.metadata
        }
        self._resource_version = version
        self._lists += 1
        if self._lists > 1:
            self.stats.relists += 1
        self._succeeded()
        self._publish(emit)

    async def _watch(self, api: Any, emit: Emit) -> None:
        """One watch stream, until the server ends it at `timeoutSeconds`."""
        # Randomised like client-go's [min, 2*min), so a fleet of sidecars started together does
        # not reconnect in waves. The socket read deadline covers a stream that silently died.
        timeout_seconds = max(1, int(self._watch_timeout * random.uniform(1.0, 2.0)))
        loop = asyncio.get_running_loop()
        started, events_seen = loop.time(), 0
        async with watch.Watch() as stream:
            events = stream.stream(
                api.list_namespaced_endpoint_slice,
                self.namespace,
                label_selector=self._selector,
                resource_version=self._resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds,
                _request_timeout=(self._connect_timeout, timeout_seconds + self._request_timeout),
            )
            # A healthy API server sends a watch's headers at once; only its body may idle for
            # the whole stream. aiohttp's read deadline covers both, so open the stream here with
            # the short request deadline: a hung server is a timeout now, not minutes from now.
            # (Watch.next() uses a response already in `resp` and releases it on close.)
            untyped: Any = stream  # its annotations say `func` returns and `resp` holds None
            untyped.resp = await asyncio.wait_for(untyped.func(), self._request_timeout)
            async for event in events:
                self._on_event(event, emit)
                events_seen += 1
        if events_seen == 0 and loop.time() - started < 1.0:
            # An empty stream that ends at once is no timeout (client-go's "very short watch"):
            # something in between is cutting it. Back off instead of spinning.
            raise _BadResponse("watch stream ended at once without events")
        self._succeeded()  # a clean end at timeoutSeconds: our view was current until now

    def _on_event(self, event: Any, emit: Emit) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("raw_object"), dict):
            raise _BadResponse(f"not a watch event: {str(event)[:200]!r}")
        kind = event.get("type")
        metadata = event["raw_object"].get("metadata") or {}
        version = metadata.get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            obj = event["object"]
            self._slices[obj.metadata.name] = self._endpoints_of(obj)
        elif kind == "DELETED":
            self._slices.pop(metadata.get("name", ""), None)
        elif kind != "BOOKMARK":
            raise _BadResponse(f"unknown watch event type {kind!r}")
        if version:
            self._resource_version = version
        self._succeeded()
        self._publish(emit)

    # -- slices -> endpoints -------------------------------------------------------------------

    def _endpoints_of(self, sl: Any) -> tuple[Endpoint, ...]:
        name = sl.metadata.name if sl.metadata else "?"
        if sl.address_type not in ("IPv4", "IPv6"):
            return ()  # FQDN slices name hosts, not addresses: not ours to resolve here
        port = self._port_of(sl, name)
        if port is None:
            return ()
        out: list[Endpoint] = []
        for ep in sl.endpoints or ():
            if not ep.addresses:
                continue
            # Only the first address counts: the API defines no meaning for the others and
            # kube-proxy ignores them.
            ip = ep.addresses[0]
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                self._warn_once(name, f"bad address {ip!r}")
                continue
            out.append(
                Endpoint(ip, port, *_conditions(ep.conditions), _hostname(ep), ep.zone or None)
            )
        return tuple(out)

    def _port_of(self, sl: Any, name: str) -> int | None:
        ports = [p for p in sl.ports or () if (p.protocol or "TCP") == "TCP"]
        if isinstance(self.port, str):
            for p in ports:
                if p.name == self.port and p.port is not None:
                    return int(p.port)
            self._warn_once(name, f"no TCP port named {self.port!r}")
            return None
        if not sl.ports or any(p.port is None or p.port == self.port for p in ports):
            return self.port  # no ports defined, a nil port ("all ports"), or an exact match
        if len(ports) == 1:
            return int(ports[0].port)  # the number was the Service port; its only target port
        self._warn_once(name, f"no TCP port {self.port} among {[p.port for p in ports]}")
        return None

    def _warn_once(self, slice_name: str, problem: str) -> None:
        if (slice_name, problem) not in self._warned:
            self._warned.add((slice_name, problem))
            log.warning("k8s_slice_skipped", extra=self._where(slice=slice_name, problem=problem))

    def _publish(self, emit: Emit) -> None:
        delta: Delta
        if not self._slices:
            delta = DoesNotExist()
        else:
            merged: dict[str, Endpoint] = {}
            for endpoints in self._slices.values():
                for ep in endpoints:
                    # An address can sit in two slices for a moment while the controller moves
                    # it; keep its best view rather than whichever slice came last.
                    seen = merged.get(ep.key)
                    if seen is None or _rank(ep) > _rank(seen):
                        merged[ep.key] = ep
            delta = Reset(
                tuple(sorted(merged.values(), key=lambda ep: (*sort_key(ep.ip), ep.port)))
            )
        if delta == self._published:
            return
        emit(delta)
        self._published = delta  # after emit: if it raised, the next change publishes again
        self.stats.updates += 1
        log.info(
            "k8s_endpoints",
            extra=self._where(
                endpoints=[ep.key for ep in delta.endpoints] if isinstance(delta, Reset) else None
            ),
        )

    # -- errors and clients --------------------------------------------------------------------

    async def _build_client(self) -> Any:
        try:
            return await self._api()
        except Exception as exc:
            raise _ConfigError() from exc

    async def _close_client(self) -> None:
        api_client, self._client = self._client, None
        if api_client is not None:
            await api_client.close()

    def _failed(self, kind: str, exc: BaseException) -> None:
        self.stats.error(kind)
        log.warning(
            "k8s_discovery_failed",
            extra=self._where(kind=kind, error=_describe(exc), kept=self._kept()),
        )

    def _kept(self) -> int:
        return len(self._published.endpoints) if isinstance(self._published, Reset) else 0

    def _succeeded(self) -> None:
        self.stats.last_success = time.time()

    def _where(self, **fields: Any) -> dict[str, Any]:
        return {"service": self.service, "namespace": self.namespace, **fields}


class _ConfigError(Exception):
    """Building a client failed (no credentials, unreadable kubeconfig); the cause says why."""


def _conditions(conditions: Any) -> tuple[bool, bool]:
    """(ready, terminating) of our `Endpoint` from EndpointSlice conditions.

    The API: `ready` nil means true; `serving` nil means true; `terminating` nil means false.
    `ready` is false for a terminating endpoint (unless publishNotReadyAddresses), so for one we
    report `serving` instead: "terminating but still able to finish work", which the cluster
    uses to let in-flight requests finish (no new ones go to a terminating endpoint anyway)."""
    if conditions is None:
        return True, False
    if conditions.terminating is True:
        return conditions.serving is not False, True
    return conditions.ready is not False, False


def _hostname(ep: Any) -> str | None:
    ref = ep.target_ref
    if ref is not None and ref.kind == "Pod" and ref.name:
        return str(ref.name)
    return str(ep.hostname) if ep.hostname else None


def _rank(ep: Endpoint) -> tuple[bool, bool, bool]:
    return ep.serving, ep.ready, not ep.terminating


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return str(exc) or type(exc).__name__


async def termination_grace_period(
    pod: str,
    namespace: str | None = None,
    *,
    api: ApiFactory | None = None,
    request_timeout: float = 5.0,
) -> int | None:
    """The pod's `spec.terminationGracePeriodSeconds`, for `drain.grace: auto`; None when it
    cannot be read (the caller falls back to its default). Needs `get` on pods in the Role."""
    namespace = namespace or pod_namespace()
    api_client: Any = None
    try:
        api_client = await (api if api is not None else default_api())()
        found = await client.CoreV1Api(api_client).read_namespaced_pod(
            pod, namespace, _request_timeout=(request_timeout, request_timeout)
        )
        spec: Any = found.spec  # typed as always present; an API answer may still omit it
        seconds = spec.termination_grace_period_seconds if spec is not None else None
        return int(seconds) if seconds is not None else None
    except Exception as exc:
        log.warning(
            "k8s_pod_read_failed",
            extra={"pod": pod, "namespace": namespace, "error": _describe(exc)},
        )
        return None
    finally:
        if api_client is not None:
            await api_client.close()
