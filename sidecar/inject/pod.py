"""What injection does to one pod: a pure function from a pod (a plain dict: a Pod or a pod
template, `metadata` + `spec`) to a new one. The CLI and the webhook both call it; the chart's
named template `connection-sidecar.container` renders the same container, and
tests/inject/test_chart_parity.py renders both for several values and requires them equal.

Rules, at the decision points below:
- opt-in/out by the annotation `connection-sidecar.io/inject` ("false" always wins);
- idempotent: a pod that already has our container keeps it; only what is missing is added
  (so a re-invocation after another webhook added a container gives that one its proxy env);
- a pod this cannot change safely is left exactly as it was, with the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from sidecar import __version__

CONTAINER: Final = "connection-sidecar"  # the chart's name for the sidecar container
FOREIGN_SIDECAR: Final = "sidecar"  # a container of this name: someone else's sidecar
CONFIG_VOLUME: Final = "connection-sidecar-config"
TMP_VOLUME: Final = "connection-sidecar-tmp"
CONFIG_DIR: Final = "/etc/sidecar"

ANNOTATION_INJECT: Final = "connection-sidecar.io/inject"
ANNOTATION_CONFIG: Final = "connection-sidecar.io/config"
ANNOTATION_PROXY_ENV: Final = "connection-sidecar.io/proxy-env"
DEFAULT_CONTAINER: Final = "kubectl.kubernetes.io/default-container"

# The ports of the embedded default config (SPEC section 3); a config map given to injected
# pods must keep them, since injection never reads it (no API calls).
ADMIN_ADDRESS: Final = "127.0.0.1:15000"
STATUS_PORT: Final = 15020
PROXY_URL: Final = "http://127.0.0.1:15001"
NO_PROXY: Final = "localhost,127.0.0.1,::1"
DEFAULT_GRACE: Final = 30  # Kubernetes' terminationGracePeriodSeconds when a pod sets none
DRAIN_MARGIN: Final = 5  # the preStop drain ends this long before the kubelet's SIGKILL

# Results, also the `result` label of sidecar_injections_total.
INJECTED: Final = "injected"
ALREADY_INJECTED: Final = "already_injected"
SKIPPED: Final = "skipped"
ERROR: Final = "error"
RESULTS: Final = (INJECTED, ALREADY_INJECTED, SKIPPED, ERROR)


def _secure_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probes() -> dict[str, dict[str, int]]:
    return {
        "startup": {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 60},
        "liveness": {"periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
        "readiness": {"periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2},
    }


def _resources() -> dict[str, Any]:
    return {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


@dataclass(frozen=True)
class Settings:
    """What the sidecar container looks like: the chart's values of the same names, with the
    chart's defaults (tests/inject/test_chart_parity.py checks them against values.yaml)."""

    image: str = f"ghcr.io/example/connection-sidecar:{__version__}"
    pull_policy: str = "IfNotPresent"
    native: bool = True  # nativeSidecar
    resources: dict[str, Any] = field(default_factory=_resources)
    probes: dict[str, dict[str, int]] = field(default_factory=_probes)
    security_context: dict[str, Any] = field(default_factory=_secure_context)
    tmp_size_limit: str = "64Mi"
    extra_env: list[dict[str, Any]] = field(default_factory=list)
    status_port: int = STATUS_PORT
    admin_address: str = ADMIN_ADDRESS
    proxy_url: str = PROXY_URL
    config_map: str | None = None  # None: the embedded default config

    @classmethod
    def from_values(cls, values: Mapping[str, Any], version: str = __version__) -> Settings:
        """Settings from the chart's values (values.yaml shape; missing keys: defaults). The
        webhook reads the values file the chart renders for it; `sidecar inject --values`
        reads one a user writes."""
        base = cls()
        image = values.get("image") or {}
        repo, _, _ = base.image.rpartition(":")
        config = values.get("config") or {}
        status = str((config.get("status") or {}).get("address") or f"0.0.0.0:{STATUS_PORT}")
        admin = str((config.get("admin") or {}).get("address") or ADMIN_ADDRESS)
        return cls(
            image=f"{image.get('repository') or repo}:{image.get('tag') or version}",
            pull_policy=str(image.get("pullPolicy") or base.pull_policy),
            native=bool(values.get("nativeSidecar", base.native)),
            resources=copy.deepcopy(values.get("resources", base.resources)) or {},
            probes={**base.probes, **copy.deepcopy(values.get("probes") or {})},
            security_context=copy.deepcopy(values.get("securityContext", base.security_context)),
            tmp_size_limit=str(values.get("tmpSizeLimit") or base.tmp_size_limit),
            extra_env=copy.deepcopy(values.get("extraEnv") or []),
            status_port=int(status.rpartition(":")[2]),
            admin_address=admin,
        )

    def with_overrides(
        self, image: str | None = None, classic: bool = False, config_map: str | None = None
    ) -> Settings:
        """The command-line flags over the values."""
        out = self
        if image:
            out = replace(out, image=image)
        if classic:
            out = replace(out, native=False)
        if config_map:
            out = replace(out, config_map=config_map)
        return out


