"""A fake Kubernetes API server on loopback HTTPS, speaking the wire protocol of the real one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import ssl
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web
from kubernetes_asyncio import client

# It serves what the sidecar reads: EndpointSlices (list, and watch as a chunked stream of one JSON
# WatchEvent per line) and single pods. The unmodified client reaches it through its in-cluster
# path: `env()` gives KUBERNETES_SERVICE_HOST/PORT, `token_path`/`ca_path` are the service-account
# files (the CA comes from trustme, the certificate names 127.0.0.1).
#
# What a real API server does and this one does too:
# - bearer-token auth: an unknown token gets a 401 Status; tokens can be rotated and revoked;
# - one resourceVersion counter for every change; lists carry it in `metadata.resourceVersion`;
# - watch from a resourceVersion replays the history after it; from none or "0" it starts with
#   synthetic ADDED events of the current objects; from a version older than the last compaction
#   it answers HTTP 200 then an in-stream ERROR event with a 410 Expired Status;
# - label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`), with the
#   real rule that an object that stops matching is a DELETED event for that watcher, and one
#   that starts matching an ADDED;
# - BOOKMARK events for watches that asked for them; `timeoutSeconds` ends the stream cleanly.
#
# Faults tests can inject: `expire_watches()` (compact + in-stream 410), `drop_watches()` (abort
# the TCP connections), `end_watches()` (clean end), `fail_requests(401|403|...)`, `go_down()` /
# `come_back()` (stop accepting on the port, then listen again on the same port), `rotate_token()`,
# `stall_requests()` (accept, never answer).
#
# Served objects are built from kubernetes-asyncio's models and serialized with
# `ApiClient.sanitize_for_serialization`, so field names are the API's.

HOST = "127.0.0.1"
TRUE_VALUES = ("true", "True", "1")
DISCOVERY = "discovery.k8s.io/v1"

# sanitize_for_serialization reads only class attributes; skipping __init__ avoids opening an
# aiohttp session (and having to close it) just to turn models into dicts.
_SERIALIZER = client.ApiClient.__new__(client.ApiClient)


def to_dict(model: Any) -> dict[str, Any]:
    """A kubernetes-asyncio model (or a dict) as the JSON the API server would send."""
    out = _SERIALIZER.sanitize_for_serialization(model)
    assert isinstance(out, dict)
    return json.loads(json.dumps(out))  # a deep copy made of plain JSON types


def status_body(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    status = client.V1Status(
        api_version="v1",
        kind="Status",
        metadata=client.V1ListMeta(),
        status="Failure",
        message=message,
        reason=reason,
        code=code,
        details=client.V1StatusDetails(**details) if details else None,
    )
    return to_dict(status)


# -- label selectors ----------------------------------------------------------------------------

_IN = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def parse_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels for a label selector string (the API's syntax, set-based too)."""
    requirements: list[Callable[[dict[str, str]], bool]] = []
    for part in re.split(r",(?![^(]*\))", text or ""):
        part = part.strip()
        if not part:
            continue
        if m := _IN.match(part):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                requirements.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                requirements.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif "!=" in part:
            key, value = (s.strip() for s in part.split("!=", 1))
            requirements.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif "=" in part:
            key, value = (s.strip() for s in re.split("==?", part, maxsplit=1))
            requirements.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif part.startswith("!"):
            absent = part[1:].strip()
            requirements.append(lambda lb, k=absent: k not in lb)
        else:
            requirements.append(lambda lb, k=part: k in lb)
    return lambda labels: all(req(labels) for req in requirements)


def _labels(obj: dict[str, Any] | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("labels") or {})


# -- state --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One write: `old` None for a create, `new` None for a delete."""

    rv: int
    resource: str
    namespace: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    token: str | None
    status: int  # what we answered (200 for a watch, even one that then sends an ERROR)

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in TRUE_VALUES


