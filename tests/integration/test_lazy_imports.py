"""What a running sidecar has imported (issue 17: the per-pod memory footprint).

`sidecar run` with the embedded default (only its addresses moved to free ports) must not load
what that config never uses: the Kubernetes client, the injector and its YAML libraries, the
metrics library before anyone scrapes, the command line's HTTP client. Each costs RSS in every
pod of the fleet. The child interpreter runs the real entry point (`sidecar.cli.main(["run",
...])`); a thread in it waits for /readyz over a raw socket (the `socket` module is loaded
anyway), copies `sys.modules`, sends it SIGTERM and the sidecar drains and exits. Then the
same child scrapes /metrics once, so the lazy path is seen to load prometheus-client when asked.
Not a timed test, nor an RSS threshold: bench/memory.py measures the bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness import LOOPS, free_port

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


@pytest.mark.parametrize("loop", LOOPS)
def test_default_config_loads_only_what_it_uses(tmp_path: Path, loop: str) -> None:
    admin, status, egress = free_port(), free_port(), free_port()
    config = tmp_path / "sidecar.yaml"
    # The embedded default (SPEC section 4) at free ports; a short drain so that SIGTERM ends it.
    config.write_text(json.dumps({
        "admin": {"address": f"127.0.0.1:{admin}"},
        "status": {"address": f"127.0.0.1:{status}"},
        "listeners": [{"name": "egress", "address": f"127.0.0.1:{egress}",
                       "forward_proxy": {"enabled": True, "allowed_hosts": ["*"],
                                         "connect": True}}],
        "drain": {"grace": "1s", "accept_period": "0s"},
    }))
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SIDECAR_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(status), str(out),
         "run", "--config", str(config), "--loop", loop, "--log-format", "text"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(out.read_text())
    assert seen["code"] == 0
    ready = set(seen["ready"])
    assert "sidecar.app" in ready and "sidecar.admin.server" in ready  # it did run
    loaded = sorted(m for m in ready for never in NEVER
                    if m == never or m.startswith(never + "."))
    assert loaded == [], f"loaded by `sidecar run` with the default config: {loaded}"
    # The lazy path works: the first scrape loads the metrics library and answers.
    assert seen["metrics_status"] == "HTTP/1.1 200 OK"
    assert "prometheus_client" in set(seen["after_scrape"])
