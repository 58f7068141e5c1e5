"""One decision of what is injected, for the chart and for `sidecar inject` / the webhook.

The chart's named template `connection-sidecar.container` (and `.volumes`) must render exactly
what `sidecar.inject.pod.sidecar_container` builds for the same values. Why a comparison and
not a shared generated file: the chart has to keep working with helm alone (a parent chart
includes the template; no Python runs at `helm install`), and the CLI and webhook have to work
with no chart on disk (an installed wheel). A generator from one to the other is a build step
that can be skipped; rendering both here, for values that move every knob, fails on any drift
in either direction, including Helm's own rendering (ints vs strings, key presence).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.inject.pod import Settings, sidecar_container, sidecar_volumes
from tests.chart.helmrun import CHART, VALUES_DIR, Helm

# name -> values merged over values.yaml (files of tests/chart/values, then a mapping)
CASES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "default": ([], {}),
    "classic": (["classic.yaml"], {}),
    "custom-config": (["custom-config.yaml"], {}),
    "knobs": ([], {
        "image": {"repository": "registry.example.com/mirror/sidecar", "tag": "1.2.3",
                  "pullPolicy": "Always"},
        "terminationGracePeriodSeconds": 90,
        "tmpSizeLimit": "128Mi",
        "probes": {"liveness": {"periodSeconds": 7, "failureThreshold": 5},
                   "readiness": {"initialDelaySeconds": 1}},
        "resources": {"requests": {"cpu": "50m"}, "limits": {"cpu": "2", "memory": "1Gi"}},
        "securityContext": {"runAsUser": 20001, "runAsGroup": 20001},
        "extraEnv": [{"name": "SIDECAR_LOG", "value": "debug"}],
        "config": {"admin": {"address": "127.0.0.1:15100"},
                   "status": {"address": "0.0.0.0:15120"}},
    }),
    "classic-knobs": (["classic.yaml"], {"terminationGracePeriodSeconds": 20,
                                         "probes": {"startup": {"failureThreshold": 7}}}),
}  # fmt: skip


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of values: maps merge, anything else replaces, null deletes."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def case_values(case: str, tmp_path: Path) -> tuple[list[str], dict[str, Any]]:
    """(helm -f arguments, the merged values) of a case."""
    files, extra = CASES[case]
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    args: list[str] = []
    for name in files:
        merged = deep_merge(merged, yaml.safe_load((VALUES_DIR / name).read_text()))
        args += ["-f", str(VALUES_DIR / name)]
    if extra:
        path = tmp_path / f"{case}.yaml"
        path.write_text(yaml.safe_dump(extra))
        merged = deep_merge(merged, extra)
        args += ["-f", str(path)]
    return args, merged


def render(helm: Helm, args: list[str], *sets: str) -> list[dict[str, Any]]:
    extra = [item for s in sets for item in ("--set", s)]
    proc = helm.run("template", "demo", str(CHART), "-n", "shop", *args, *extra)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def app_version() -> str:
    return str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


def test_python_defaults_are_the_charts_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert Settings() == Settings.from_values(values, version=app_version())
    assert Settings().image.endswith(":" + app_version())  # sidecar.__version__ == appVersion


@pytest.mark.parametrize("case", CASES)
def test_named_template_renders_what_injection_injects(
    helm: Helm, case: str, tmp_path: Path
) -> None:
    args, values = case_values(case, tmp_path)
    docs = render(helm, args)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    chart_side = [c for c in [*spec.get("initContainers", []), *spec["containers"]]
                  if c["name"] == "connection-sidecar"]  # fmt: skip
    assert len(chart_side) == 1
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_map = volumes["connection-sidecar-config"]["configMap"]["name"]

    settings = Settings.from_values(values, version=app_version())
    ours = sidecar_container(settings, int(values["terminationGracePeriodSeconds"]), config_map)
    assert ours == chart_side[0]
    assert list(ours) == list(chart_side[0])  # the same key order, too
    assert sidecar_volumes(settings, config_map) == [
        v for v in spec["volumes"] if v["name"].startswith("connection-sidecar-")
    ]
    # Where it goes: first init container (native) or first container (classic).
    if settings.native:
        assert spec["initContainers"][0]["name"] == "connection-sidecar"
    else:
        assert spec["containers"][0]["name"] == "connection-sidecar"


@pytest.mark.parametrize("case", CASES)
def test_the_webhook_is_given_the_charts_values(helm: Helm, case: str, tmp_path: Path) -> None:
    """The injector's ConfigMap (`sidecar webhook --values`) carries the sidecar's values, so
    an injected pod gets the chart's container; only the ports differ when the chart's own
    config moves them (an injected pod runs its own config, with the default ports)."""
    args, values = case_values(case, tmp_path)
    docs = render(helm, args, "injector.enabled=true")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith(
        "-injector")]  # fmt: skip
    given = Settings.from_values(yaml.safe_load(cm["data"]["values.yaml"]))
    expected = Settings.from_values(values, version=app_version())
    assert given == replace(expected, status_port=15020, admin_address="127.0.0.1:15000")
