"""The Helm chart (SPEC section 9), checked with the real helm: lint, render, validation against
Kubernetes' OpenAPI schemas, the shape of what is rendered, and the values schema."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helmrun import (
    CHART,
    NAMESPACE,
    RELEASE,
    REPO,
    VALUES_DIR,
    Helm,
    Rendered,
    kubernetes_validate,
)

NATIVE_MIN = "1.29.0"  # sidecar init containers (restartPolicy: Always) are on by default
SIDECAR = "connection-sidecar"
FULLNAME = f"{RELEASE}-connection-sidecar"

# name -> (values files, native sidecar?)
CASES: dict[str, tuple[list[str], bool]] = {
    "default": ([], True),
    "classic": (["classic.yaml"], False),
    "monitors": (["monitors.yaml"], True),
    "custom-config": (["custom-config.yaml"], True),
    "sidecar-only": (["sidecar-only.yaml"], True),
}
WITH_APP = [name for name in CASES if name != "sidecar-only"]


def values_of(case: str) -> dict[str, Any]:
    """The chart's values for a case: values.yaml with the case's files merged over it."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for name in CASES[case][0]:
        merged = deep_merge(merged, yaml.safe_load((VALUES_DIR / name).read_text()))
    return merged


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing: maps merge, anything else replaces, null deletes."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(helm: Helm, case: str, kube_version: str | None = None) -> Rendered:
    return helm.template(CASES[case][0], kube_version=kube_version)


