"""The kubelet's side of the pod contract, emulated with processes on 127.0.0.1: containers
started from the rendered command/args/env/volume mounts, httpGet probes with the rendered
timing, exec hooks, SIGTERM and SIGKILL. Every wait is bounded; every process is stopped by its
PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.rendered import Pod, PortMap, assert_only_addresses_changed, localize_config
from e2e.rendered import resolve_command as resolve

# What a container gets from the host: enough to run this Python. Nothing else leaks in (no
# KUBECONFIG, no KUBERNETES_SERVICE_HOST: the sidecar must not find an API server here).
HOST_ENV = ("PATH", "LANG", "LC_ALL", "SYSTEMROOT", "VIRTUAL_ENV", "PYTHONPATH")


def host_env(workdir: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in HOST_ENV if k in os.environ}
    env["HOME"] = str(workdir)
    return env


@dataclass
class Container:
    """A running container: one process, its output in a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def logs(self, tail: int = 20000) -> str:
        text = self.log_path.read_text(errors="replace")
        return text[-tail:] if tail else text

    def signal(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL by PID (the kubelet at the end of the grace period), then reap."""
        if self.running():
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def start_container(name: str, argv: list[str], env: dict[str, str], workdir: Path) -> Container:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Container(name, proc, log_path)


def start_sidecar(
    pod: Pod,
    ports: PortMap,
    workdir: Path,
    endpoints: dict[str, list[str]] | None = None,
    ca_file: Path | None = None,
) -> tuple[Container, dict[str, Any]]:
    """The sidecar container as rendered: its command and args (the ConfigMap's mountPath
    remapped to a temp dir holding the localized config.yaml), its env (downward API faked)."""
    mount, rendered = pod.sidecar_config()
    config = localize_config(rendered, ports, endpoints, ca_file)
    assert_only_addresses_changed(rendered, config)
    volume = workdir / "etc-sidecar"
    volume.mkdir(parents=True, exist_ok=True)
    (volume / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [*pod.sidecar.get("command", []), *pod.sidecar.get("args", [])]
    argv = [str(volume) + a[len(mount):] if a.startswith(mount + "/") else a for a in argv]
    assert str(volume / "config.yaml") in argv, f"the rendered args name no config: {argv}"
    env = {**host_env(workdir), **Pod.env_of(pod.sidecar)}
    return start_container(pod.sidecar["name"], resolve(argv), env, workdir), config


def probe_once(probe: dict[str, Any], ports: PortMap) -> tuple[bool, int | None]:
    """One httpGet probe: success on 200-399 within timeoutSeconds (the kubelet's rule)."""
    get = probe["httpGet"]
    url = f"http://127.0.0.1:{ports.port(int(get['port']))}{get.get('path', '/')}"
    try:
        with urllib.request.urlopen(url, timeout=float(probe.get("timeoutSeconds", 1))) as r:
            return 200 <= r.status < 400, r.status
    except urllib.error.HTTPError as exc:
        return 200 <= exc.code < 400, exc.code
    except OSError:
        return False, None


def run_startup_probe(probe: dict[str, Any], ports: PortMap, container: Container) -> float:
    """Probe every periodSeconds until success; fail after failureThreshold failures (the
    kubelet would kill the container). Returns the seconds it took."""
    period = float(probe.get("periodSeconds", 10))
    threshold = int(probe.get("failureThreshold", 3))
    started = time.monotonic()
    time.sleep(float(probe.get("initialDelaySeconds", 0)))
    failures = 0
    while True:
        if not container.running():
            raise AssertionError(f"{container.name} exited during startup:\n{container.logs()}")
        attempt = time.monotonic()
        ok, _ = probe_once(probe, ports)
        if ok:
            return time.monotonic() - started
        failures += 1
        if failures >= threshold:
            raise AssertionError(
                f"startupProbe failed {failures} times: the kubelet would kill "
                f"{container.name}:\n{container.logs()}"
            )
        time.sleep(max(0.0, period - (time.monotonic() - attempt)))


def run_exec_hook(
    command: list[str], ports: PortMap, env: dict[str, str], workdir: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """An exec hook (preStop, postStart) in the container: pod-local URLs remapped, `sidecar`
    resolved to this Python's console script; killed at `timeout` like the kubelet does."""
    argv = resolve([ports.text(arg) for arg in command])
    return subprocess.run(
        argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=max(timeout, 0.1)
    )


def stop_all(*containers: Container | None) -> None:
    """Cleanup, pass or fail: SIGKILL what still runs, by PID."""
    for container in containers:
        if container is not None:
            container.kill()


def sigterm_then_kill(container: Container, deadline: float) -> tuple[int | None, bool]:
    """SIGTERM; wait until `deadline` (the pod's grace period); SIGKILL after it.
    Returns (exit code, killed)."""
    container.signal(signal.SIGTERM)
    code = container.wait(deadline - time.monotonic())
    if code is None:
        container.kill()
        return container.proc.returncode, True
    return code, False
