"""Fixtures of the injection tests: the chart tests' real helm (scripts/get-helm.py), and
kubernetes-validate over whatever injection produced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.chart.conftest import helm, helm_binary  # noqa: F401 (fixtures, shared)
from tests.chart.helmrun import kubernetes_validate

# The Kubernetes versions every injected object is validated for: the first with native
# sidecars on by default, and the current one.
VERSIONS = ("1.29.0", "1.35.0")
MANIFESTS = Path(__file__).resolve().parent / "manifests"


def as_pod(pod: dict[str, Any], name: str) -> dict[str, Any]:
    """A pod (metadata + spec, as the webhook sees it) as a full v1 Pod object."""
    out = {"apiVersion": "v1", "kind": "Pod", **pod}
    out["metadata"] = {**(pod.get("metadata") or {}), "name": name}
    out["metadata"].pop("generateName", None)
    return out


def validate(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """kubernetes-validate --strict, for each of VERSIONS: every document passes, no warning.
    A `kind: List` is validated item by item (there is no schema for List)."""
    flat: list[dict[str, Any]] = []
    for doc in docs:
        flat.extend(doc["items"] if doc.get("kind") == "List" else [doc])
    text = yaml.safe_dump_all(flat, sort_keys=False)
    for version in VERSIONS:
        lines = kubernetes_validate(text, version, tmp_path)
        passed = [line for line in lines if line.startswith("INFO") and "passed" in line]
        assert len(passed) == len(flat), "\n".join(lines)
