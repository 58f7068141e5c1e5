"""Fixtures of the e2e tier: the real helm (the chart tests' fetcher and runner), rendering the
chart in the e2e values files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.chart.helmrun import GET_HELM, Helm


@pytest.fixture(scope="session")
def e2e_helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    """The real helm from scripts/get-helm.py (no skip: a machine without helm fails loudly),
    with private HELM_* homes and no KUBECONFIG: rendering never talks to a cluster."""
    proc = subprocess.run(
        [sys.executable, str(GET_HELM)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/get-helm.py failed ({proc.returncode}):\n{proc.stderr}")
    binary = proc.stdout.strip().splitlines()[-1]
    home = tmp_path_factory.mktemp("e2e-helm-home")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        path = home / var.lower()
        path.mkdir()
        env[var] = str(path)
    env.pop("KUBECONFIG", None)
    yield Helm(binary, env)
