"""`sidecar webhook` as the API server meets it: the real process, HTTPS with the certificate
the chart renders (verified against the MutatingWebhookConfiguration's caBundle for the
Service's DNS name, as the API server does), AdmissionReview v1 requests for several pod
shapes, the returned JSONPatch applied with `jsonpatch`, every resulting pod validated with
kubernetes-validate --strict for 1.29 and 1.35. Nothing is mocked but the API server itself
(none can run here): its request is built by hand, as TESTING.md describes."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.chart.helmrun import CHART, Helm
from tests.harness import free_port

from .conftest import as_pod, validate

NAMESPACE = "shop"
SERVICE = "demo-connection-sidecar-injector"
SERVICE_DNS = f"{SERVICE}.{NAMESPACE}.svc"  # what the API server verifies
STARTUP = 20.0  # seconds the webhook may take to answer /healthz


class ServiceConnection(http.client.HTTPSConnection):
    """TCP to 127.0.0.1, TLS verified for the Service's DNS name (the API server connects to
    the Service and checks the certificate against `<service>.<namespace>.svc`)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, context=context, timeout=10)
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=SERVICE_DNS)


@dataclass
class Webhook:
    proc: subprocess.Popen[bytes]
    port: int
    context: ssl.SSLContext
    log: Path

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = ServiceConnection(self.port, self.context)
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json"} if body else {})  # fmt: skip
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def review(self, pod: Any, path: str = "/mutate", **request: Any) -> dict[str, Any]:
        uid = str(uuid.uuid4())
        body = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": NAMESPACE,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod,
                "oldObject": None,
                "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
                **request,
            },
        }
        status, raw = self.request("POST", path, json.dumps(body).encode())
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == uid and answer["response"]["allowed"] is True
        return dict(answer["response"])

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        status, raw = self.request("GET", "/metrics")
        assert status == 200
        return {
            sample.labels["result"]: sample.value
            for family in text_string_to_metric_families(raw.decode())
            for sample in family.samples
            if sample.name == "sidecar_injections_total"
        }