@dataclass(eq=False)
class _Watcher:
    resource: str
    namespace: str
    matches: Callable[[dict[str, str]], bool]
    bookmarks: bool
    request: web.Request
    queue: asyncio.Queue[dict[str, Any] | str] = field(default_factory=asyncio.Queue)
    query: dict[str, str] = field(default_factory=dict)

    def event_for(self, change: Change) -> dict[str, Any] | None:
        """The event this watcher sees for a change, after label filtering (or None)."""
        if change.resource != self.resource or change.namespace != self.namespace:
            return None
        was = change.old is not None and self.matches(_labels(change.old))
        now = change.new is not None and self.matches(_labels(change.new))
        if now:
            assert change.new is not None
            return {"type": "MODIFIED" if was else "ADDED", "object": change.new}
        if was:
            # Deleted, or no longer selected: the last state, stamped with this change's version.
            assert change.old is not None
            gone = json.loads(json.dumps(change.old))
            gone["metadata"]["resourceVersion"] = str(change.rv)
            return {"type": "DELETED", "object": gone}
        return None


_END = "end"  # queue sentinels
_DROP = "drop"

RESOURCES = {
    # resource -> (kind, apiVersion, list kind)
    "endpointslices": ("EndpointSlice", DISCOVERY, "EndpointSliceList"),
    "pods": ("Pod", "v1", "PodList"),
    "namespaces": ("Namespace", "v1", "NamespaceList"),  # cluster-scoped: namespace ""
}


