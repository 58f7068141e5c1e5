"""`sidecar webhook`: a mutating admission webhook (admission.k8s.io/v1) over HTTPS, a thin
aiohttp layer over `pod.inject`. The JSONPatch is computed by `jsonpatch` from the pod before
and after, never written by hand. No Kubernetes API calls: everything is in the
AdmissionReview. Selection by namespace label happens in the MutatingWebhookConfiguration,
which sends those namespaces' pods to NAMESPACE_PATH (inject unless the pod says "false") and
every other pod to MUTATE_PATH (inject only when the pod says "true").

A request it cannot read gets a 400; a pod it cannot change is allowed unchanged with a
warning. Either way it never answers 5xx for a pod, and the API server's failurePolicy never
decides a pod's fate because of us."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import ssl
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sidecar import log as logs
from sidecar.inject import pod as podlib

log = logging.getLogger("sidecar.webhook")

MUTATE_PATH: Final = "/mutate"
NAMESPACE_PATH: Final = "/mutate/namespace"
MAX_BODY: Final = 8 * 1024 * 1024  # an AdmissionReview carries the object (etcd: 1.5 MiB)
CERT_CHECK_EVERY: Final = 30.0  # seconds between looks at the serving cert's files
# On SIGTERM keep answering this long while /readyz says 503: the Service's endpoints lag the
# pod's deletion, and with failurePolicy Ignore a refused review is a pod without a sidecar.
SHUTDOWN_DELAY: Final = 5.0
WARNING_PREFIX: Final = "connection-sidecar: "


class BadReview(ValueError):
    """Not an admission.k8s.io/v1 AdmissionReview request: a 400."""


class Injector:
    """The webhook's state: the settings, and its own metrics registry."""

    def __init__(self, settings: podlib.Settings) -> None:
        self.settings = settings
        self.stopping = False
        self.registry = CollectorRegistry()
        self.injections = Counter(
            "sidecar_injections_total",
            "Pods seen by the injection webhook, by what was done (injected, already_injected, "
            "skipped, error).",
            ["result"],
            registry=self.registry,
        )
        for result in podlib.RESULTS:  # every series exists from the start (SPEC section 8)
            self.injections.labels(result=result)

    def review(self, body: Any, require_opt_in: bool) -> dict[str, Any]:
        """AdmissionReview request -> AdmissionReview response. Raises BadReview."""
        request = _request_of(body)
        response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
        answer = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "response": response}  # fmt: skip
        kind = request.get("kind")
        if not isinstance(kind, dict):
            raise BadReview("request.kind is not a GroupVersionKind")
        obj = request.get("object")
        who = _who(request, obj)
        if (kind.get("group"), kind.get("kind")) != ("", "Pod") or request.get(
            "operation"
        ) != "CREATE" or request.get("subResource"):
            return answer  # not ours to change (the configuration sends only pod creations)
        try:
            if not isinstance(obj, dict):
                raise podlib.Unsupported("the request has no pod object")
            outcome = podlib.inject(obj, self.settings, require_opt_in=require_opt_in)
            patch = _patch(obj, outcome.pod)
        except Exception as exc:  # noqa: BLE001 (never break a pod we cannot understand)
            self.injections.labels(result=podlib.ERROR).inc()
            reason = f"{type(exc).__name__}: {exc}"
            logs.event(log, logging.WARNING, "pod left unchanged", pod=who, reason=reason)
            response["warnings"] = [f"{WARNING_PREFIX}not injected: {reason}"[:500]]
            return answer
        self.injections.labels(result=outcome.result).inc()
        level = logging.DEBUG if outcome.reason == "not opted in" else logging.INFO
        logs.event(log, level, outcome.result, pod=who, reason=outcome.reason,
                   operations=len(patch))  # fmt: skip
        if outcome.warn:
            response["warnings"] = [f"{WARNING_PREFIX}not injected: {outcome.reason}"]
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        return answer


def _request_of(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadReview("the body is not a JSON object")
    if body.get("apiVersion") != "admission.k8s.io/v1" or body.get("kind") != "AdmissionReview":
        raise BadReview("not an admission.k8s.io/v1 AdmissionReview")
    request = body.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadReview("no request with a uid")
    return request


def _who(request: dict[str, Any], obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or request.get("name") or f"{meta.get('generateName') or '?'}*"
    return f"{request.get('namespace') or meta.get('namespace') or '?'}/{name}"


def _patch(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    import jsonpatch

    ops: list[dict[str, Any]] = jsonpatch.make_patch(before, after).patch
    return ops


def make_app(injector: Injector) -> web.Application:
    async def mutate(request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=json.loads)
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        try:
            answer = injector.review(body, require_opt_in=request.path != NAMESPACE_PATH)
        except BadReview as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(answer)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if injector.stopping:
            return web.Response(text="stopping\n", status=503)
        return web.Response(text="ready\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(injector.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(MUTATE_PATH, mutate)
    app.router.add_post(NAMESPACE_PATH, mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # name the files: ssl's own message does not
        raise OSError(f"cannot load the serving certificate {cert} / key {key}: {exc}") from exc
    return context


async def _watch_cert(context: ssl.SSLContext, cert: str, key: str, every: float) -> None:
    """cert-manager (and `helm upgrade`) replace the Secret: the kubelet swaps the mounted
    files, and new handshakes get the new certificate without a restart."""

    def stamp() -> tuple[float, float]:
        return os.stat(cert).st_mtime, os.stat(key).st_mtime

    seen = stamp()
    while True:
        await asyncio.sleep(every)
        try:
            now = stamp()
            if now != seen:
                context.load_cert_chain(cert, key)
                seen = now
                logs.event(log, logging.INFO, "serving certificate reloaded", cert=cert)
        except (OSError, ssl.SSLError) as exc:  # half-written during the swap: next time
            logs.event(log, logging.WARNING, "serving certificate not reloaded", error=str(exc))


async def serve(
    settings: podlib.Settings, cert: str, key: str, host: str, port: int,
    shutdown_delay: float = SHUTDOWN_DELAY, cert_check_every: float = CERT_CHECK_EVERY,
) -> int:  # fmt: skip
    context = tls_context(cert, key)
    injector = Injector(settings)
    runner = web.AppRunner(make_app(injector), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context, backlog=512)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logs.event(log, logging.INFO, "webhook listening", address=f"{host}:{port}",
               native=settings.native, image=settings.image)  # fmt: skip
    watcher = asyncio.create_task(_watch_cert(context, cert, key, cert_check_every))
    try:
        await stop.wait()
        injector.stopping = True
        logs.event(log, logging.INFO, "webhook stopping", delay=shutdown_delay)
        stop.clear()
        with contextlib.suppress(TimeoutError):  # a second signal: stop at once
            await asyncio.wait_for(stop.wait(), shutdown_delay)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await runner.cleanup()
        logs.event(log, logging.INFO, "webhook stopped")
    return 0