def patched(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """The pod after the API server applies the response's JSONPatch."""
    if "patch" not in response:
        return pod
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return dict(jsonpatch.apply_patch(pod, ops))


@dataclass
class Rendered:
    docs: list[dict[str, Any]]

    def one(self, kind: str, suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.docs
                 if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]  # fmt: skip
        assert len(found) == 1, (kind, suffix, len(found))
        return found[0]


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> Rendered:
    proc = helm.run("template", "demo", str(CHART), "-n", NAMESPACE,
                    "--set", "injector.enabled=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return Rendered([d for d in yaml.safe_load_all(proc.stdout) if d])


def start_webhook(rendered: Rendered, workdir: Path, *extra: str) -> Webhook:
    """The webhook process with the chart's Secret and values files, as its pod mounts them."""
    secret = rendered.one("Secret", "-injector-tls")["data"]
    for key in ("tls.crt", "tls.key"):
        (workdir / key).write_bytes(base64.b64decode(secret[key]))
    values = rendered.one("ConfigMap", "-injector")["data"]["values.yaml"]
    (workdir / "values.yaml").write_text(values)
    config = rendered.one("MutatingWebhookConfiguration")
    bundle = {base64.b64decode(w["clientConfig"]["caBundle"]) for w in config["webhooks"]}
    assert len(bundle) == 1
    context = ssl.create_default_context(cadata=bundle.pop().decode())
    port = free_port()
    log = workdir / "webhook.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "webhook", "--cert", str(workdir / "tls.crt"),
             "--key", str(workdir / "tls.key"), "--address", f"127.0.0.1:{port}",
             "--values", str(workdir / "values.yaml"), *extra],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    hook = Webhook(proc, port, context, log)
    deadline = time.monotonic() + STARTUP
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if hook.request("GET", "/healthz")[0] == 200:
                return hook
        except OSError:
            pass
        assert time.monotonic() < deadline, "the webhook never answered:\n" + log.read_text()
        time.sleep(0.1)


def stop(hook: Webhook) -> int | None:
    if hook.proc.poll() is None:
        hook.proc.send_signal(signal.SIGTERM)
    try:
        return hook.proc.wait(15)
    except subprocess.TimeoutExpired:
        hook.proc.kill()
        hook.proc.wait(5)
        return None


@pytest.fixture(scope="module")
def webhook(rendered: Rendered, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    hook = start_webhook(rendered, tmp_path_factory.mktemp("webhook"), "--shutdown-delay", "0")
    try:
        yield hook
    finally:
        assert stop(hook) == 0, hook.log.read_text()


def pod(*containers: dict[str, Any], annotations: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:  # fmt: skip
    """A pod as a ReplicaSet controller creates it: generateName, no name yet."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "shop-7d9f8c6b5-",
            "namespace": NAMESPACE,
            "labels": {"app": "shop", "pod-template-hash": "7d9f8c6b5"},
            "annotations": {"connection-sidecar.io/inject": "true", **(annotations or {})},
        },
        "spec": {
            "containers": list(containers) or [{"name": "app", "image": "shop:1"}],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            **spec,
        },
    }


SHAPES: dict[str, dict[str, Any]] = {
    "two-containers": pod(
        {"name": "web", "image": "registry.example.com/web:1", "ports": [{"containerPort": 8080}]},
        {"name": "worker", "image": "registry.example.com/worker:1"},
    ),
    "init-containers": pod(
        {"name": "app", "image": "app:1"},
        initContainers=[{"name": "migrate", "image": "migrate:1"},
                        {"name": "seed", "image": "seed:1"}],
    ),
    "own-proxy-env": pod(
        {"name": "app", "image": "app:1", "env": [
            {"name": "HTTP_PROXY", "value": "http://corp-proxy:3128"},
            {"name": "DB_URL", "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}}},
        ]},
    ),
    "security-contexts": pod(
        {"name": "app", "image": "app:1", "securityContext": {
            "runAsUser": 4242, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}},
        securityContext={"runAsNonRoot": True, "fsGroup": 4242,
                         "seccompProfile": {"type": "RuntimeDefault"}},
    ),
    "config-annotation": pod(annotations={"connection-sidecar.io/config": "shop-sidecar"}),
}  # fmt: skip


def names(p: dict[str, Any]) -> list[str]:
    return [c["name"] for c in [*p["spec"].get("initContainers", []), *p["spec"]["containers"]]]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_pod_shapes_are_injected_and_valid(webhook: Webhook, tmp_path: Path) -> None:
    results: list[dict[str, Any]] = []
    for name, shape in SHAPES.items():
        before = copy.deepcopy(shape)
        response = webhook.review(shape)
        assert "warnings" not in response, response
        after = patched(before, response)
        assert after["spec"]["initContainers"][0]["name"] == "connection-sidecar", name
        assert names(after).count("connection-sidecar") == 1
        assert names(after)[1:] == names(before), name  # the user's containers, in order
        results.append(as_pod(after, f"shop-{name}"))

        again = webhook.review(after)  # reinvocation / a second webhook pass: nothing to do
        assert "patch" not in again, (name, again)
    validate(results, tmp_path)

    two, init, own, secure, config = (r["spec"] for r in results)
    assert [c["name"] for c in init["initContainers"]] == ["connection-sidecar", "migrate", "seed"]
    for container in two["containers"]:
        assert env_of(container)["HTTP_PROXY"] == "http://127.0.0.1:15001"
    app = env_of(own["containers"][0])
    assert app["HTTP_PROXY"] == "http://corp-proxy:3128" and "http_proxy" not in app
    assert app["NO_PROXY"] == "localhost,127.0.0.1,::1"
    assert secure["securityContext"]["fsGroup"] == 4242
    assert secure["containers"][0]["securityContext"]["capabilities"]["add"] == [
        "NET_BIND_SERVICE"]
    assert secure["initContainers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "connection-sidecar-config", "configMap": {"name": "shop-sidecar"}} in (
        config["volumes"])  # fmt: skip


def test_the_webhook_injects_the_charts_container(webhook: Webhook, rendered: Rendered) -> None:
    """The chart's example app pod and a pod injected by the chart's webhook get the same
    sidecar container (the webhook reads the chart's values from its ConfigMap)."""
    chart_pod = rendered.one("Deployment", "connection-sidecar")["spec"]["template"]["spec"]
    chart_sidecar = chart_pod["initContainers"][0]
    config_map = rendered.one("ConfigMap", "connection-sidecar")["metadata"]["name"]
    shape = pod(annotations={"connection-sidecar.io/config": config_map})
    after = patched(copy.deepcopy(shape), webhook.review(shape))
    assert after["spec"]["initContainers"][0] == chart_sidecar
    chart_volumes = [v for v in chart_pod["volumes"] if v["name"].startswith("connection-")]
    assert after["spec"]["volumes"] == chart_volumes


def test_left_alone(webhook: Webhook) -> None:
    before = webhook.metrics()
    # A container named sidecar: someone else's; allowed, unchanged, said.
    foreign = pod({"name": "sidecar", "image": "theirs:1"}, {"name": "app", "image": "app:1"})
    response = webhook.review(foreign)
    assert "patch" not in response
    assert response["warnings"] == [
        "connection-sidecar: not injected: a container is already named 'sidecar'"]
    # Opted out: "false" wins, also in a namespace that opted in.
    out = pod(annotations={"connection-sidecar.io/inject": "false"})
    for path in ("/mutate", "/mutate/namespace"):
        response = webhook.review(out, path)
        assert "patch" not in response and "warnings" not in response
    # Not opted in: only the namespace path injects it.
    plain = pod()
    del plain["metadata"]["annotations"]
    assert "patch" not in webhook.review(plain, "/mutate")
    assert "patch" in webhook.review(plain, "/mutate/namespace")
    # Not a pod creation: passed through.
    assert "patch" not in webhook.review(pod(), operation="UPDATE")
    assert "patch" not in webhook.review(pod(), subResource="ephemeralcontainers")
    after = webhook.metrics()
    assert after["skipped"] - before["skipped"] == 4
    assert after["injected"] - before["injected"] == 1


@pytest.mark.parametrize(
    "broken",
    [
        {"metadata": {"annotations": {"connection-sidecar.io/inject": "true"}},
         "spec": {"containers": "app"}},
        {"metadata": {"annotations": {"connection-sidecar.io/inject": "true"}}, "spec": None},
        ["not", "a", "pod"],
        None,
        {"metadata": {"annotations": {"connection-sidecar.io/inject": "true"}},
         "spec": {"containers": [{"name": "app", "env": {"HTTP_PROXY": "x"}}]}},
    ],
    ids=["containers-not-a-list", "no-spec", "a-list", "null", "env-not-a-list"],
)  # fmt: skip
def test_a_pod_it_cannot_understand_is_allowed_unchanged(webhook: Webhook, broken: Any) -> None:
    before = webhook.metrics()
    response = webhook.review(broken)
    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"][0].startswith("connection-sidecar: not injected: ")
    assert webhook.metrics()["error"] - before["error"] == 1


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'"a string"',
        json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                    "request": {"uid": "x"}}).encode(),
        json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
        json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "request": {"object": {}}}).encode(),
    ],
    ids=["not-json", "not-an-object", "v1beta1", "no-request", "no-uid"],
)  # fmt: skip
def test_a_request_it_cannot_read_is_a_400(webhook: Webhook, body: bytes) -> None:
    status, raw = webhook.request("POST", "/mutate", body)
    assert status == 400 and "error" in json.loads(raw), raw
    assert webhook.request("GET", "/healthz")[0] == 200  # still up


