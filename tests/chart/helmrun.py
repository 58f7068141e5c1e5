"""Running the real helm and kubernetes-validate for the chart tests: renders cached per
(values, flags, kube version), validation that tolerates only the CRD kinds' missing schemas."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm"
VALUES_DIR = Path(__file__).resolve().parent / "values"
GET_HELM = REPO / "scripts" / "get-helm.py"
RELEASE = "demo"
NAMESPACE = "shop-frontend"

# Prometheus Operator kinds: kubernetes-validate has no schema for CRDs and only warns.
CUSTOM_KINDS = ("ServiceMonitor", "PodMonitor")
CUSTOM_API = "monitoring.coreos.com/v1"


@dataclass
class Rendered:
    """One `helm template` output: the text and its documents."""

    text: str
    docs: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    def kinds(self) -> set[str]:
        return {d["kind"] for d in self.docs}


@dataclass
class Helm:
    binary: str
    env: dict[str, str]
    _cache: dict[tuple[Any, ...], Rendered] = field(default_factory=dict)

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.binary, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    @staticmethod
    def values_args(values: Sequence[str] = (), sets: Sequence[str] = ()) -> list[str]:
        args: list[str] = []
        for name in values:
            args += ["-f", str(VALUES_DIR / name)]
        for item in sets:
            args += ["--set", item]
        return args

    def template_proc(
        self,
        values: Sequence[str] = (),
        sets: Sequence[str] = (),
        kube_version: str | None = None,
        extra: Sequence[str] = (),
        chart: Path = CHART,
    ) -> subprocess.CompletedProcess[str]:
        args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE]
        args += self.values_args(values, sets)
        if kube_version:
            args += ["--kube-version", kube_version]
        return self.run(*args, *extra)

    def template(
        self,
        values: Sequence[str] = (),
        sets: Sequence[str] = (),
        kube_version: str | None = None,
        chart: Path = CHART,
    ) -> Rendered:
        key = (tuple(values), tuple(sets), kube_version, str(chart))
        if key not in self._cache:
            proc = self.template_proc(values, sets, kube_version, chart=chart)
            if proc.returncode != 0:
                pytest.fail(f"helm template {key} failed:\n{proc.stderr}")
            docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
            self._cache[key] = Rendered(proc.stdout, docs)
        return self._cache[key]


def kubernetes_validate(text: str, version: str, tmp_path: Path) -> list[str]:
    """Run the kubernetes-validate CLI (--strict) over a rendered stream; fail on any error,
    and on any warning except the missing schemas of Prometheus Operator kinds."""
    path = tmp_path / f"rendered-{version}.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("INFO", "WARN"))]
    warnings = [line for line in lines if line.startswith("WARN")]
    expected = tuple(f"kind {kind} with api version {CUSTOM_API} " for kind in CUSTOM_KINDS)
    unexpected = [w for w in warnings if not any(e in w for e in expected)]
    assert proc.returncode == 0 and not errors and not unexpected, "\n".join(lines)
    return lines
