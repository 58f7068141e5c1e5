"""`discovery: {type: kubernetes, ...}`: list + watch of a Service's EndpointSlices, as deltas."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from sidecar.discovery.dns import backoff_delays, sort_key
from sidecar.discovery.endpoints import Add, Delta, DoesNotExist, Emit, Endpoint, Remove, Reset
from sidecar.discovery.kubeapi import (
    ApiError,
    ApiFactory,
    BadResponse,
    KubeApi,
    in_cluster_target,
    kubeconfig_target,
)
from sidecar.discovery.stats import DiscoveryStats

# Theory of operation (the reflector pattern of client-go, kept small):
#
# - list the Service's EndpointSlices (label `kubernetes.io/service-name=<service>`), remember the
#   list's resourceVersion, publish the merged set as a `Reset`;
# - watch from that resourceVersion with bookmarks and a server-side `timeoutSeconds`, so streams
#   are recycled; apply ADDED/MODIFIED/DELETED per slice name and publish what that one slice
#   changed as `Remove`/`Add` deltas; a bookmark only records its resourceVersion;
# - a stream that ends or breaks is watched again from the last resourceVersion; a 410 Expired
#   (sent in-stream) means that version is gone: list again;
# - any other failure (401/403, API server down, timeouts) keeps the last endpoints: nothing is
#   emitted, the error is logged and counted, and the next attempt waits a jittered backoff.
#
# An event costs what it changed, not the whole Service: the resolver keeps each slice's
# endpoints and, per address, the slices that hold it, so a slice event touches only that slice's
# addresses. (At 1,000 endpoints the old way, re-merging and sorting every slice per event, cost
# about 8 ms of loop time per event, and building client models about 6 ms more.)
#
# Publishing is deduplicated: an event that changes nothing our cluster can see (another port, a
# label) emits nothing. No slice at all means the Service does not exist (yet): that is
# `DoesNotExist`; a Service without endpoints still has a slice, and gives an empty `Reset`.
#
# Slices are read as JSON (see `kubeapi.py` for why not kubernetes-asyncio's models).

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_PATH = f"{SERVICE_ACCOUNT_DIR}/token"
CA_PATH = f"{SERVICE_ACCOUNT_DIR}/ca.crt"
NAMESPACE_PATH = f"{SERVICE_ACCOUNT_DIR}/namespace"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

__all__ = ["ApiFactory", "KubernetesResolver", "default_api", "in_cluster", "kubeconfig"]


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


def in_cluster(
    *,
    token_path: str = TOKEN_PATH,
    ca_path: str = CA_PATH,
    environ: Mapping[str, str] | None = None,
) -> ApiFactory:
    """Clients for the in-cluster API server: `KUBERNETES_SERVICE_HOST`/`_PORT`, the
    service-account token (re-read when it rotates) and CA. Paths are overridable for tests."""

    async def build() -> KubeApi:
        env = dict(os.environ if environ is None else environ)
        return KubeApi(in_cluster_target(env, token_path, ca_path))

    return build


def kubeconfig(path: str | None = None, *, context: str | None = None) -> ApiFactory:
    """Clients from a kubeconfig: `path`, else `KUBECONFIG` (a ':'-separated list is merged),
    else ~/.kube/config; read when a client is built, so a fixed file is picked up on retry."""

    async def build() -> KubeApi:
        files = path or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        return KubeApi(await kubeconfig_target(files, context))

    return build


def default_api(
    *,
    environ: Mapping[str, str] | None = None,
    token_path: str | None = None,
    ca_path: str | None = None,
) -> ApiFactory:
    """In-cluster credentials when running in a pod (`KUBERNETES_SERVICE_HOST` set), else the
    kubeconfig (SPEC section 4). The service account's files are read from
    `SIDECAR_SERVICEACCOUNT_DIR` when set (a non-standard mount; the discovery benchmark),
    else from the standard mount."""
    env = os.environ if environ is None else environ
    if env.get("KUBERNETES_SERVICE_HOST"):
        directory = env.get("SIDECAR_SERVICEACCOUNT_DIR") or SERVICE_ACCOUNT_DIR
        return in_cluster(
            token_path=token_path or f"{directory}/token",
            ca_path=ca_path or f"{directory}/ca.crt",
            environ=environ,
        )
    return kubeconfig()


class KubernetesResolver:
    """Endpoints of one Service port from its EndpointSlices, as deduplicated deltas.

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
        self._path = (
            f"/apis/discovery.k8s.io/v1/namespaces/{quote(self.namespace, safe='')}"
            "/endpointslices"
        )
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._backoff = (backoff_initial, backoff_max)

        self._client: KubeApi | None = None
        self._resource_version: str | None = None  # None: the next step is a list
        # slice name -> {endpoint key -> endpoint} for our port
        self._slices: dict[str, dict[str, Endpoint]] = {}
        # endpoint key -> the slices that hold it (usually one; two while it moves)
        self._holders: dict[str, set[str]] = {}
        # What the cluster has been told: None before the first answer; {} after DoesNotExist
        # or an empty Reset (`_exists` tells which).
        self._published: dict[str, Endpoint] | None = None
        self._exists = False
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
                    api = self._client
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
                except ApiError as exc:
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
                except (BadResponse, ValueError, KeyError, TypeError) as exc:
                    self._failed("bad_response", exc)
                except Exception as exc:
                    # Never out of run(): a bug must not end discovery for the cluster.
                    self.stats.error("unexpected")
                    log.exception("k8s_discovery_unexpected", extra=self._where(error=repr(exc)))
                await asyncio.sleep(next(delays))
        finally:
            await self._close_client()

    # -- one list, one watch -------------------------------------------------------------------

    async def _list(self, api: KubeApi, emit: Emit) -> None:
        result = await api.get_json(
            self._path,
            {"labelSelector": self._selector},
            connect_timeout=self._connect_timeout,
            total=self._request_timeout,
        )
        version = (result.get("metadata") or {}).get("resourceVersion")
        if not version:
            raise BadResponse("EndpointSliceList without metadata.resourceVersion")
        slices: dict[str, dict[str, Endpoint]] = {}
        for item in result.get("items") or ():
            name = (item.get("metadata") or {}).get("name")
            if name:
                slices[name] = self._endpoints_of(item, name)
        self._slices = slices
        holders: dict[str, set[str]] = {}
        for name, endpoints in slices.items():
            for key in endpoints:
                holders.setdefault(key, set()).add(name)
        self._holders = holders
        self._resource_version = str(version)
        self._lists += 1
        if self._lists > 1:
            self.stats.relists += 1
        self._succeeded()
        self._publish_all(emit)

    async def _watch(self, api: KubeApi, emit: Emit) -> None:
        """One watch stream, until the server ends it at `timeoutSeconds`."""
        # Randomised like client-go's [min, 2*min), so a fleet of sidecars started together does
        # not reconnect in waves. The socket read deadline covers a stream that silently died;
        # a healthy API server sends a watch's head at once, so opening it has the short
        # request deadline: a hung server is a timeout now, not minutes from now.
        timeout_seconds = max(1, int(self._watch_timeout * random.uniform(1.0, 2.0)))
        loop = asyncio.get_running_loop()
        started, events_seen = loop.time(), 0
        params = {
            "labelSelector": self._selector,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if self._resource_version is not None:
            params["resourceVersion"] = self._resource_version
        async for event in api.watch(
            self._path,
            params,
            connect_timeout=self._connect_timeout,
            open_timeout=self._request_timeout,
            read_timeout=timeout_seconds + self._request_timeout,
        ):
            self._on_event(event, emit)
            events_seen += 1
        if events_seen == 0 and loop.time() - started < 1.0:
            # An empty stream that ends at once is no timeout (client-go's "very short watch"):
            # something in between is cutting it. Back off instead of spinning.
            raise BadResponse("watch stream ended at once without events")
        self._succeeded()  # a clean end at timeoutSeconds: our view was current until now

    def _on_event(self, event: dict[str, Any], emit: Emit) -> None:
        kind = event.get("type")
        obj = event["object"]
        metadata = obj.get("metadata") or {}
        version = metadata.get("resourceVersion")
        name = metadata.get("name") or ""
        if kind in ("ADDED", "MODIFIED"):
            self._set_slice(name, self._endpoints_of(obj, name, self._slices.get(name)), emit)
        elif kind == "DELETED":
            self._set_slice(name, None, emit)
        elif kind != "BOOKMARK":
            raise BadResponse(f"unknown watch event type {kind!r}")
        if version:
            self._resource_version = str(version)
        self._succeeded()

    # -- slices -> endpoints -------------------------------------------------------------------

    def _endpoints_of(
        self, sl: dict[str, Any], name: str, known: dict[str, Endpoint] | None = None
    ) -> dict[str, Endpoint]:
        """The slice's endpoints for our port, by key. `known`: the slice's endpoints before
        this event; an address among them was validated then, and an unchanged endpoint is
        kept as the same object (most of a MODIFIED slice is unchanged)."""
        if sl.get("addressType") not in ("IPv4", "IPv6"):
            return {}  # FQDN slices name hosts, not addresses: not ours to resolve here
        port = self._port_of(sl, name)
        if port is None:
            return {}
        if known is None:
            known = {}
        out: dict[str, Endpoint] = {}
        for ep in sl.get("endpoints") or ():
            addresses = ep.get("addresses")
            if not addresses:
                continue
            # Only the first address counts: the API defines no meaning for the others and
            # kube-proxy ignores them.
            ip = addresses[0]
            if not isinstance(ip, str):
                self._warn_once(name, f"bad address {ip!r}")
                continue
            key = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            before = known.get(key)
            if before is None:
                try:
                    ipaddress.ip_address(ip)
                except ValueError:
                    self._warn_once(name, f"bad address {ip!r}")
                    continue
            ready, terminating = _conditions(ep.get("conditions"))
            hostname, zone = _hostname(ep), ep.get("zone") or None
            if (
                before is not None
                and before.ready == ready
                and before.terminating == terminating
                and before.hostname == hostname
                and before.zone == zone
            ):
                out[key] = before
            else:
                out[key] = Endpoint(ip, port, ready, terminating, hostname, zone)
        return out

    def _port_of(self, sl: dict[str, Any], name: str) -> int | None:
        declared = sl.get("ports") or ()
        ports = [p for p in declared if (p.get("protocol") or "TCP") == "TCP"]
        if isinstance(self.port, str):
            for p in ports:
                if p.get("name") == self.port and p.get("port") is not None:
                    return int(p["port"])
            self._warn_once(name, f"no TCP port named {self.port!r}")
            return None
        if not declared or any(p.get("port") is None or p["port"] == self.port for p in ports):
            return self.port  # no ports defined, a nil port ("all ports"), or an exact match
        if len(ports) == 1:
            return int(ports[0]["port"])  # the number was the Service port; its only target port
        self._warn_once(name, f"no TCP port {self.port} among {[p.get('port') for p in ports]}")
        return None

    def _warn_once(self, slice_name: str, problem: str) -> None:
        if (slice_name, problem) not in self._warned:
            self._warned.add((slice_name, problem))
            log.warning("k8s_slice_skipped", extra=self._where(slice=slice_name, problem=problem))

    def _best(self, key: str) -> Endpoint | None:
        """The best view of one address among the slices that hold it. An address can sit in
        two slices for a moment while the controller moves it; keep its best view rather than
        whichever slice came last."""
        best: Endpoint | None = None
        for name in self._holders.get(key, ()):
            ep = self._slices[name][key]
            if best is None or _rank(ep) > _rank(best):
                best = ep
        return best

    def _set_slice(self, name: str, endpoints: dict[str, Endpoint] | None, emit: Emit) -> None:
        """One slice changed (None: deleted). Work and deltas in proportion to that slice."""
        old = self._slices.pop(name, {})
        if endpoints is not None:
            self._slices[name] = endpoints
        new = endpoints or {}
        # Unchanged endpoints are the same objects (see _endpoints_of): `is` settles most.
        touched = [key for key, ep in old.items() if not _same(new.get(key), ep)]
        touched.extend(key for key, ep in new.items() if not _same(old.get(key), ep))
        holders = self._holders
        for key in old:
            if key not in new:
                names = holders.get(key)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del holders[key]
        for key in new:
            if key not in old:
                holders.setdefault(key, set()).add(name)
        published = self._published
        if published is None or not self._exists or not self._slices:
            self._publish_all(emit)  # first answer, or the Service appeared or went away
            return
        added: list[Endpoint] = []
        removed: list[str] = []
        for key in dict.fromkeys(touched):  # each once, in order
            best = self._best(key)
            if best is None:
                if key in published:
                    removed.append(key)
            elif published.get(key) != best:
                added.append(best)
        if removed:
            self._emit(emit, Remove(tuple(removed)))
            for key in removed:
                del published[key]
        if added:
            added.sort(key=_order)
            self._emit(emit, Add(tuple(added)))
            for ep in added:
                published[ep.key] = ep

    def _publish_all(self, emit: Emit) -> None:
        """The whole set, after a (re-)list: a `Reset`, or `DoesNotExist` for no slice at all;
        nothing when it equals what was last published."""
        if not self._slices:
            if self._published is not None and not self._exists:
                return
            self._emit(emit, DoesNotExist())
            self._published, self._exists = {}, False
            return
        merged = {key: ep for key in self._holders if (ep := self._best(key)) is not None}
        if self._exists and merged == self._published:
            return
        self._emit(emit, Reset(tuple(sorted(merged.values(), key=_order))))
        self._published, self._exists = merged, True

    def _emit(self, emit: Emit, delta: Delta) -> None:
        emit(delta)
        self.stats.updates += 1
        if isinstance(delta, Reset):
            log.info(
                "k8s_endpoints",
                extra=self._where(kind="reset", endpoints=len(delta.endpoints)),
            )
        elif isinstance(delta, Add | Remove):
            if not log.isEnabledFor(logging.DEBUG):
                return  # one per slice event: not worth even building the fields
            changed = delta.endpoints if isinstance(delta, Add) else delta.keys
            log.debug(
                "k8s_endpoints",
                extra=self._where(kind=type(delta).__name__.lower(), endpoints=len(changed)),
            )
        else:
            log.info("k8s_endpoints", extra=self._where(kind="does_not_exist"))

    # -- errors and clients --------------------------------------------------------------------

    async def _build_client(self) -> KubeApi:
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
        return len(self._published) if self._published is not None else 0

    def _succeeded(self) -> None:
        self.stats.last_success = time.time()

    def _where(self, **fields: Any) -> dict[str, Any]:
        return {"service": self.service, "namespace": self.namespace, **fields}


class _ConfigError(Exception):
    """Building a client failed (no credentials, unreadable kubeconfig); the cause says why."""


def _conditions(conditions: dict[str, Any] | None) -> tuple[bool, bool]:
    """(ready, terminating) of our `Endpoint` from EndpointSlice conditions.

    The API: `ready` nil means true; `serving` nil means true; `terminating` nil means false.
    `ready` is false for a terminating endpoint (unless publishNotReadyAddresses), so for one we
    report `serving` instead: "terminating but still able to finish work", which the cluster
    uses to let in-flight requests finish (no new ones go to a terminating endpoint anyway)."""
    if conditions is None:
        return True, False
    if conditions.get("terminating") is True:
        return conditions.get("serving") is not False, True
    return conditions.get("ready") is not False, False


def _hostname(ep: dict[str, Any]) -> str | None:
    ref = ep.get("targetRef")
    if ref and ref.get("kind") == "Pod" and ref.get("name"):
        return str(ref["name"])
    return str(ep["hostname"]) if ep.get("hostname") else None


def _same(a: Endpoint | None, b: Endpoint) -> bool:
    return a is b or a == b


def _rank(ep: Endpoint) -> tuple[bool, bool, bool]:
    return ep.serving, ep.ready, not ep.terminating


def _order(ep: Endpoint) -> tuple[int, int, str, int]:
    return (*sort_key(ep.ip), ep.port)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
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
    api_client: KubeApi | None = None
    try:
        api_client = await (api if api is not None else default_api())()
        found = await api_client.get_json(
            f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}",
            {},
            connect_timeout=request_timeout,
            total=request_timeout,
        )
        spec = found.get("spec") or {}
        seconds = spec.get("terminationGracePeriodSeconds")
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
