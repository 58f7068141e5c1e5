"""The chart's injector (SPEC section 12, `injector.enabled`), with the real helm: lint,
validation against Kubernetes 1.29 and 1.35, the webhook's certificate and caBundle, the
MutatingWebhookConfiguration's selection and safety settings, the webhook Deployment's
availability and secure defaults, and the example app being optional."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from .helmrun import CHART, NAMESPACE, RELEASE, REPO, Helm

VERSIONS = ("1.29.0", "1.35.0")
INJECTOR = f"{RELEASE}-connection-sidecar-injector"
SERVICE_DNS = f"{INJECTOR}.{NAMESPACE}.svc"
ON = ["injector.enabled=true"]
CERT_MANAGER = [*ON, "injector.certManager.enabled=true"]
ONLY_INJECTOR = [*ON, "app.enabled=false"]
# Custom resources: kubernetes-validate has no schema for them and only warns.
CRDS = {"ServiceMonitor", "PodMonitor", "Certificate", "Issuer"}


def validate(text: str, version: str, tmp_path: Path) -> list[str]:
    path = tmp_path / f"rendered-{version}.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("INFO", "WARN"))]
    crd = tuple(f"kind {kind} with api version" for kind in CRDS)
    unexpected = [ln for ln in lines if ln.startswith("WARN") and not any(c in ln for c in crd)]
    assert proc.returncode == 0 and not errors and not unexpected, "\n".join(lines)
    return lines


@pytest.mark.parametrize("sets", [ON, CERT_MANAGER, ONLY_INJECTOR],
                         ids=["genCA", "cert-manager", "injector-only"])  # fmt: skip
@pytest.mark.parametrize("version", VERSIONS)
def test_renders_valid_kubernetes_objects(
    helm: Helm, sets: list[str], version: str, tmp_path: Path
) -> None:
    rendered = helm.template(sets=sets, kube_version=version)
    lines = validate(rendered.text, version, tmp_path)
    passed = [line for line in lines if line.startswith("INFO") and "passed" in line]
    assert len(passed) == len([d for d in rendered.docs if d["kind"] not in CRDS])


@pytest.mark.parametrize("sets", [ON, CERT_MANAGER, ONLY_INJECTOR],
                         ids=["genCA", "cert-manager", "injector-only"])  # fmt: skip
def test_lint_strict(helm: Helm, sets: list[str]) -> None:
    proc = helm.run("lint", "--strict", str(CHART), *helm.values_args(sets=sets))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_off_by_default(helm: Helm) -> None:
    rendered = helm.template()
    assert "MutatingWebhookConfiguration" not in rendered.kinds()
    assert not [d for d in rendered.docs if d["metadata"]["name"].startswith(INJECTOR)]


def test_certificate_names_the_service_and_chains_to_the_ca_bundle(helm: Helm) -> None:
    rendered = helm.template(sets=ON)
    secret = rendered.one("Secret", f"{INJECTOR}-tls")
    assert secret["type"] == "kubernetes.io/tls"
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    sans = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    names = set(sans.value.get_values_for_type(x509.DNSName))
    service = rendered.one("Service", INJECTOR)
    assert service["metadata"]["namespace"] == NAMESPACE
    assert f"{service['metadata']['name']}.{NAMESPACE}.svc" == SERVICE_DNS
    assert {SERVICE_DNS, f"{SERVICE_DNS}.cluster.local", INJECTOR,
            f"{INJECTOR}.{NAMESPACE}"} <= names  # fmt: skip
    config = rendered.one("MutatingWebhookConfiguration")
    bundles = {w["clientConfig"]["caBundle"] for w in config["webhooks"]}
    assert bundles == {secret["data"]["ca.crt"]}
    ca = x509.load_pem_x509_certificate(base64.b64decode(bundles.pop()))
    cert.verify_directly_issued_by(ca)  # raises if the caBundle did not sign it
    for webhook in config["webhooks"]:
        assert webhook["clientConfig"]["service"]["name"] == service["metadata"]["name"]
        assert webhook["clientConfig"]["service"]["namespace"] == NAMESPACE
        assert webhook["clientConfig"]["service"]["port"] == service["spec"]["ports"][0]["port"]


def test_cert_manager_makes_the_certificate(helm: Helm) -> None:
    rendered = helm.template(sets=CERT_MANAGER)
    assert "Secret" not in rendered.kinds()
    certificate = rendered.one("Certificate")
    assert certificate["spec"]["secretName"] == f"{INJECTOR}-tls"
    assert SERVICE_DNS in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"]["name"] == rendered.one("Issuer")["metadata"]["name"]
    config = rendered.one("MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{certificate['metadata']['name']}"}
    assert all("caBundle" not in w["clientConfig"] for w in config["webhooks"])
    own = helm.template(sets=[*CERT_MANAGER, "injector.certManager.issuerRef.name=corp-ca",
                              "injector.certManager.issuerRef.kind=ClusterIssuer"])  # fmt: skip
    assert "Issuer" not in own.kinds()
    assert own.one("Certificate")["spec"]["issuerRef"] == {
        "name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def test_webhook_configuration_is_safe_and_selects_by_label_or_annotation(helm: Helm) -> None:
    config = helm.template(sets=ON).one("MutatingWebhookConfiguration")
    hooks = {w["name"]: w for w in config["webhooks"]}
    assert set(hooks) == {"namespace.injector.connection-sidecar.io",
                          "pod.injector.connection-sidecar.io"}  # fmt: skip
    for hook in hooks.values():
        assert hook["failurePolicy"] == "Ignore"
        assert hook["sideEffects"] == "None"
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""],
                                  "apiVersions": ["v1"], "resources": ["pods"],
                                  "scope": "Namespaced"}]  # fmt: skip
        excluded = hook["namespaceSelector"]["matchExpressions"][1]
        assert excluded["key"] == "kubernetes.io/metadata.name"
        assert excluded["operator"] == "NotIn"
        assert {NAMESPACE, "kube-system"} <= set(excluded["values"])
    namespace = hooks["namespace.injector.connection-sidecar.io"]
    assert namespace["clientConfig"]["service"]["path"] == "/mutate/namespace"
    assert namespace["namespaceSelector"]["matchExpressions"][0] == {
        "key": "connection-sidecar.io/inject", "operator": "In", "values": ["enabled"]}
    pod = hooks["pod.injector.connection-sidecar.io"]
    assert pod["clientConfig"]["service"]["path"] == "/mutate"
    assert pod["namespaceSelector"]["matchExpressions"][0] == {
        "key": "connection-sidecar.io/inject", "operator": "NotIn", "values": ["enabled"]}
    fail = helm.template(sets=[*ON, "injector.failurePolicy=Fail",
                               "injector.excludedNamespaces={monitoring}"])  # fmt: skip
    for hook in fail.one("MutatingWebhookConfiguration")["webhooks"]:
        assert hook["failurePolicy"] == "Fail"
        assert "monitoring" in hook["namespaceSelector"]["matchExpressions"][1]["values"]


def test_webhook_deployment_two_replicas_pdb_and_secure_defaults(helm: Helm) -> None:
    rendered = helm.template(sets=ON)
    deployment = rendered.one("Deployment", INJECTOR)
    assert deployment["spec"]["replicas"] == 2
    template = deployment["spec"]["template"]
    pdb = rendered.one("PodDisruptionBudget", INJECTOR)
    assert pdb["spec"]["minAvailable"] == 1
    for selector in (pdb["spec"]["selector"]["matchLabels"],
                     rendered.one("Service", INJECTOR)["spec"]["selector"],
                     deployment["spec"]["selector"]["matchLabels"]):  # fmt: skip
        assert selector.items() <= template["metadata"]["labels"].items()
    spec = template["spec"]
    assert spec["automountServiceAccountToken"] is False  # it never calls the API server
    assert spec["securityContext"]["runAsNonRoot"] is True
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["limits"]["memory"]
    assert container["readinessProbe"]["httpGet"] == {"scheme": "HTTPS", "path": "/readyz",
                                                      "port": "https"}  # fmt: skip
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(m["readOnly"] for m in mounts.values())
    assert container["command"] == ["sidecar"] and container["args"][0] == "webhook"
    app = rendered.one("Deployment", f"{RELEASE}-connection-sidecar")
    assert container["image"] == app["spec"]["template"]["spec"]["initContainers"][0]["image"]


def test_webhook_command_line_is_valid(helm: Helm, tmp_path: Path) -> None:
    """The rendered args, run for real with missing files: the CLI takes them (exit 1: cannot
    read the certificate), never rejects them (exit 2: usage)."""
    container = helm.template(sets=[*ON, "injector.configMap=shop-sidecar"]).one(
        "Deployment", INJECTOR)["spec"]["template"]["spec"]["containers"][0]  # fmt: skip
    args = [a.replace("/etc/webhook", str(tmp_path)) for a in container["args"]]
    (tmp_path / "values").mkdir()
    (tmp_path / "values" / "values.yaml").write_text("nativeSidecar: true\n")
    args[args.index("--address") + 1] = "127.0.0.1:0"
    assert args[args.index("--config-map") + 1] == "shop-sidecar"
    proc = subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert proc.returncode == 1 and "usage:" not in proc.stderr, proc.stderr
    assert "tls.crt" in proc.stderr


def test_injector_without_the_example_app(helm: Helm) -> None:
    """A platform team installs only the injector: no example app, and the shared objects
    (config, RBAC, dashboard, monitors) stay available."""
    rendered = helm.template(sets=[*ONLY_INJECTOR, "podMonitor.enabled=true"])
    deployments = [d["metadata"]["name"] for d in rendered.all("Deployment")]
    assert deployments == [INJECTOR]
    kinds = rendered.kinds()
    assert {"Role", "RoleBinding", "ServiceAccount", "PodMonitor",
            "MutatingWebhookConfiguration"} <= kinds  # fmt: skip
    names = [d["metadata"]["name"] for d in rendered.all("ConfigMap")]
    assert f"{RELEASE}-connection-sidecar-dashboard" in names


def test_notes_say_how_to_opt_in(helm: Helm) -> None:
    proc = helm.run("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                    "--set", "injector.enabled=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split("NOTES:", 1)[1].split())
    assert "connection-sidecar.io/inject=enabled" in text
    assert 'connection-sidecar.io/inject: "true"' in text


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["injector.failurePolicy=Sometimes"], "/injector/failurePolicy"),
        (["injector.replicas=0"], "/injector/replicas"),
        (["injector.port=443"], "/injector/port"),
        (["injector.certManager.issuerRef.kind=Vault"], "/injector/certManager/issuerRef/kind"),
        (["injector.bogus=1"], "'bogus' not allowed"),
    ],
)
def test_schema_rejects_bad_injector_values(helm: Helm, sets: list[str], fragment: str) -> None:
    proc = helm.template_proc(sets=sets)
    assert proc.returncode != 0
    assert fragment in proc.stderr, proc.stderr


def test_each_render_is_parseable_yaml(helm: Helm) -> None:
    for sets in (ON, CERT_MANAGER, ONLY_INJECTOR):
        text = helm.template(sets=sets).text
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(text) if d is not None)


def test_the_apps_selectors_never_select_the_injectors_pods(helm: Helm) -> None:
    """The status Service, the monitors and the app's Deployment select the app's pods: an
    injector pod among them would be a scrape target with no status port."""
    rendered = helm.template(sets=[*ON, "serviceMonitor.enabled=true",
                                   "podMonitor.enabled=true"])  # fmt: skip
    injector = rendered.one("Deployment", INJECTOR)["spec"]["template"]["metadata"]["labels"]
    app = rendered.one("Deployment", f"{RELEASE}-connection-sidecar")
    selectors = [
        app["spec"]["selector"]["matchLabels"],
        rendered.one("Service", f"{RELEASE}-connection-sidecar-status")["spec"]["selector"],
        rendered.one("PodMonitor")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= app["spec"]["template"]["metadata"]["labels"].items()
        assert not selector.items() <= injector.items(), selector
    service = rendered.one("Service", INJECTOR)["spec"]["selector"]
    assert not service.items() <= app["spec"]["template"]["metadata"]["labels"].items()
