"""The pure pod function of injection (sidecar/inject/pod.py), through its public calls: what
a pod gets, what it keeps, when it is left alone, and that doing it twice changes nothing."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sidecar.inject import pod as podlib
from sidecar.inject.pod import CONTAINER, Settings, inject

PROXY = "http://127.0.0.1:15001"


def make_pod(*containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"generateName": "shop-", "labels": {"app": "shop"}},
        "spec": {"containers": list(containers) or [{"name": "app", "image": "shop:1"}], **spec},
    }


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def by_name(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def test_native_sidecar_is_the_first_init_container() -> None:
    before = make_pod(initContainers=[{"name": "migrate", "image": "migrate:1"}])
    frozen = copy.deepcopy(before)
    out = inject(before, Settings())
    assert before == frozen, "the input was mutated"
    assert (out.result, out.reason) == (podlib.INJECTED, "native sidecar")
    inits = out.pod["spec"]["initContainers"]
    assert [c["name"] for c in inits] == [CONTAINER, "migrate"]  # before the app's own inits
    sidecar = inits[0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["run"]  # no config map: the embedded default config
    assert [m["mountPath"] for m in sidecar["volumeMounts"]] == ["/tmp"]
    assert sidecar["lifecycle"] == {"preStop": {"exec": {"command": [
        "sidecar", "drain", "--admin", "http://127.0.0.1:15000", "--timeout", "25"]}}}  # fmt: skip
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 15020}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 15020}
    assert env_of(sidecar)["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env_of(sidecar)["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["privileged"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and not sc["allowPrivilegeEscalation"]
    assert out.pod["spec"]["volumes"] == [
        {"name": "connection-sidecar-tmp", "emptyDir": {"sizeLimit": "64Mi"}}
    ]
    assert out.pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "15020",
        "prometheus.io/path": "/metrics",
    }  # fmt: skip


def test_classic_container_first_with_post_start() -> None:
    out = inject(make_pod({"name": "web", "image": "web:1"}), Settings(native=False))
    containers = out.pod["spec"]["containers"]
    assert [c["name"] for c in containers] == [CONTAINER, "web"]
    assert "initContainers" not in out.pod["spec"]
    assert "restartPolicy" not in containers[0]
    assert containers[0]["lifecycle"]["postStart"]["exec"]["command"] == [
        "sidecar", "wait-ready", "--url", "http://127.0.0.1:15020/readyz", "--timeout", "60"]
    # `kubectl logs` without -c still goes to the app
    assert out.pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "web"


def test_proxy_env_in_every_app_container_unless_set() -> None:
    out = inject(make_pod(
        {"name": "api", "image": "api:1", "env": [{"name": "LOG", "value": "info"}]},
        {"name": "exporter", "image": "exp:1",
         "env": [{"name": "HTTP_PROXY", "value": "http://corp:3128"}]},
        {"name": "batch", "image": "b:1", "env": [{"name": "no_proxy", "value": ".svc"}]},
    ), Settings())  # fmt: skip
    c = by_name(out.pod)
    assert env_of(c["api"]) == {"LOG": "info", "HTTP_PROXY": PROXY, "http_proxy": PROXY,
                                "NO_PROXY": "localhost,127.0.0.1,::1",
                                "no_proxy": "localhost,127.0.0.1,::1"}  # fmt: skip
    # The user's own proxy is kept, and so is its lowercase twin's absence.
    assert env_of(c["exporter"])["HTTP_PROXY"] == "http://corp:3128"
    assert "http_proxy" not in env_of(c["exporter"])
    assert env_of(c["exporter"])["NO_PROXY"] == "localhost,127.0.0.1,::1"
    assert env_of(c["batch"])["no_proxy"] == ".svc" and "NO_PROXY" not in env_of(c["batch"])
    assert env_of(c["batch"])["HTTP_PROXY"] == PROXY
    assert [e["name"] for e in c["api"]["env"]][0] == "LOG"  # appended, never reordered


def test_proxy_env_opt_out() -> None:
    pod = make_pod()
    pod["metadata"]["annotations"] = {"connection-sidecar.io/proxy-env": "false"}
    out = inject(pod, Settings())
    assert out.result == podlib.INJECTED
    assert "env" not in by_name(out.pod)["app"]


def test_config_map_from_annotation_or_settings() -> None:
    pod = make_pod()
    out = inject(pod, Settings(config_map="default-cm"))
    assert out.pod["spec"]["volumes"][0] == {
        "name": "connection-sidecar-config", "configMap": {"name": "default-cm"}}
    sidecar = by_name(out.pod)[CONTAINER]
    assert sidecar["args"] == ["run", "--config", "/etc/sidecar/config.yaml"]
    assert sidecar["volumeMounts"][0] == {
        "name": "connection-sidecar-config", "mountPath": "/etc/sidecar", "readOnly": True}
    pod["metadata"]["annotations"] = {"connection-sidecar.io/config": "mine"}
    out = inject(pod, Settings(config_map="default-cm"))
    assert out.pod["spec"]["volumes"][0]["configMap"] == {"name": "mine"}


def test_drain_timeout_follows_the_pods_grace_period() -> None:
    out = inject(make_pod(terminationGracePeriodSeconds=60), Settings())
    assert by_name(out.pod)[CONTAINER]["lifecycle"]["preStop"]["exec"]["command"][-1] == "55"


def test_users_security_context_and_scrape_annotations_are_kept() -> None:
    pod = make_pod({"name": "app", "image": "a:1", "securityContext": {"runAsUser": 1234}},
                   securityContext={"fsGroup": 2000})  # fmt: skip
    pod["metadata"]["annotations"] = {"prometheus.io/port": "9102", "prometheus.io/scrape": "true"}
    out = inject(pod, Settings())
    assert out.pod["spec"]["securityContext"] == {"fsGroup": 2000}
    assert by_name(out.pod)["app"]["securityContext"] == {"runAsUser": 1234}
    assert out.pod["metadata"]["annotations"] == pod["metadata"]["annotations"]


def test_twice_changes_nothing() -> None:
    for settings in (Settings(), Settings(native=False, config_map="cm")):
        once = inject(make_pod(), settings)
        twice = inject(once.pod, settings)
        assert (twice.result, twice.reason) == (podlib.ALREADY_INJECTED, "unchanged")
        assert twice.pod == once.pod


def test_reinvocation_completes_a_container_added_later() -> None:
    """Another webhook added a container after ours ran: it gets the proxy env; nothing else
    changes (reinvocationPolicy: IfNeeded)."""
    once = inject(make_pod(), Settings()).pod
    later = copy.deepcopy(once)
    later["spec"]["containers"].append({"name": "added", "image": "added:1"})
    again = inject(later, Settings())
    assert (again.result, again.reason) == (podlib.ALREADY_INJECTED, "completed")
    assert env_of(by_name(again.pod)["added"])["HTTP_PROXY"] == PROXY
    assert again.pod["spec"]["initContainers"] == once["spec"]["initContainers"]


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        (make_pod({"name": "sidecar", "image": "theirs:1"}, {"name": "app", "image": "a:1"}),
         "a container is already named 'sidecar'"),
        (make_pod(hostNetwork=True), "hostNetwork: the sidecar's ports would be the node's"),
        (make_pod({"name": "app", "image": "a:1", "ports": [{"containerPort": 15020}]}),
         "a container already uses port 15020"),
        (make_pod(restartPolicy="OnFailure"),
         "a run-to-completion pod (Job) needs the native sidecar, not --classic"),
    ],
    ids=["container-named-sidecar", "host-network", "port-taken", "classic-job"],
)  # fmt: skip
def test_left_alone_with_the_reason(pod: dict[str, Any], reason: str) -> None:
    out = inject(pod, Settings(native="Job" not in reason))
    assert (out.result, out.reason, out.warn) == (podlib.SKIPPED, reason, True)
    assert out.pod == pod


def test_selection() -> None:
    pod = make_pod()
    assert inject(pod, Settings(), require_opt_in=True).reason == "not opted in"
    pod["metadata"]["annotations"] = {"connection-sidecar.io/inject": "true"}
    assert inject(pod, Settings(), require_opt_in=True).result == podlib.INJECTED
    pod["metadata"]["annotations"] = {"connection-sidecar.io/inject": "false"}
    for require in (True, False):  # a pod's "false" always wins
        out = inject(pod, Settings(), require_opt_in=require)
        assert out.result == podlib.SKIPPED and out.pod == pod


@pytest.mark.parametrize(
    "pod",
    [
        {"metadata": {}, "spec": {"containers": "app"}},
        {"metadata": {}, "spec": {"containers": [{"image": "no-name"}]}},
        {"metadata": {}, "spec": {"containers": []}},
        {"metadata": {"annotations": ["x"]}, "spec": {"containers": [{"name": "a"}]}},
        {"metadata": {}},
        {"metadata": {}, "spec": {"containers": [{"name": "a", "env": "X=1"}]}},
    ],
)
def test_unreadable_pods_raise_unsupported(pod: dict[str, Any]) -> None:
    with pytest.raises(podlib.Unsupported):
        inject(pod, Settings())


def test_settings_from_values_and_flags() -> None:
    values = {
        "image": {"repository": "reg.local/sidecar", "tag": "9.9", "pullPolicy": "Never"},
        "nativeSidecar": False,
        "probes": {"startup": {"periodSeconds": 2, "failureThreshold": 30}},
        "config": {"status": {"address": "0.0.0.0:15021"}},
    }
    settings = Settings.from_values(values)
    assert settings.image == "reg.local/sidecar:9.9" and settings.pull_policy == "Never"
    assert not settings.native and settings.status_port == 15021
    assert settings.probes["liveness"] == Settings().probes["liveness"]  # kept default
    flags = settings.with_overrides(image="other:1", config_map="cm")
    assert (flags.image, flags.config_map, flags.native) == ("other:1", "cm", False)
    assert Settings().with_overrides(classic=True).native is False
