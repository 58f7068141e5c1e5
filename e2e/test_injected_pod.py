"""Pod simulation of a pod that `sidecar inject` made, not our chart: a user's multi-document
manifest (tests/inject/manifests/shop-stack.yaml: their ConfigMap with the sidecar config,
their Service, their Deployment with an app container) piped through the real `sidecar
inject` command, and the injected pod template run through start, steady load and termination
exactly as e2e/test_pod_simulation.py runs the chart's pod (same kubelet emulation, same
assertions: 0 failed app requests, a drain that aborts nothing, exit 0 before the grace
period, readiness 503 during the drain).

Emulated as there: the kubelet, the pod's network namespace (ports renumbered), the downward
API, and the app's command (e2e/podsim_app.py with the injected env; TARGET_URL pointed at
a local upstream)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from e2e.rendered import Pod
from e2e.test_pod_simulation import simulate_pod_life
from tests.chart.helmrun import REPO

MANIFEST = REPO / "tests" / "inject" / "manifests" / "shop-stack.yaml"


def injected_pod(*flags: str) -> Pod:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "inject", "-f", str(MANIFEST), *flags],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    return Pod(deployment["spec"]["template"]["spec"], config_maps)


@pytest.mark.parametrize("mode", ["native", "classic"])
def test_injected_pod_start_and_termination_lose_no_request(mode: str, tmp_path: Path) -> None:
    pod = injected_pod(*(["--classic"] if mode == "classic" else []))
    assert pod.native is (mode == "native")
    # What injection gave the user's pod, before it runs: their config, their grace period.
    assert pod.sidecar_config()[1]["drain"]["accept_period"] == "3s"
    assert pod.sidecar["lifecycle"]["preStop"]["exec"]["command"][-1] == "25"
    assert Pod.env_of(pod.app)["HTTP_PROXY"] == "http://127.0.0.1:15001"
    simulate_pod_life(pod, mode, tmp_path)
