"""`sidecar inject` (the real command line, in a subprocess) on manifests that look like what
users run (tests/inject/manifests/): the output validates for Kubernetes 1.29 and 1.35, a
second pass changes no byte, comments, key order and untouched documents survive, and input
that is not Kubernetes YAML exits 2 with FILE:LINE."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.helmrun import REPO

from .conftest import MANIFESTS, validate

FILES = sorted(p.name for p in MANIFESTS.glob("*.yaml"))
SIDECAR = "connection-sidecar"


def sidecar_inject(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "inject", *args],
        input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip


def inject_file(path: Path, *args: str) -> str:
    proc = sidecar_inject("-f", str(path), *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    kind = doc["kind"]
    if kind == "List":
        return [t for item in doc["items"] for t in templates(item)]
    if kind == "Pod":
        return [doc]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [doc["spec"]["template"]]
    return []


def names(template: dict[str, Any]) -> list[str]:
    spec = template["spec"]
    return [c["name"] for c in [*spec.get("initContainers", []), *spec["containers"]]]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("mode", ["native", "classic"])
def test_injected_manifests_validate_and_a_second_pass_is_a_no_op(
    name: str, mode: str, tmp_path: Path
) -> None:
    flags = ["--classic"] if mode == "classic" else []
    source = MANIFESTS / name
    once = inject_file(source, *flags)
    docs = [d for d in yaml.safe_load_all(once) if d]
    originals = [d for d in yaml.safe_load_all(source.read_text()) if d]
    assert [d["kind"] for d in docs] == [d["kind"] for d in originals]
    validate(docs, tmp_path)

    for doc, original in zip(docs, originals, strict=True):
        for template, before in zip(templates(doc), templates(original), strict=True):
            opted_out = ((before.get("metadata") or {}).get("annotations") or {}).get(
                "connection-sidecar.io/inject") == "false"  # fmt: skip
            # --classic leaves Jobs alone: a classic sidecar would keep their pods running.
            runs_to_completion = before["spec"].get("restartPolicy") in ("Never", "OnFailure")
            if opted_out or (mode == "classic" and runs_to_completion):
                assert template == before
                continue
            assert names(template).count(SIDECAR) == 1, names(template)
            first = (template["spec"]["initContainers"] if mode == "native"
                     else template["spec"]["containers"])[0]  # fmt: skip
            assert first["name"] == SIDECAR
        if not templates(original):
            assert doc == original  # other kinds pass through untouched

    path = tmp_path / name
    path.write_text(once)
    assert inject_file(path, *flags) == once  # idempotent, byte for byte


def test_comments_order_and_untouched_documents_survive() -> None:
    source = (MANIFESTS / "shop-stack.yaml").read_text()
    out = inject_file(MANIFESTS / "shop-stack.yaml")
    for line in source.splitlines():
        if "#" in line:
            assert line in out, f"lost: {line!r}"
    # The ConfigMap and the Service are written back byte for byte (flow style and all).
    head = source.split("\napiVersion: apps/v1\nkind: Deployment\n")[0]
    assert out.startswith(head)
    # The Deployment's own keys keep their order; ours come where Kubernetes people put them.
    deployment = yaml.safe_load_all(out)
    shop = [d for d in deployment if d and d["kind"] == "Deployment"][0]
    spec = shop["spec"]["template"]["spec"]
    assert list(spec) == ["terminationGracePeriodSeconds", "initContainers", "containers",
                          "volumes"]  # fmt: skip
    assert spec["initContainers"][0]["args"] == ["run", "--config", "/etc/sidecar/config.yaml"]
    assert spec["volumes"][0] == {"name": "connection-sidecar-config",
                                  "configMap": {"name": "shop-sidecar"}}  # the annotation's
    assert spec["initContainers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "25"


def test_the_users_yaml_style_is_kept() -> None:
    """kubectl's style (list items at their key's column) stays kubectl's; indented lists stay
    indented."""
    flat = inject_file(MANIFESTS / "report-cronjob.yaml")
    assert "\n          initContainers:\n          - name: connection-sidecar\n" in flat
    indented = inject_file(MANIFESTS / "payments-deployment.yaml")
    assert "\n      initContainers:\n        - name: connection-sidecar\n" in indented
    assert "        - name: migrate\n" in indented  # the user's init container, after ours


def test_user_settings_survive(tmp_path: Path) -> None:
    out = yaml.safe_load(inject_file(MANIFESTS / "payments-deployment.yaml"))
    spec = out["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [SIDECAR, "migrate"]
    by = {c["name"]: c for c in spec["containers"]}
    env = {e["name"]: e.get("value") for e in by["metrics-exporter"]["env"]}
    assert env["HTTP_PROXY"] == "http://proxy.corp.example:3128" and "http_proxy" not in env
    api = {e["name"]: e.get("value") for e in by["api"]["env"]}
    assert api["HTTP_PROXY"] == api["http_proxy"] == "http://127.0.0.1:15001"
    assert by["api"]["readinessProbe"] == {"httpGet": {"path": "/ready", "port": "http"},
                                           "periodSeconds": 5}  # fmt: skip
    # The pod's 45 s grace period: the drain gets 40.
    assert spec["initContainers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "40"
    cron = yaml.safe_load(inject_file(MANIFESTS / "report-cronjob.yaml"))
    report = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in report["env"]}
    assert env["no_proxy"] == ".svc,.cluster.local" and "NO_PROXY" not in env


def test_flags_and_values_file(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("image: {repository: reg.local/sidecar, tag: '7.7.7'}\n"
                      "resources: {requests: {cpu: 5m}}\n")  # fmt: skip
    out = yaml.safe_load(inject_file(MANIFESTS / "payments-deployment.yaml", "--values",
                                     str(values), "--config-map", "payments-sidecar"))  # fmt: skip
    sidecar = out["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["image"] == "reg.local/sidecar:7.7.7"
    assert sidecar["resources"] == {"requests": {"cpu": "5m"}}
    out = yaml.safe_load(inject_file(MANIFESTS / "payments-deployment.yaml", "--image", "x:1"))
    assert out["spec"]["template"]["spec"]["initContainers"][0]["image"] == "x:1"


def test_stdin_to_stdout_and_reports_on_stderr() -> None:
    source = (MANIFESTS / "kinds.yaml").read_text()
    proc = sidecar_inject(stdin=source)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == inject_file(MANIFESTS / "kinds.yaml")
    assert "<stdin>: Deployment/opted-out: skipped (annotated connection-sidecar.io/inject" in (
        proc.stderr)  # fmt: skip
    assert "<stdin>: StatefulSet/ledger: injected (native sidecar)" in proc.stderr
    assert "Ingress" not in proc.stderr


def test_a_pod_with_a_container_named_sidecar_is_left_alone_with_the_reason() -> None:
    source = ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n"
              "  - {name: sidecar, image: theirs:1}\n  - {name: app, image: app:1}\n")  # fmt: skip
    proc = sidecar_inject(stdin=source)
    assert proc.returncode == 0 and proc.stdout == source
    assert "Pod/p: skipped (a container is already named 'sidecar')" in proc.stderr


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("apiVersion: v1\nkind: Service\nmetadata: {name: [\n", 4, "not YAML"),
        ("kind: Service\n---\nkind: Pod\nspec:\n\t- tab\n", 5, "not YAML"),
        ("---\nkind: Service\n---\njust some words\n", 4, "not a Kubernetes object"),
    ],
)
def test_input_that_is_not_kubernetes_yaml_exits_2(text: str, line: int, message: str,
                                                   tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = sidecar_inject("-f", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"{path}:{line}: {message}"), proc.stderr


def test_an_unreadable_pod_is_left_unchanged_and_said() -> None:
    source = "apiVersion: v1\nkind: Pod\nmetadata: {name: odd}\nspec:\n  containers: nope\n"
    proc = sidecar_inject(stdin=source)
    assert proc.returncode == 0 and proc.stdout == source
    assert "Pod/odd: error (left unchanged: spec.containers is not a list" in proc.stderr


def test_sidecar_run_does_not_load_the_injection_libraries() -> None:
    """ruamel.yaml and jsonpatch are for `sidecar inject` / `sidecar webhook` only."""
    code = ("import sys, sidecar.cli, sidecar.app; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ruamel', 'jsonpatch') or m.startswith('sidecar.inject')))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