def pod_spec(rendered: Rendered) -> dict[str, Any]:
    return rendered.one("Deployment")["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in containers(spec) if c["name"] == SIDECAR]
    assert len(found) == 1, [c["name"] for c in containers(spec)]
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- lint and validation -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(helm: Helm, case: str) -> None:
    proc = helm.run("lint", "--strict", str(CHART), *helm.values_args(CASES[case][0]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("edge", ["oldest", "newest"])
@pytest.mark.parametrize("case", CASES)
def test_renders_valid_kubernetes_objects(
    helm: Helm, case: str, edge: str, kube_versions: tuple[str, str], tmp_path: Path
) -> None:
    """kubernetes-validate --strict against the oldest Kubernetes the mode supports (1.29 for
    native sidecars; the oldest schema kubernetes-validate has for the classic mode) and the
    newest it knows. ServiceMonitor/PodMonitor are CRDs: only those may warn."""
    oldest, newest = kube_versions
    if edge == "oldest" and CASES[case][1]:
        oldest = NATIVE_MIN
    version = oldest if edge == "oldest" else newest
    rendered = render(helm, case, kube_version=version)
    lines = kubernetes_validate(rendered.text, version, tmp_path)
    validated = [line for line in lines if line.startswith("INFO") and "passed" in line]
    crds = [d for d in rendered.docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert len(validated) == len(rendered.docs) - len(crds), "\n".join(lines)


def test_chart_kube_version_floor(helm: Helm, kube_versions: tuple[str, str]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.25.0-0"
    assert kube_versions[0] == "1.25.0", "kubernetes-validate dropped 1.25: raise the floor"
    proc = helm.template_proc(["classic.yaml"], kube_version="1.24.0")
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


def test_native_sidecar_needs_kubernetes_1_29(helm: Helm) -> None:
    proc = helm.template_proc(kube_version="1.28.0")
    assert proc.returncode != 0
    assert "nativeSidecar: true needs Kubernetes 1.29+" in proc.stderr
    assert "nativeSidecar=false" in proc.stderr
    helm.template(["classic.yaml"], kube_version="1.28.0")  # the way out works


# --- the pod -------------------------------------------------------------------------------------


def test_native_sidecar_shape(helm: Helm) -> None:
    spec = pod_spec(render(helm, "default"))
    assert [c["name"] for c in spec["initContainers"]] == [SIDECAR]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    sidecar = spec["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 15020}
    assert sidecar["startupProbe"]["periodSeconds"] == 1
    assert sidecar["startupProbe"]["failureThreshold"] == 60
    assert "postStart" not in sidecar["lifecycle"]  # the startup probe gates the app instead
    assert sidecar["image"] == "ghcr.io/example/connection-sidecar:0.1.0"
    assert sidecar["command"] == ["sidecar"]
    assert sidecar["args"] == ["run", "--config", "/etc/sidecar/config.yaml"]


def test_classic_sidecar_shape(helm: Helm) -> None:
    spec = pod_spec(render(helm, "classic"))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == [SIDECAR, "app"]  # the sidecar first
    sidecar = spec["containers"][0]
    assert "restartPolicy" not in sidecar
    # The kubelet starts the next container only when this postStart hook returns: the app
    # waits for readiness, for at most the startup probe's budget (2 s x 30 in classic.yaml).
    assert sidecar["lifecycle"]["postStart"]["exec"]["command"] == [
        "sidecar",
        "wait-ready",
        "--url",
        "http://127.0.0.1:15020/readyz",
        "--timeout",
        "60",
    ]
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 15020}


@pytest.mark.parametrize("case", WITH_APP)
def test_probes_on_the_status_port(helm: Helm, case: str) -> None:
    port = int(values_of(case)["config"]["status"]["address"].rpartition(":")[2])
    assert port == (15021 if case == "custom-config" else 15020)
    sidecar = sidecar_of(pod_spec(render(helm, case)))
    assert sidecar["ports"] == [{"name": "status", "containerPort": port, "protocol": "TCP"}]
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": port}


@pytest.mark.parametrize("case", WITH_APP)
def test_prestop_drains_within_the_grace_period(helm: Helm, case: str) -> None:
    values = values_of(case)
    spec = pod_spec(render(helm, case))
    grace = values["terminationGracePeriodSeconds"]
    assert spec["terminationGracePeriodSeconds"] == grace
    hook = sidecar_of(spec)["lifecycle"]["preStop"]["exec"]["command"]
    assert hook == ["sidecar", "drain", "--admin", "http://127.0.0.1:15000", "--timeout"] + [
        str(grace - 5)
    ]


def test_grace_period_default(helm: Helm) -> None:
    assert pod_spec(render(helm, "default"))["terminationGracePeriodSeconds"] == 30


@pytest.mark.parametrize("case", WITH_APP)
def test_secure_defaults_on_every_container(helm: Helm, case: str) -> None:
    spec = pod_spec(render(helm, case))
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in containers(spec):
        sc = container["securityContext"]
        where = f"{case}/{container['name']}"
        assert sc["runAsNonRoot"] is True, where
        assert sc["runAsUser"] == 10001, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert sc.get("privileged", False) is False, where
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]], where
        assert "resources" in container and container["resources"]["limits"]["memory"], where


@pytest.mark.parametrize("case", WITH_APP)
def test_pod_identity_from_the_downward_api(helm: Helm, case: str) -> None:
    env = env_of(sidecar_of(pod_spec(render(helm, case))))
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_app_goes_through_the_sidecar(helm: Helm) -> None:
    app = pod_spec(render(helm, "default"))["containers"][0]
    env = env_of(app)
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:15001"
    for name in ("NO_PROXY", "no_proxy"):
        assert {"localhost", "127.0.0.1"} <= set(env[name].split(","))
    custom = env_of(pod_spec(render(helm, "custom-config"))["containers"][0])
    assert custom["HTTPS_PROXY"] == "http://127.0.0.1:15001"
    assert custom["HTTP_PROXY"] == "http://127.0.0.1:15001"  # merged with the defaults
    assert "TARGET_URL" not in custom  # null removes a default
    assert custom["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_pod_labels_keep_the_selector(helm: Helm) -> None:
    deployment = helm.template(["custom-config.yaml"]).one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "payments"
    for key, value in deployment["spec"]["selector"]["matchLabels"].items():
        assert labels[key] == value


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_config_map_is_the_values_config_mounted(helm: Helm, case: str) -> None:
    rendered = render(helm, case)
    name = "shop-egress" if case == "custom-config" else FULLNAME
    config_map = rendered.one("ConfigMap", name)
    assert set(config_map["data"]) == {"config.yaml"}
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == values_of(case)["config"]
    if case == "sidecar-only":
        assert not rendered.all("Deployment")
        return
    spec = pod_spec(rendered)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m for m in sidecar_of(spec)["volumeMounts"] if m["mountPath"] == "/etc/sidecar"]
    # The directory, not a subPath, so that ConfigMap updates reach the running sidecar.
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True and "subPath" not in mounts[0]
    assert volumes[mounts[0]["name"]]["configMap"]["name"] == name


@pytest.mark.parametrize("case", CASES)
def test_config_map_is_accepted_by_the_sidecar(helm: Helm, case: str) -> None:
    """The rendered config.yaml parses with the sidecar's own loader (sidecar/config.py)."""
    from sidecar.config import parse_config

    config_map = [d for d in render(helm, case).all("ConfigMap") if "config.yaml" in d["data"]]
    config = parse_config(config_map[0]["data"]["config.yaml"], "configmap", environ={})
    values = values_of(case)["config"]
    assert [listener.name for listener in config.listeners] == [
        listener["name"] for listener in values["listeners"]
    ]
    assert [cluster.name for cluster in config.clusters] == [c["name"] for c in values["clusters"]]
    assert config.drain.grace == ("auto" if case != "custom-config" else 50.0)
    assert config.status.port == (15021 if case == "custom-config" else 15020)


def test_config_checksum_rolls_pods_when_enabled(helm: Helm) -> None:
    def checksum(*sets: str) -> str | None:
        deployment = helm.template(sets=sets).one("Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"].get("checksum/config")

    default = checksum()
    assert default and len(default) == 64
    assert checksum() == default  # stable
    assert checksum("config.access_log=false") not in (None, default)
    assert checksum("replicaCount=3") == default  # only the config counts
    assert checksum("rollOnConfigChange=false") is None  # rely on the hot reload instead
    annotations = pod_spec_metadata(helm.template(["custom-config.yaml"]))["annotations"]
    assert "checksum/config" not in annotations
    assert annotations["example.com/scrape-note"] == "status port 15021"


def pod_spec_metadata(rendered: Rendered) -> dict[str, Any]:
    return rendered.one("Deployment")["spec"]["template"]["metadata"]


def test_unquoted_on_key_gets_a_hint(helm: Helm, tmp_path: Path) -> None:
    """YAML 1.1 (Helm's values parser) reads a bare `on:` as true: say so, not 'true'."""
    bad = tmp_path / "on.yaml"
    bad.write_text(
        "config:\n  clusters:\n    - name: a\n      discovery: {type: static, "
        'endpoints: ["10.0.0.1:80"]}\n      retry:\n        on: [reset]\n'
    )
    proc = helm.run("template", RELEASE, str(CHART), "-f", str(bad))
    assert proc.returncode != 0
    assert 'config.clusters[0].retry: quote the key \\"on\\"' in proc.stderr or (
        'quote the key "on"' in proc.stderr
    ), proc.stderr


# --- RBAC ----------------------------------------------------------------------------------------

DISCOVERY_RULE = {
    "apiGroups": ["discovery.k8s.io"],
    "resources": ["endpointslices"],
    "verbs": ["get", "list", "watch"],
}
POD_RULE = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}


def test_rbac_is_exactly_endpointslices_and_pods(helm: Helm) -> None:
    rendered = render(helm, "default")
    role = rendered.one("Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [DISCOVERY_RULE, POD_RULE]
    binding = rendered.one("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = rendered.one("ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    spec = pod_spec(rendered)
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is True


@pytest.mark.parametrize("case", CASES)
def test_no_cluster_wide_rbac(helm: Helm, case: str) -> None:
    kinds = render(helm, case).kinds()
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}


def test_rbac_follows_discovery_into_other_namespaces(helm: Helm) -> None:
    rendered = render(helm, "custom-config")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in rendered.all("Role")}
    assert set(roles) == {
        (NAMESPACE, "shop-egress"),
        ("shop", "shop-egress-discovery"),
        ("stock", "shop-egress-discovery"),
    }
    assert roles[(NAMESPACE, "shop-egress")]["rules"] == [DISCOVERY_RULE, POD_RULE]
    assert roles[("shop", "shop-egress-discovery")]["rules"] == [DISCOVERY_RULE]
    for binding in rendered.all("RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "shop-egress-proxy", "namespace": NAMESPACE}
        ]
    account = rendered.one("ServiceAccount")
    assert account["metadata"]["annotations"] == {"example.com/owner": "payments-team"}
    assert pod_spec(rendered)["serviceAccountName"] == "shop-egress-proxy"


def test_rbac_can_be_turned_off(helm: Helm) -> None:
    kinds = helm.template(sets=["rbac.create=false", "serviceAccount.create=false"]).kinds()
    assert not kinds & {"Role", "RoleBinding", "ServiceAccount"}
    spec = pod_spec(helm.template(sets=["rbac.create=false", "serviceAccount.create=false"]))
    assert spec["serviceAccountName"] == "default"


# --- monitoring and dashboard --------------------------------------------------------------------


def test_monitors_off_by_default(helm: Helm) -> None:
    kinds = render(helm, "default").kinds()
    assert not kinds & {"Service", "ServiceMonitor", "PodMonitor"}


def test_service_monitor_scrapes_the_status_port(helm: Helm) -> None:
    rendered = render(helm, "monitors")
    service = rendered.one("Service")
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert service["metadata"]["labels"][key] == value
    assert service["spec"]["ports"] == [
        {"name": "status", "port": 15020, "targetPort": 15020, "protocol": "TCP"}
    ]
    assert service["spec"]["publishNotReadyAddresses"] is True  # scrape while draining
    pod_labels = pod_spec_metadata(rendered)["labels"]
    for key, value in service["spec"]["selector"].items():
        assert pod_labels[key] == value
    assert monitor["spec"]["endpoints"] == [
        {"port": "status", "path": "/metrics", "scheme": "http", "interval": "10s",
         "scrapeTimeout": "5s"}
    ]  # fmt: skip
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_pod_monitor_scrapes_the_status_port(helm: Helm) -> None:
    rendered = render(helm, "monitors")
    monitor = rendered.one("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    pod_labels = pod_spec_metadata(rendered)["labels"]
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert pod_labels[key] == value
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "status" and endpoint["path"] == "/metrics"
    assert sidecar_of(pod_spec(rendered))["ports"][0]["name"] == "status"


def test_dashboard_config_map(helm: Helm) -> None:
    config_map = render(helm, "default").one("ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    (text,) = config_map["data"].values()
    assert text.rstrip("\n") == (CHART / "dashboards" / "sidecar.json").read_text().rstrip("\n")
    assert json.loads(text)["uid"] == "connection-sidecar"
    elsewhere = render(helm, "monitors").one("ConfigMap", f"{FULLNAME}-dashboard")
    assert elsewhere["metadata"]["namespace"] == "monitoring"
    assert elsewhere["metadata"]["annotations"] == {"grafana_folder": "Networking"}
    assert elsewhere["metadata"]["labels"]["grafana_dashboard"] == "1"
    off = helm.template(sets=["dashboard.enabled=false"])
    assert [c["metadata"]["name"] for c in off.all("ConfigMap")] == [FULLNAME]


# --- NOTES.txt -----------------------------------------------------------------------------------


def notes(helm: Helm, case: str) -> str:
    proc = helm.run(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        *helm.values_args(CASES[case][0]),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "NOTES:" in proc.stdout
    return " ".join(proc.stdout.split("NOTES:", 1)[1].split())  # wrapping aside


@pytest.mark.parametrize("case", CASES)
def test_notes_render(helm: Helm, case: str) -> None:
    text = notes(helm, case)
    assert "HTTP_PROXY=http://127.0.0.1:15001" in text
    assert "http_proxy=http://127.0.0.1:15001" in text
    assert "/healthz, /readyz, /metrics" in text
    if case == "sidecar-only":
        assert '"connection-sidecar.container"' in text
        assert "dashboard" not in text.lower()
    else:
        assert f"deployment/{'shop-egress' if case == 'custom-config' else FULLNAME}" in text
        assert 'grafana_dashboard="1"' in text
    if case == "classic":
        assert "sidecar wait-ready" in text
    if case == "monitors":
        assert "scrapes every pod twice" in text
        assert "namespace monitoring" in text


# --- values schema -------------------------------------------------------------------------------

SCHEMA_REJECTS: list[tuple[list[str], list[str]]] = [
    (["--set", "replicaCount=-1"], ["/replicaCount", "minimum"]),
    (["--set", "replicas=3"], ["additional properties 'replicas' not allowed"]),
    (["--set", "nativeSidecar=maybe"], ["/nativeSidecar", "want boolean"]),
    (["--set-string", "terminationGracePeriodSeconds=30"], ["/terminationGracePeriodSeconds"]),
    (["--set", "terminationGracePeriodSeconds=3"], ["/terminationGracePeriodSeconds", "minimum"]),
    (["--set", "resources.requests.memory=lots"], ["/resources/requests/memory", "'lots'"]),
    (["--set", "app.resources.limits.cpu=2cores"], ["/app/resources/limits/cpu"]),
    (["--set", "resources.request.cpu=1"], ["/resources", "'request' not allowed"]),
    (["--set", "image.pullPolicy=Sometimes"], ["/image/pullPolicy"]),
    (["--set", "serviceMonitor.interval=fast"], ["/serviceMonitor/interval"]),
    (["--set", "dashboard.labels.grafana_dashboard=1"], ["/dashboard/labels/grafana_dashboard"]),
    (["--set", "app.env.PROXY.host=a"], ["/app/env/PROXY"]),
    (["--set", "config.bogus=1"], ["/config", "'bogus' not allowed"]),
    (["--set", "config.admin.address=0.0.0.0:15000"], ["/config/admin/address"]),
    (["--set", "config.drain.linger=5 seconds"], ["/config/drain/linger"]),
    (["--set", "config.drain.grace=soon"], ["/config/drain/grace"]),
]


@pytest.mark.parametrize(
    ("args", "fragments"), SCHEMA_REJECTS, ids=[" ".join(a) for a, _ in SCHEMA_REJECTS]
)
def test_schema_rejects_bad_values(helm: Helm, args: list[str], fragments: list[str]) -> None:
    proc = helm.run("template", RELEASE, str(CHART), *args)
    assert proc.returncode != 0, f"accepted: {args}"
    assert "don't meet the specifications of the schema" in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


# Bad sidecar configs (values fragments): the schema refuses them with the path at fault, and
# so does the sidecar's own loader: the schema only front-runs `sidecar check`.
BAD_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "listener off loopback": (
        {"listeners": [{"name": "egress", "address": "0.0.0.0:15001"}]},
        "/config/listeners/0/address",
    ),
    "unknown pool key": (
        {"clusters": [{"name": "a", "discovery": {"type": "static", "endpoints": ["10.0.0.1:80"]},
                       "pool": {"max_conns": 5}}]},
        "'max_conns' not allowed",
    ),
    "bad duration": (
        {"clusters": [{"name": "a", "discovery": {"type": "static", "endpoints": ["10.0.0.1:80"]},
                       "timeouts": {"request": "15 secs"}}]},
        "/config/clusters/0/timeouts/request",
    ),
    "kubernetes discovery without service": (
        {"clusters": [{"name": "a", "discovery": {"type": "kubernetes", "port": "https"}}]},
        "/config/clusters/0/discovery",
    ),
    "retry on a 4xx": (
        {"clusters": [{"name": "a", "discovery": {"type": "static", "endpoints": ["10.0.0.1:80"]},
                       "retry": {"on": ["404"]}}]},
        "/config/clusters/0/retry/on/0",
    ),
    "tcp listener without cluster": (
        {"listeners": [{"name": "redis", "address": "127.0.0.1:6380", "protocol": "tcp"}]},
        "/config/listeners/0",
    ),
    "no listeners": ({"listeners": []}, "/config/listeners"),
    "unknown load balancer": (
        {"clusters": [{"name": "a", "discovery": {"type": "static", "endpoints": ["10.0.0.1:80"]},
                       "load_balancer": "fastest"}]},
        "/config/clusters/0/load_balancer",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_schema_rejects_bad_sidecar_config(helm: Helm, name: str, tmp_path: Path) -> None:
    fragment, where = BAD_CONFIGS[name]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"config": fragment}))
    proc = helm.run("template", RELEASE, str(CHART), "-f", str(path))
    assert proc.returncode != 0, f"accepted: {fragment}"
    assert where in proc.stderr, proc.stderr

    from sidecar.config import ConfigError, parse_config

    merged = deep_merge(values_of("default")["config"], fragment)
    with pytest.raises(ConfigError):
        parse_config(yaml.safe_dump(merged), "values", environ={})


# --- the named templates, from another chart -----------------------------------------------------

PARENT_TEMPLATE = """\
{{- $sidecar := index .Subcharts "connection-sidecar" }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop
  namespace: {{ .Release.Namespace }}
spec:
  selector:
    matchLabels: {app: shop}
  template:
    metadata:
      labels: {app: shop}
      annotations:
        {{- include "connection-sidecar.podAnnotations" $sidecar | nindent 8 }}
    spec:
      serviceAccountName: {{ include "connection-sidecar.serviceAccountName" $sidecar }}
      terminationGracePeriodSeconds: {{ $sidecar.Values.terminationGracePeriodSeconds }}
      initContainers:
        {{- include "connection-sidecar.container" $sidecar | nindent 8 }}
      containers:
        - name: shop
          image: registry.example.com/shop:1.0.0
          env:
            - {name: HTTP_PROXY, value: "http://127.0.0.1:15001"}
      volumes:
        {{- include "connection-sidecar.volumes" $sidecar | nindent 8 }}
"""


def test_named_templates_add_the_sidecar_to_another_chart(
    helm: Helm, kube_versions: tuple[str, str], tmp_path: Path
) -> None:
    parent = tmp_path / "shop"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "connection-sidecar",
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))  # fmt: skip
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: shop\nversion: 1.0.0\nappVersion: '9.9.9'\n"
        "dependencies:\n  - name: connection-sidecar\n    version: 0.1.0\n"
        "    repository: file://charts/connection-sidecar\n"
    )
    (parent / "values.yaml").write_text(
        "connection-sidecar:\n  app:\n    enabled: false\n  terminationGracePeriodSeconds: 40\n"
    )
    (parent / "templates" / "deployment.yaml").write_text(PARENT_TEMPLATE)

    lint = helm.run("lint", "--strict", str(parent))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    version = kube_versions[1]
    rendered = helm.template(chart=parent, kube_version=version)
    kubernetes_validate(rendered.text, version, tmp_path)

    deployment = rendered.one("Deployment")  # the subchart's example app is off
    assert deployment["metadata"]["name"] == "shop"
    spec = deployment["spec"]["template"]["spec"]
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == SIDECAR and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"].endswith(":0.1.0")  # the sidecar chart's appVersion, not 9.9.9
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"][-1] == "35"
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_name = volumes["connection-sidecar-config"]["configMap"]["name"]
    assert rendered.one("ConfigMap", config_name)["data"]["config.yaml"]
    assert spec["serviceAccountName"] == rendered.one("ServiceAccount")["metadata"]["name"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/config"]) == 64


# --- the values schema and the sidecar's config models agree ------------------------------------


def _models_in(annotation: Any) -> list[type]:
    """The pydantic models inside a field annotation (through list, Union, Annotated, ...)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _schema_node(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow $refs and array items down to an object schema."""
    while "$ref" in node or node.get("type") == "array":
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        else:
            node = node["items"]
    return node


def test_config_schema_has_exactly_the_loaders_keys() -> None:
    """Every key the sidecar's config models accept is in values.schema.json, and no other:
    the schema never refuses a config `sidecar check` accepts for an unknown key, nor lets a
    key through that the sidecar would refuse."""
    from sidecar.config import Config

    schema = json.loads((CHART / "values.schema.json").read_text())
    mismatches: list[str] = []

    def walk(models: list[type], node: dict[str, Any], path: str) -> None:
        fields: dict[str, Any] = {}
        for model in models:
            for name, info in model.model_fields.items():  # type: ignore[attr-defined]
                fields.setdefault(name, []).append(info.annotation)
        node = _schema_node(schema, node)
        keys = set(node.get("properties", {})) - {"true"}  # the bare-`on` trap, see configmap
        if node.get("additionalProperties") is not False:
            mismatches.append(f"{path}: the schema allows unknown keys")
        if keys != set(fields):
            mismatches.append(
                f"{path}: schema-only {sorted(keys - set(fields))}, "
                f"loader-only {sorted(set(fields) - keys)}"
            )
        for name, types in fields.items():
            inner = [m for a in types for m in _models_in(a)]
            if inner and name in keys:
                walk(inner, node["properties"][name], f"{path}.{name}")

    walk([Config], schema["properties"]["config"], "config")
    assert not mismatches, "\n".join(mismatches)


# --- the command lines the chart renders, against the sidecar's real CLI -------------------------


def _sidecar_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.mark.parametrize("case", ["default", "classic"])
def test_hook_commands_are_valid_sidecar_command_lines(helm: Helm, case: str) -> None:
    """Run each hook's exact command line with its URL pointed at a closed loopback port
    and a short timeout: the CLI must take the arguments (exit 1: not ready / unreachable),
    never reject them (exit 2: usage)."""
    lifecycle = sidecar_of(pod_spec(render(helm, case)))["lifecycle"]
    hooks = [lifecycle["preStop"]] + ([lifecycle["postStart"]] if case == "classic" else [])
    for hook in hooks:
        command = hook["exec"]["command"]
        assert command[0] == "sidecar"
        args = [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:1", a) for a in command[1:]]
        args[args.index("--timeout") + 1] = "0.2"
        proc = _sidecar_cli(args)
        assert proc.returncode == 1 and "usage:" not in proc.stderr, (command, proc.stderr)


@pytest.mark.parametrize("case", CASES)
def test_sidecar_check_accepts_the_rendered_config(helm: Helm, case: str, tmp_path: Path) -> None:
    """`sidecar check --config` (SPEC section 2) on the ConfigMap's config.yaml exits 0."""
    config_map = [d for d in render(helm, case).all("ConfigMap") if "config.yaml" in d["data"]]
    path = tmp_path / "config.yaml"
    path.write_text(config_map[0]["data"]["config.yaml"])
    proc = _sidecar_cli(["check", "--config", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}: ok"), proc.stdout
