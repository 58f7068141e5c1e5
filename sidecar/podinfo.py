"""`drain.grace: auto` (SPEC section 6): one number to tune, the pod's
`spec.terminationGracePeriodSeconds`, read through the Kubernetes API.

The pod is named by `POD_NAME` / `POD_NAMESPACE` (the chart sets them through the downward
API). Credentials: the in-cluster service account when `KUBERNETES_SERVICE_HOST` is set, else
the kubeconfig named by `KUBECONFIG` (SPEC section 4's rule for Kubernetes access); with
neither, or without `POD_NAME`, we are not in a pod and fall back.

The drain gets the period minus a safety margin, so that the process has exited (in-flight
work finished or aborted with RST, sockets counted) before the kubelet's SIGKILL:
`MARGIN` (5 s, what the chart's preStop `sidecar drain --timeout` also subtracts) for
periods of 10 s and more, half the period below that, and never less than `MIN_GRACE`.
The read is bounded by `READ_TIMEOUT`; whatever goes wrong (no pod, no RBAC `get pods`, API
server unreachable or slow) the drain uses `FALLBACK` seconds and the log says why.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.discovery.kubernetes import ApiFactory

log = logging.getLogger("sidecar.drain")

FALLBACK = 25.0  # the default grace (SPEC section 4), below the default 30 s pod grace period
MARGIN = 5.0
MIN_GRACE = 1.0
READ_TIMEOUT = 3.0


@dataclass(frozen=True)
class AutoGrace:
    seconds: float
    source: str  # "pod" when read from the pod spec, else "fallback"
    detail: str
    period: int | None = None  # terminationGracePeriodSeconds, when read


def grace_from_period(period: float) -> float:
    """The drain deadline for a pod whose terminationGracePeriodSeconds is `period`."""
    margin = MARGIN if period >= 2 * MARGIN else period / 2
    return max(MIN_GRACE, float(period) - margin)


def _fallback(detail: str) -> AutoGrace:
    return AutoGrace(FALLBACK, "fallback", detail)


async def auto_grace(
    environ: Mapping[str, str] | None = None,
    *,
    api: ApiFactory | None = None,
    read_timeout: float = READ_TIMEOUT,
) -> AutoGrace:
    """Resolve `grace: auto`. Never raises (but CancelledError); logs what it decided.

    `api` is an ApiFactory of `sidecar.discovery.kubernetes` (tests pass one built for a fake
    API server); by default it is chosen from the environment as described above."""
    env = os.environ if environ is None else environ
    result = await _resolve(env, api, read_timeout)
    fields = {"grace_s": result.seconds, "source": result.source, "detail": result.detail}
    if result.source == "pod":
        log.info(
            "drain.grace: auto from the pod's terminationGracePeriodSeconds",
            extra={
                "fields": {
                    **fields,
                    "terminationGracePeriodSeconds": result.period,
                    "margin_s": result.period - result.seconds
                    if result.period is not None
                    else None,
                }
            },
        )
    else:
        log.warning("drain.grace: auto: using the fallback", extra={"fields": fields})
    return result


async def _resolve(env: Mapping[str, str], api: ApiFactory | None, limit: float) -> AutoGrace:
    pod = env.get("POD_NAME", "")
    if not pod:
        return _fallback("POD_NAME is not set: not running in a Kubernetes pod")
    # Imported here: only `grace: auto` in a pod needs it.
    from sidecar.discovery import kubernetes as k8s

    if api is None:
        if env.get("KUBERNETES_SERVICE_HOST"):
            api = k8s.in_cluster(environ=env)
        elif env.get("KUBECONFIG"):
            api = k8s.kubeconfig(env["KUBECONFIG"])
        else:
            return _fallback("no in-cluster config (KUBERNETES_SERVICE_HOST) and no KUBECONFIG")
    namespace = env.get("POD_NAMESPACE") or k8s.pod_namespace(env)
    try:
        async with asyncio.timeout(limit):
            # The outer deadline decides (and says so); the request's own is only a backstop.
            period = await k8s.termination_grace_period(
                pod, namespace, api=api, request_timeout=2 * limit
            )
    except TimeoutError:
        return _fallback(f"reading pod {namespace}/{pod} took longer than {limit:g}s")
    if period is None:
        return _fallback(f"could not read pod {namespace}/{pod} (see the k8s_pod_read_failed line)")
    return AutoGrace(grace_from_period(period), "pod", f"pod {namespace}/{pod}", period)