def test_metrics_have_every_result_from_the_start(rendered: Rendered, tmp_path: Path) -> None:
    hook = start_webhook(rendered, tmp_path, "--shutdown-delay", "0")
    try:
        assert hook.metrics() == {"injected": 0, "already_injected": 0, "skipped": 0,
                                  "error": 0}  # fmt: skip
    finally:
        assert stop(hook) == 0


def test_sigterm_keeps_answering_while_not_ready_then_exits_0(
    rendered: Rendered, tmp_path: Path
) -> None:
    """The Service's endpoints lag the pod's deletion: after SIGTERM the webhook still
    answers reviews (a refused review is a pod without its sidecar) while /readyz says 503."""
    hook = start_webhook(rendered, tmp_path, "--shutdown-delay", "30")
    try:
        assert hook.request("GET", "/readyz")[0] == 200
        hook.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while hook.request("GET", "/readyz")[0] != 503:
            assert time.monotonic() < deadline, hook.log.read_text()
            time.sleep(0.05)
        assert "patch" in hook.review(pod())
        hook.proc.send_signal(signal.SIGTERM)  # a second signal: stop now
        assert hook.proc.wait(10) == 0, hook.log.read_text()
    finally:
        stop(hook)
    events = [json.loads(line)["event"] for line in hook.log.read_text().splitlines()
              if line.startswith("{")]  # fmt: skip
    assert events[0] == "webhook listening" and "webhook stopped" in events


def test_a_renewed_certificate_is_served_without_a_restart(
    rendered: Rendered, tmp_path: Path
) -> None:
    """cert-manager renews the Secret, the kubelet swaps the mounted files: new handshakes
    get the new certificate (here one from another CA, for the same Service name)."""
    import trustme

    hook = start_webhook(rendered, tmp_path, "--shutdown-delay", "0",
                         "--cert-check-every", "0.1")  # fmt: skip
    try:
        ca = trustme.CA()
        renewed = ca.issue_cert(SERVICE_DNS)
        renewed.private_key_pem.write_to_path(str(tmp_path / "tls.key.new"))
        renewed.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt.new"))
        # The kubelet's atomic swap: each file replaced by a rename, key first.
        (tmp_path / "tls.key.new").replace(tmp_path / "tls.key")
        (tmp_path / "tls.crt.new").replace(tmp_path / "tls.crt")
        hook.context = ssl.create_default_context()
        ca.configure_trust(hook.context)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert hook.request("GET", "/healthz")[0] == 200
                break
            except ssl.SSLCertVerificationError:  # still the old certificate
                assert time.monotonic() < deadline, hook.log.read_text()
                time.sleep(0.1)
        assert "serving certificate reloaded" in hook.log.read_text()
    finally:
        assert stop(hook) == 0, hook.log.read_text()