def sidecar_container(settings: Settings, grace: int, config_map: str | None) -> dict[str, Any]:
    """The sidecar container, key for key what `connection-sidecar.container` renders for the
    same values: native (`restartPolicy: Always`) or classic (postStart `sidecar wait-ready`);
    preStop `sidecar drain` within the pod's grace period; probes on the status port."""
    port = settings.status_port
    probes = settings.probes
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.pull_policy,
    }
    if settings.native:
        container["restartPolicy"] = "Always"
    container["command"] = ["sidecar"]
    container["args"] = ["run", "--config", f"{CONFIG_DIR}/config.yaml"] if config_map else ["run"]
    container["env"] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        *copy.deepcopy(settings.extra_env),
    ]
    container["ports"] = [{"name": "status", "containerPort": port, "protocol": "TCP"}]
    container["startupProbe"] = {"httpGet": {"path": "/readyz", "port": port}, **probes["startup"]}
    container["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": port}, **probes["liveness"]
    }
    container["readinessProbe"] = {
        "httpGet": {"path": "/readyz", "port": port}, **probes["readiness"]
    }
    lifecycle: dict[str, Any] = {}
    if not settings.native:
        startup = probes["startup"]
        budget = int(startup.get("periodSeconds", 1)) * int(startup.get("failureThreshold", 60))
        lifecycle["postStart"] = {"exec": {"command": [
            "sidecar", "wait-ready", "--url", f"http://127.0.0.1:{port}/readyz",
            "--timeout", str(budget),
        ]}}  # fmt: skip
    lifecycle["preStop"] = {"exec": {"command": [
        "sidecar", "drain", "--admin", f"http://{settings.admin_address}",
        "--timeout", str(max(grace - DRAIN_MARGIN, 1)),
    ]}}  # fmt: skip
    container["lifecycle"] = lifecycle
    if settings.resources:
        container["resources"] = copy.deepcopy(settings.resources)
    container["securityContext"] = copy.deepcopy(settings.security_context)
    mounts: list[dict[str, Any]] = []
    if config_map:
        # The directory, not a subPath: kubelet swaps the files when the ConfigMap changes,
        # and the sidecar hot-reloads its config.
        mounts.append({"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True})
    mounts.append({"name": TMP_VOLUME, "mountPath": "/tmp"})
    container["volumeMounts"] = mounts
    return container


def sidecar_volumes(settings: Settings, config_map: str | None) -> list[dict[str, Any]]:
    """The volumes the container mounts (the chart's `connection-sidecar.volumes`)."""
    volumes: list[dict[str, Any]] = []
    if config_map:
        volumes.append({"name": CONFIG_VOLUME, "configMap": {"name": config_map}})
    volumes.append({"name": TMP_VOLUME, "emptyDir": {"sizeLimit": settings.tmp_size_limit}})
    return volumes


def scrape_annotations(settings: Settings) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(settings.status_port),
        "prometheus.io/path": "/metrics",
    }


def proxy_env(settings: Settings) -> list[tuple[tuple[str, ...], list[dict[str, str]]]]:
    """(names that mean "already set", the entries to add): a container that sets either
    spelling of a variable keeps its own choice for both."""
    return [
        (("HTTP_PROXY", "http_proxy"), [
            {"name": "HTTP_PROXY", "value": settings.proxy_url},
            {"name": "http_proxy", "value": settings.proxy_url},
        ]),
        (("NO_PROXY", "no_proxy"), [
            {"name": "NO_PROXY", "value": NO_PROXY},
            {"name": "no_proxy", "value": NO_PROXY},
        ]),
    ]  # fmt: skip


class Unsupported(ValueError):
    """The pod is not one we can change safely: the reason is the message."""


@dataclass(frozen=True)
class Outcome:
    """What `inject` decided: the new pod (the input itself when unchanged), a RESULTS value,
    and why. `warn`: left alone against the pod's wish (a conflict), worth telling its
    creator; an opt-out or a pod that never opted in is not."""

    pod: dict[str, Any]
    result: str
    reason: str
    warn: bool = False


def _is_false(value: object) -> bool:
    return str(value).strip().lower() in ("false", "0", "no", "off", "disabled")


def _is_true(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on", "enabled")


def _containers(spec: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) for c in value
    ):
        raise Unsupported(f"spec.{key} is not a list of named containers")
    return value


def inject(
    pod: Mapping[str, Any], settings: Settings, *, require_opt_in: bool = False
) -> Outcome:
    """The pod (`metadata`, `spec`) with the sidecar added, or the reason it is left alone.
    `require_opt_in`: only pods annotated `connection-sidecar.io/inject: "true"` (the webhook
    for namespaces that did not opt in); otherwise every pod but those annotated "false".
    Never mutates its input. Raises Unsupported for a pod it cannot read."""
    if not isinstance(pod, Mapping):
        raise Unsupported("not a mapping")
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec")
    if not isinstance(metadata, Mapping) or not isinstance(spec, Mapping):
        raise Unsupported("no metadata/spec mappings")
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise Unsupported("metadata.annotations is not a mapping")
    opt = annotations.get(ANNOTATION_INJECT)
    if opt is not None and _is_false(opt):
        return Outcome(dict(pod), SKIPPED, f'annotated {ANNOTATION_INJECT}: "{opt}"')
    if require_opt_in and not (opt is not None and _is_true(opt)):
        return Outcome(dict(pod), SKIPPED, "not opted in")
    inits = _containers(spec, "initContainers")
    mains = _containers(spec, "containers")
    if not mains:
        raise Unsupported("spec.containers is empty")
    names = {c["name"] for c in [*inits, *mains]}
    if FOREIGN_SIDECAR in names and CONTAINER not in names:
        reason = f"a container is already named {FOREIGN_SIDECAR!r}"
        return Outcome(dict(pod), SKIPPED, reason, warn=True)
    if spec.get("hostNetwork") is True and CONTAINER not in names:
        reason = "hostNetwork: the sidecar's ports would be the node's"
        return Outcome(dict(pod), SKIPPED, reason, warn=True)
    if not settings.native and CONTAINER not in names and spec.get("restartPolicy") in (
        "Never", "OnFailure"
    ):
        # A classic sidecar never exits by itself: the Job's pod would never complete.
        reason = "a run-to-completion pod (Job) needs the native sidecar, not --classic"
        return Outcome(dict(pod), SKIPPED, reason, warn=True)
    if CONTAINER not in names:
        taken = _ports_taken(settings, [*inits, *mains])
        if taken:
            reason = f"a container already uses port {taken}"
            return Outcome(dict(pod), SKIPPED, reason, warn=True)
    volumes = spec.get("volumes")
    if volumes is not None and not (
        isinstance(volumes, list) and all(isinstance(v, dict) for v in volumes)
    ):
        raise Unsupported("spec.volumes is not a list of volumes")

    new = copy.deepcopy(dict(pod))
    new_meta = new.setdefault("metadata", {})
    if new_meta is None:
        new_meta = new["metadata"] = {}
    new_spec = new["spec"]
    already = CONTAINER in names
    if not already:
        config_map = str(annotations.get(ANNOTATION_CONFIG) or settings.config_map or "") or None
        grace = spec.get("terminationGracePeriodSeconds")
        grace = grace if isinstance(grace, int) and not isinstance(grace, bool) else DEFAULT_GRACE
        container = sidecar_container(settings, grace, config_map)
        app_first = mains[0]["name"]
        if settings.native:
            # First of the init containers: the app's own init containers can use it.
            new_spec["initContainers"] = [container, *(new_spec.get("initContainers") or [])]
        else:
            # First of the containers: its postStart holds the later ones back until ready.
            new_spec["containers"] = [container, *new_spec["containers"]]
        existing = {v["name"] for v in new_spec.get("volumes") or []}
        added = [v for v in sidecar_volumes(settings, config_map) if v["name"] not in existing]
        new_spec["volumes"] = [*(new_spec.get("volumes") or []), *added]
        new_annotations = dict(new_meta.get("annotations") or {})
        if not settings.native:  # `kubectl logs` without -c: the app, not the sidecar
            new_annotations.setdefault(DEFAULT_CONTAINER, app_first)
        new_meta["annotations"] = new_annotations
    new_annotations = dict(new_meta.get("annotations") or {})
    if not any(key.startswith("prometheus.io/") for key in new_annotations):
        new_annotations.update(scrape_annotations(settings))  # the pod's own scrape config wins
    if new_annotations:
        new_meta["annotations"] = new_annotations
    if not _is_false(annotations.get(ANNOTATION_PROXY_ENV, "true")):
        for app in new_spec["containers"]:
            if app["name"] != CONTAINER:
                _add_proxy_env(app, settings)
    if already:
        if new == pod:
            return Outcome(dict(pod), ALREADY_INJECTED, "unchanged")
        return Outcome(new, ALREADY_INJECTED, "completed")
    mode = "native sidecar" if settings.native else "classic container"
    return Outcome(new, INJECTED, mode)


def _ports_taken(settings: Settings, containers: list[dict[str, Any]]) -> int | None:
    ours = {settings.status_port, int(settings.admin_address.rpartition(":")[2])}
    ours.add(int(settings.proxy_url.rpartition(":")[2].rstrip("/")))
    for container in containers:
        for port in container.get("ports") or []:
            if isinstance(port, dict) and port.get("containerPort") in ours:
                return int(port["containerPort"])
    return None


def _add_proxy_env(container: dict[str, Any], settings: Settings) -> None:
    env = container.get("env")
    if env is not None and not isinstance(env, list):
        raise Unsupported(f"container {container['name']}: env is not a list")
    present = {e.get("name") for e in env or [] if isinstance(e, dict)}
    additions = [
        entry
        for names, entries in proxy_env(settings)
        if not present.intersection(names)
        for entry in entries
    ]
    if additions:
        container["env"] = [*(env or []), *additions]
