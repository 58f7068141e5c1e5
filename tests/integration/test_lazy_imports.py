"""What a running sidecar has imported (issue 17: the per-pod memory footprint).

`sidecar run` must not load what its config never uses: the Kubernetes client, the injector
and its YAML libraries, the metrics library before anyone scrapes. Each costs RSS in every pod
of the fleet. The child interpreter runs the real entry point (`sidecar.cli.main(["run",
...])`); a thread in it waits for /readyz over a raw socket (the `socket` module is loaded
anyway), copies `sys.modules`, scrapes /metrics once (the lazy path must load prometheus-client
then, and answer), copies `sys.modules` again and sends SIGTERM: the sidecar drains and exits.
Not a timed test, nor an RSS threshold: bench/memory.py measures the bytes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.harness import LOOPS, free_port
from tests.k8s.fake_apiserver import FakeApiServer

ROOT = Path(__file__).resolve().parents[2]

# Never loaded by `sidecar run` with the embedded default, ready and idle.
NEVER = (
    "kubernetes_asyncio",  # only with a kubeconfig (a sidecar outside a pod)
    "sidecar.discovery.kubernetes",  # only with a `kubernetes` cluster
    "sidecar.discovery.kubeapi",
    "sidecar.inject",  # `sidecar inject` / `sidecar webhook` only
    "ruamel",
    "jsonpatch",
    "prometheus_client",  # at the first scrape
    "sidecar.observe.metrics",
)

CHILD = textwrap.dedent("""
    import json, os, signal, socket, sys, threading, time

    status_port, out = int(sys.argv[1]), sys.argv[2]
    seen = {}

    def get(path):
        with socket.create_connection(("127.0.0.1", status_port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\n"
                      "Connection: close\\r\\n\\r\\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    def watch():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if get("/readyz").startswith(b"HTTP/1.1 200"):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        seen["ready"] = sorted(sys.modules)
        seen["metrics_status"] = get("/metrics").split(b"\\r\\n", 1)[0].decode()
        seen["after_scrape"] = sorted(sys.modules)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    from sidecar.cli import main
    code = main(sys.argv[3:])
    with open(out, "w") as f:
        json.dump({"code": code, **seen}, f)
""")


async def _run(tmp_path: Path, config: dict[str, Any], status: int, loop: str,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run CHILD (`sidecar run` with `config`) to its exit; what it saw."""
    path = tmp_path / "sidecar.yaml"
    # A short drain, so that the child's SIGTERM ends it at once.
    path.write_text(json.dumps({**config, "drain": {"grace": "1s", "accept_period": "0s"}}))
    out = tmp_path / "modules.json"
    full = {k: v for k, v in os.environ.items()
            if not k.startswith("KUBERNETES_") and k != "SIDECAR_CONFIG"}
    full.update(env or {}, PYTHONPATH=str(ROOT))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(status), str(out),
        "run", "--config", str(path), "--loop", loop, "--log-format", "text",
        cwd=tmp_path, env=full, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(child.communicate(), 60)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0, stderr.decode()[-2000:]
    seen: dict[str, Any] = json.loads(out.read_text())
    assert seen["code"] == 0
    assert "sidecar.app" in seen["ready"]  # it did run
    return seen


def _loaded(modules: list[str], never: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules for n in never if m == n or m.startswith(n + "."))


def _default(admin: int, status: int) -> dict[str, Any]:
    """The embedded default (SPEC section 4), at free ports."""
    return {
        "admin": {"address": f"127.0.0.1:{admin}"},
        "status": {"address": f"127.0.0.1:{status}"},
        "listeners": [{"name": "egress", "address": f"127.0.0.1:{free_port()}",
                       "forward_proxy": {"enabled": True, "allowed_hosts": ["*"],
                                         "connect": True}}],
    }


@pytest.mark.parametrize("loop", LOOPS)
def test_default_config_loads_only_what_it_uses(tmp_path: Path, loop: str) -> None:
    admin, status = free_port(), free_port()
    seen = asyncio.run(_run(tmp_path, _default(admin, status), status, loop))
    loaded = _loaded(seen["ready"], NEVER)
    assert loaded == [], f"loaded by `sidecar run` with the default config: {loaded}"
    # The lazy path works: the first scrape loads the metrics library and answers.
    assert seen["metrics_status"] == "HTTP/1.1 200 OK"
    assert "prometheus_client" in set(seen["after_scrape"])


def test_kubernetes_cluster_in_a_pod_loads_no_kubernetes_client(tmp_path: Path) -> None:
    """A `kubernetes` cluster authenticated in-cluster (service-account files, as in a pod)
    talks to the API through aiohttp, which the admin server loads anyway: kubernetes-asyncio
    (about 40 MiB of generated models) is only for a kubeconfig, outside a pod."""

    async def scenario() -> dict[str, Any]:
        async with FakeApiServer(tmp_path / "apiserver") as fake:
            fake.put_slice("ns", {
                "metadata": {"name": "svc-0", "labels": {"kubernetes.io/service-name": "svc"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["127.0.9.1"], "conditions": {"ready": True}}],
            })
            admin, status = free_port(), free_port()
            config = _default(admin, status)
            config["clusters"] = [{"name": "svc", "discovery": {
                "type": "kubernetes", "service": "svc", "namespace": "ns", "port": "http"}}]
            env = {**fake.env(), "POD_NAMESPACE": "ns",
                   "SIDECAR_SERVICEACCOUNT_DIR": str(fake.workdir)}
            return await _run(tmp_path, config, status, "uvloop", env)

    seen = asyncio.run(scenario())
    modules = set(seen["ready"])
    assert "sidecar.discovery.kubernetes" in modules  # the cluster's resolver ran
    never = tuple(n for n in NEVER if not n.startswith("sidecar.discovery.kube"))
    loaded = _loaded(seen["ready"], never)
    assert loaded == [], f"loaded with one in-cluster kubernetes cluster: {loaded}"