class FakeApiServer:
    """Use as `async with FakeApiServer(tmp_path) as api:`; see the module docstring."""

    def __init__(self, workdir: Path, *, token: str = "token-0") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca_path = self.workdir / "ca.crt"
        self.token_path = self.workdir / "token"
        self.namespace_path = self.workdir / "namespace"
        self._ca = trustme.CA()
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert(HOST, "localhost").configure_cert(self._ssl)
        self.tokens: set[str] = {token}
        self.token_path.write_text(token)
        self.namespace_path.write_text("default")

        self.port = 0
        self.requests: list[RequestRecord] = []
        self._rv = itertools.count(1000)
        self.resource_version = next(self._rv)
        self._compacted = self.resource_version  # watches from older versions get 410
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._history: list[Change] = []
        self._watchers: set[_Watcher] = set()
        self._fail: tuple[int, str, str] | None = None
        self._stalled: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._watch_opened = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get(
            "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", self._slices
        )
        app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}", self._pod)
        # Writes, so that tests/k8s/cluster_iface.RealCluster can be tried against us too.
        slices = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        app.router.add_post(slices, self._create_slice)
        app.router.add_put(slices + "/{name}", self._replace_slice)
        app.router.add_delete(slices + "/{name}", self._delete_slice)
        app.router.add_post("/api/v1/namespaces", self._create_namespace)
        app.router.add_delete("/api/v1/namespaces/{name}", self._delete_namespace)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # A short shutdown timeout: watch handlers never finish on their own.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
        await runner.setup()
        # Our own socket: we learn the port of a port-0 bind, and come_back() binds it again.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock, ssl_context=self._ssl).start()
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        for w in list(self._watchers):
            w.queue.put_nowait(_DROP)
        if runner is not None:
            await runner.cleanup()

    async def go_down(self) -> None:
        """Stop accepting connections and cut every open one: the API server is unreachable
        (connection refused) until `come_back()`."""
        await self.stop()

    async def come_back(self) -> None:
        """Listen again on the same port, with all the state we had."""
        await self.start()

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a pod's environment says about the API server."""
        return {"KUBERNETES_SERVICE_HOST": HOST, "KUBERNETES_SERVICE_PORT": str(self.port)}

    def write_kubeconfig(self, path: Path | None = None, *, namespace: str = "default") -> Path:
        """A kubeconfig pointing at this server with the current token (JSON is valid YAML)."""
        path = path or self.workdir / "kubeconfig"
        token = sorted(self.tokens)[0]
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)},
                }
            ],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(doc))
        return path

    # -- state changes (what a controller or kubectl would do) ----------------------------------

    def put(self, resource: str, namespace: str, obj: Any) -> dict[str, Any]:
        """Create or replace an object (a model or a dict); returns it as served."""
        kind, api_version, _ = RESOURCES[resource]
        new = to_dict(obj)
        new["kind"], new["apiVersion"] = kind, api_version
        meta = new.setdefault("metadata", {})
        name = meta["name"]
        key = (resource, namespace, name)
        old = self._objects.get(key)
        rv = next(self._rv)
        if namespace:  # cluster-scoped objects have none
            meta["namespace"] = namespace
        meta["resourceVersion"] = str(rv)
        meta["uid"] = (old or {}).get("metadata", {}).get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = (old or {}).get("metadata", {}).get(
            "creationTimestamp"
        ) or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = (old or {}).get("metadata", {}).get("generation", 0) + 1
        self._objects[key] = new
        self._record(Change(rv, resource, namespace, old, new))
        return new

    def delete(self, resource: str, namespace: str, name: str) -> None:
        old = self._objects.pop((resource, namespace, name))
        self._record(Change(next(self._rv), resource, namespace, old, None))

    def put_slice(
        self, namespace: str, endpoint_slice: client.V1EndpointSlice | dict[str, Any]
    ) -> dict[str, Any]:
        return self.put("endpointslices", namespace, endpoint_slice)

    def delete_slice(self, namespace: str, name: str) -> None:
        self.delete("endpointslices", namespace, name)

    def put_pod(
        self, namespace: str, name: str, *, termination_grace_period_seconds: int = 30
    ) -> dict[str, Any]:
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, labels={"app": name}),
            spec=client.V1PodSpec(
                containers=[client.V1Container(name="app", image="registry.example/app:1")],
                termination_grace_period_seconds=termination_grace_period_seconds,
            ),
        )
        return self.put("pods", namespace, pod)

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objects.get((resource, namespace, name))

    def _record(self, change: Change) -> None:
        self.resource_version = change.rv
        self._history.append(change)
        for w in self._watchers:
            event = w.event_for(change)
            if event is not None:
                w.queue.put_nowait(event)

    # -- faults ---------------------------------------------------------------------------------

    def bookmark(self) -> None:
        """A BOOKMARK with the current resourceVersion to every watch that asked for them."""
        for w in self._watchers:
            if w.bookmarks:
                kind, api_version, _ = RESOURCES[w.resource]
                w.queue.put_nowait(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": kind,
                            "apiVersion": api_version,
                            "metadata": {"resourceVersion": str(self.resource_version)},
                        },
                    }
                )

    def compact(self) -> None:
        """Forget the history: a watch from any version before now gets 410 Expired."""
        self._compacted = self.resource_version
        self._history.clear()

    def expire_watches(self) -> None:
        """Compact, then tell every open watch in-stream that its version is gone (410)."""
        self.compact()
        for w in self._watchers:
            w.queue.put_nowait(self._expired_event(w.query.get("resourceVersion", "")))
            w.queue.put_nowait(_END)

    def drop_watches(self) -> None:
        """Abort every open watch's connection mid-stream (no terminating chunk)."""
        for w in self._watchers:
            w.queue.put_nowait(_DROP)

    def end_watches(self) -> None:
        """End every open watch cleanly, as `timeoutSeconds` would."""
        for w in self._watchers:
            w.queue.put_nowait(_END)

    def fail_requests(self, code: int | None) -> None:
        """Answer every request (open watches excepted) with this Status code; None: stop."""
        if code is None:
            self._fail = None
        elif code == 401:
            self._fail = (401, "Unauthorized", "Unauthorized")
        elif code == 403:
            self._fail = (
                403,
                "Forbidden",
                'endpointslices.discovery.k8s.io is forbidden: User "system:serviceaccount:'
                'default:sidecar" cannot list resource "endpointslices" in API group '
                '"discovery.k8s.io"',
            )
        else:
            self._fail = (code, "InternalError", f"injected failure {code}")

    def stall_requests(self, stalled: bool = True) -> None:
        """Accept connections and requests but answer nothing until un-stalled: a hung server."""
        if stalled and self._stalled is None:
            self._stalled = asyncio.Event()
        elif not stalled and self._stalled is not None:
            self._stalled.set()
            self._stalled = None

    def rotate_token(self, new: str, *, revoke_old: bool = True, write_file: bool = True) -> None:
        """Issue `new` (written to the token file unless told not to); old tokens stop working
        when `revoke_old` (open watches keep streaming, as on a real server)."""
        if revoke_old:
            self.tokens.clear()
        self.tokens.add(new)
        if write_file:
            tmp = self.token_path.with_suffix(".new")
            tmp.write_text(new)
            tmp.replace(self.token_path)  # atomic, like kubelet's ..data symlink swap

    # -- what tests look at ---------------------------------------------------------------------

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def watch_requests(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.watch]

    def list_requests(self) -> list[RequestRecord]:
        return [r for r in self.requests if not r.watch and r.path.endswith("/endpointslices")]

    async def wait_for_watches(self, count: int = 1, within: float = 10.0) -> None:
        """Until at least `count` watch streams are open."""
        async with asyncio.timeout(within):
            while len(self._watchers) < count:
                self._watch_opened.clear()
                await self._watch_opened.wait()

    async def wait_for_requests(
        self, predicate: Callable[[RequestRecord], bool], within: float = 10.0
    ) -> RequestRecord:
        """The first request (already made or yet to come) that satisfies `predicate`."""
        async with asyncio.timeout(within):
            while True:
                for r in self.requests:
                    if predicate(r):
                        return r
                await asyncio.sleep(0.01)

    # -- HTTP -----------------------------------------------------------------------------------

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if self._stalled is not None:
            await self._stalled.wait()
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else None
        if token is None or token not in self.tokens:
            return self._answer(request, token, status_body(401, "Unauthorized", "Unauthorized"))
        if self._fail is not None:
            code, reason, message = self._fail
            return self._answer(request, token, status_body(code, reason, message))
        response: web.StreamResponse = await handler(request)
        if request.query.get("watch") not in TRUE_VALUES:
            self.requests.append(self._record_request(request, token, response.status))
        return response

    def _answer(
        self, request: web.Request, token: str | None, body: dict[str, Any]
    ) -> web.Response:
        self.requests.append(self._record_request(request, token, body["code"]))
        return _json(body, status=body["code"])

    @staticmethod
    def _record_request(request: web.Request, token: str | None, status: int) -> RequestRecord:
        return RequestRecord(request.method, request.path, dict(request.query), token, status)

    async def _not_found(self, request: web.Request) -> web.Response:
        return _json(
            status_body(404, "NotFound", "the server could not find the requested resource"),
            status=404,
        )

    async def _create_slice(self, request: web.Request) -> web.Response:
        ns, body = request.match_info["namespace"], await request.json()
        name = body["metadata"]["name"]
        if self.get("endpointslices", ns, name) is not None:
            message = f'endpointslices.discovery.k8s.io "{name}" already exists'
            return _json(status_body(409, "AlreadyExists", message, name=name), status=409)
        return _json(self.put_slice(ns, body), status=201)

    async def _replace_slice(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        if self.get("endpointslices", ns, name) is None:
            return self._missing("endpointslices.discovery.k8s.io", name)
        return _json(self.put_slice(ns, await request.json()))

    async def _delete_slice(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        if self.get("endpointslices", ns, name) is None:
            return self._missing("endpointslices.discovery.k8s.io", name)
        self.delete_slice(ns, name)
        success = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        return _json({**success, "details": {"name": name, "kind": "endpointslices"}})

    async def _create_namespace(self, request: web.Request) -> web.Response:
        body = await request.json()
        body.setdefault("status", {})["phase"] = "Active"
        return _json(self.put("namespaces", "", body), status=201)

    async def _delete_namespace(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        gone = self.get("namespaces", "", name)
        if gone is None:
            return self._missing("namespaces", name)
        for resource, namespace, obj_name in list(self._objects):
            if namespace == name:
                self.delete(resource, namespace, obj_name)
        self.delete("namespaces", "", name)
        return _json({**gone, "status": {"phase": "Terminating"}})

    def _missing(self, what: str, name: str) -> web.Response:
        body = status_body(404, "NotFound", f'{what} "{name}" not found', name=name)
        return _json(body, status=404)

    async def _pod(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        obj = self._objects.get(("pods", ns, name))
        if obj is None:
            body = status_body(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
            return _json(body, status=404)
        return _json(obj)

    async def _slices(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info["namespace"]
        matches = parse_selector(request.query.get("labelSelector"))
        if request.query.get("watch") in TRUE_VALUES:
            return await self._watch(request, "endpointslices", ns, matches)
        items = []
        for (resource, namespace, _), obj in sorted(self._objects.items()):
            if resource == "endpointslices" and namespace == ns and matches(_labels(obj)):
                item = dict(obj)
                # Items of a typed list carry no kind/apiVersion; the list says them once.
                item.pop("kind", None)
                item.pop("apiVersion", None)
                items.append(item)
        kind, api_version, list_kind = RESOURCES["endpointslices"]
        return _json(
            {
                "kind": list_kind,
                "apiVersion": api_version,
                "metadata": {"resourceVersion": str(self.resource_version)},
                "items": items,
            }
        )

    def _expired_event(self, rv: str) -> dict[str, Any]:
        message = f"too old resource version: {rv} ({self._compacted})"
        return {"type": "ERROR", "object": status_body(410, "Expired", message)}

    async def _watch(
        self,
        request: web.Request,
        resource: str,
        ns: str,
        matches: Callable[[dict[str, str]], bool],
    ) -> web.StreamResponse:
        query = dict(request.query)
        watcher = _Watcher(
            resource,
            ns,
            matches,
            query.get("allowWatchBookmarks") in TRUE_VALUES,
            request,
            query=query,
        )
        # The backlog is computed and the watcher registered with no await in between, so no
        # change can fall between the two.
        rv_text = query.get("resourceVersion", "")
        if rv_text in ("", "0"):
            for (res, namespace, _), obj in sorted(self._objects.items()):
                if res == resource and namespace == ns and matches(_labels(obj)):
                    watcher.queue.put_nowait({"type": "ADDED", "object": obj})
        elif int(rv_text) < self._compacted:
            watcher.queue.put_nowait(self._expired_event(rv_text))
            watcher.queue.put_nowait(_END)
        else:
            for change in self._history:
                if change.rv > int(rv_text) and (event := watcher.event_for(change)):
                    watcher.queue.put_nowait(event)
        self._watchers.add(watcher)
        token = request.headers.get("Authorization", "")[len("Bearer ") :]
        self.requests.append(self._record_request(request, token, 200))
        self._watch_opened.set()

        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            async with asyncio.timeout(timeout):
                while True:
                    item = await watcher.queue.get()
                    if item == _END:
                        break
                    if item == _DROP:
                        if request.transport is not None:
                            request.transport.abort()
                        return response
                    await response.write(json.dumps(item).encode() + b"\n")
        except TimeoutError:
            pass  # timeoutSeconds: the stream ends cleanly
        except ConnectionError:
            return response  # the client went away
        finally:
            self._watchers.discard(watcher)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response


def _json(body: dict[str, Any], *, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body, separators=(",", ":")) + "\n",
        content_type="application/json",
    )


def endpoint_slice(
    name: str,
    service: str,
    endpoints: Iterable[client.V1Endpoint],
    ports: Iterable[tuple[str, int]] = (("http", 8080),),
    *,
    address_type: str = "IPv4",
    managed_by: str = "sidecar-tests",
) -> client.V1EndpointSlice:
    """An EndpointSlice model for `service` (label kubernetes.io/service-name)."""
    return client.V1EndpointSlice(
        api_version=DISCOVERY,
        kind="EndpointSlice",
        metadata=client.V1ObjectMeta(
            name=name,
            labels={
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": managed_by,
            },
        ),
        address_type=address_type,
        endpoints=list(endpoints),
        ports=[
            client.DiscoveryV1EndpointPort(name=port_name, port=number, protocol="TCP")
            for port_name, number in ports
        ],
    )


def endpoint(
    ip: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    pod: str | None = None,
    zone: str | None = None,
) -> client.V1Endpoint:
    """One EndpointSlice endpoint; `serving` defaults to `ready` as the controller sets it."""
    return client.V1Endpoint(
        addresses=[ip],
        conditions=client.V1EndpointConditions(
            ready=ready, serving=ready if serving is None else serving, terminating=terminating
        ),
        target_ref=client.V1ObjectReference(kind="Pod", name=pod) if pod else None,
        zone=zone,
    )
