"""Pod simulation: the chart's rendered pod spec drives the real sidecar through a pod's life, with
the kubelet's contract emulated on 127.0.0.1 (e2e/kubelet.py).

From `helm template` (default values; `nativeSidecar=false` for the classic mode) come the
sidecar container's command, args, env, ports, probes, lifecycle hooks, the pod's
terminationGracePeriodSeconds and the ConfigMap; the app container's env. Emulated: the pod's
network namespace (ports renumbered, e2e/rendered.py), the downward API (a fake pod name), the
app's command (e2e/podsim_app.py instead of the example curl loop, keeping the rendered env).

Start. Native: the sidecar starts, the kubelet runs its startupProbe until success, and only
then starts the app. Classic: the sidecar starts first, its postStart hook
(`sidecar wait-ready`) blocks the app's start until it returns.

Stop, the kubelet's order. Native: the app gets SIGTERM first and exits after finishing its
work; then the sidecar's preStop (`sidecar drain`) runs, then its SIGTERM. Classic: the app's
SIGTERM and the sidecar's preStop start together (then the sidecar's SIGTERM once its preStop
returns). In both, SIGKILL at terminationGracePeriodSeconds for whatever still runs.

Asserted: zero failed app requests, from its first request through its shutdown; the sidecar
exits 0 on its own, before the grace period, with nothing aborted; readiness turns 503 during
the drain while liveness never fails long enough for the kubelet to restart the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from e2e.kubelet import (
    Container,
    host_env,
    probe_once,
    run_exec_hook,
    run_startup_probe,
    sigterm_then_kill,
    start_container,
    start_sidecar,
    stop_all,
)
from e2e.rendered import Pod, PortMap
from tests.chart.helmrun import Helm
from tests.harness import ThreadedServer

APP = Path(__file__).resolve().parent / "podsim_app.py"
APP_WORKERS = 3
APP_SHUTDOWN_SECONDS = 2.0  # the app keeps calling out this long after its SIGTERM
RUN_SECONDS = 2.0  # steady traffic before the pod is deleted
UPSTREAM_DELAY = 0.02  # so that requests are in flight when the signals come
PROBE_EVERY = 0.2  # we probe more often than the kubelet: stricter


def upstream(seen: list[float]) -> ThreadedServer:
    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(UPSTREAM_DELAY)
        seen.append(time.monotonic())
        return web.Response(text=f"done {request.path}\n")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return ThreadedServer(app)


def app_env(pod: Pod, ports: PortMap, target: str, workdir: Path) -> dict[str, str]:
    """The app container's rendered env, localized: proxy URLs follow the port map; TARGET_URL
    (example.com in the chart) -> the local upstream; and since that stand-in upstream lives
    on 127.0.0.1, the one NO_PROXY entry that would exempt it is dropped (a real target, like
    the chart's example.com, is not in NO_PROXY)."""
    env = {name: ports.text(value) for name, value in Pod.env_of(pod.app).items()}
    assert env.get("HTTP_PROXY") and "TARGET_URL" in env, env
    env["TARGET_URL"] = target
    for name in ("NO_PROXY", "no_proxy"):
        if name in env:
            env[name] = ",".join(h for h in env[name].split(",") if h.strip() != "127.0.0.1")
    return {**host_env(workdir), **env}


@dataclass
class Prober:
    """The kubelet's readiness and liveness probes, in a thread, until stopped."""

    pod: Pod
    ports: PortMap
    sidecar: Container
    seen: list[tuple[float, str, bool, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.sidecar.running():
            for kind in ("readinessProbe", "livenessProbe"):
                ok, status = probe_once(self.pod.sidecar[kind], self.ports)
                if self.sidecar.running():  # a probe of an exited container counts for nothing
                    self.seen.append((time.monotonic(), kind, ok, status))
            self._stop.wait(PROBE_EVERY)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def longest_failure(self, kind: str) -> float:
        """The longest stretch of consecutive failures of `kind`, in seconds."""
        longest, since = 0.0, None
        for at, probe, ok, _ in self.seen:
            if probe != kind:
                continue
            if ok:
                since = None
            else:
                since = at if since is None else since
                longest = max(longest, at - since)
        return longest


@dataclass
class Outcome:
    app_code: int | None = None
    app_killed: bool = False
    hook: Any = None
    sidecar_code: int | None = None
    sidecar_killed: bool = False
    sidecar_exited_after: float = 0.0
    terminated_at: float = 0.0


def run_prestop(pod: Pod, ports: PortMap, env: dict[str, str], workdir: Path,
                deadline: float) -> Any:
    command = pod.sidecar["lifecycle"]["preStop"]["exec"]["command"]
    try:
        return run_exec_hook(command, ports, env, workdir, deadline - time.monotonic())
    except Exception as exc:  # the kubelet logs a failed/timed-out hook and goes on to SIGTERM
        return exc


def terminate_native(pod: Pod, ports: PortMap, env: dict[str, str], workdir: Path,
                     app: Container, sidecar: Container) -> Outcome:
    out = Outcome(terminated_at=time.monotonic())
    deadline = out.terminated_at + pod.grace
    # Main containers first: the app has no preStop, so SIGTERM at once; wait for its exit.
    out.app_code, out.app_killed = sigterm_then_kill(app, deadline)
    assert sidecar.running(), "the sidecar must outlive the app:\n" + sidecar.logs()
    # Then the sidecar: its preStop, then SIGTERM.
    out.hook = run_prestop(pod, ports, env, workdir, deadline)
    out.sidecar_code, out.sidecar_killed = sigterm_then_kill(sidecar, deadline)
    out.sidecar_exited_after = time.monotonic() - out.terminated_at
    return out


def terminate_classic(pod: Pod, ports: PortMap, env: dict[str, str], workdir: Path,
                      app: Container, sidecar: Container) -> Outcome:
    out = Outcome(terminated_at=time.monotonic())
    deadline = out.terminated_at + pod.grace

    def sidecar_side() -> None:
        out.hook = run_prestop(pod, ports, env, workdir, deadline)
        out.sidecar_code, out.sidecar_killed = sigterm_then_kill(sidecar, deadline)
        out.sidecar_exited_after = time.monotonic() - out.terminated_at

    # Every container's preStop at once; a container without one gets SIGTERM at once.
    thread = threading.Thread(target=sidecar_side, daemon=True)
    thread.start()
    out.app_code, out.app_killed = sigterm_then_kill(app, deadline)
    thread.join(max(deadline - time.monotonic(), 0) + 15)
    assert not thread.is_alive()
    return out


def log_events(container: Container) -> list[dict[str, Any]]:
    events = []
    for line in container.logs(tail=0).splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and "event" in event:
                events.append(event)
    return events


def wall(ts: str) -> float:
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.UTC).timestamp()


def requests_counted(status_port: int, target_cluster: str) -> float:
    """sidecar_requests_total of the app's forward-proxy cluster, from the status port."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sidecar_requests_total"
        and sample.labels.get("cluster") == target_cluster
    )


@pytest.mark.parametrize("mode", ["native", "classic"])
def test_pod_start_and_termination_lose_no_request(
    mode: str, e2e_helm: Helm, tmp_path: Path
) -> None:
    rendered = e2e_helm.template(sets=[] if mode == "native" else ["nativeSidecar=false"])
    pod = Pod.from_rendered(rendered)
    assert pod.native is (mode == "native")
    simulate_pod_life(pod, mode, tmp_path)


def simulate_pod_life(pod: Pod, mode: str, tmp_path: Path) -> None:
    """Start, steady load and termination of `pod` as the kubelet runs them, with every
    assertion of the module docstring (also used by e2e/test_injected_pod.py)."""
    ports = PortMap()
    seen: list[float] = []
    server = upstream(seen)
    sidecar: Container | None = None
    app: Container | None = None
    prober: Prober | None = None
    try:
        sidecar, config = start_sidecar(pod, ports, tmp_path)
        hook_env = {**host_env(tmp_path), **Pod.env_of(pod.sidecar)}
        if pod.native:
            # The app starts only after the sidecar's startupProbe passed.
            took = run_startup_probe(pod.sidecar["startupProbe"], ports, sidecar)
        else:
            # postStart blocks the start of the containers after the sidecar's.
            started = time.monotonic()
            command = pod.sidecar["lifecycle"]["postStart"]["exec"]["command"]
            hook = run_exec_hook(command, ports, hook_env, tmp_path, timeout=pod.grace * 4)
            assert hook.returncode == 0, hook.stdout + hook.stderr + sidecar.logs()
            took = time.monotonic() - started
            run_startup_probe(pod.sidecar["startupProbe"], ports, sidecar)  # gates nothing
        print(f"{mode}: sidecar ready after {took:.2f}s")
        ready, status = probe_once(pod.sidecar["readinessProbe"], ports)
        assert ready, f"readiness {status} when the app starts"
        prober = Prober(pod, ports, sidecar)

        target = f"http://127.0.0.1:{server.port}"
        env = app_env(pod, ports, target + "/", tmp_path)
        result_path = tmp_path / "app-result.json"
        app = start_container(
            "app",
            [sys.executable, str(APP), str(result_path), str(APP_WORKERS),
             str(APP_SHUTDOWN_SECONDS)],
            env,
            tmp_path,
        )
        app_started = time.monotonic()
        deadline = app_started + 15
        while time.monotonic() < deadline and (
            len(seen) < 20 or time.monotonic() - app_started < RUN_SECONDS
        ):
            assert app.running(), app.logs()
            time.sleep(0.05)
        assert len(seen) >= 20, f"the app got {len(seen)} requests through:\n{app.logs()}"
        # The app's requests go through the sidecar (a forward-proxy cluster per host:port).
        status_port = int(config["status"]["address"].rsplit(":", 1)[1])
        assert requests_counted(status_port, f"127.0.0.1:{server.port}") > 0

        terminate = terminate_native if pod.native else terminate_classic
        outcome = terminate(pod, ports, hook_env, tmp_path, app, sidecar)
        prober.stop()
    finally:
        if prober is not None:
            prober.stop()
        stop_all(app, sidecar)
        server.stop()

    summary = json.loads(result_path.read_text()) if result_path.exists() else {}
    logs = f"--- app\n{app.logs()}\n--- sidecar\n{sidecar.logs()}"
    print(f"{mode}: app ok={summary.get('ok')} failed={summary.get('failed')} "
          f"after SIGTERM={summary.get('after_sigterm')}; sidecar exited "
          f"{outcome.sidecar_exited_after:.2f}s after the pod's deletion, code "
          f"{outcome.sidecar_code}")

    # The app: every request succeeded, also those made during its shutdown.
    assert summary, f"the app wrote no summary (exit {outcome.app_code}):\n{logs}"
    assert summary["proxies"].get("http") == env["HTTP_PROXY"], summary["proxies"]
    assert summary["failed"] == 0, "\n".join(summary["errors"][:10]) + "\n" + logs
    assert summary["ok"] >= 20 and summary["after_sigterm"] > 0, summary
    assert (outcome.app_code, outcome.app_killed) == (0, False), logs
    # The preStop hook drained the sidecar.
    hook = outcome.hook
    assert not isinstance(hook, BaseException), f"preStop failed: {hook!r}\n{logs}"
    assert hook.returncode == 0, f"preStop: {hook.stdout}{hook.stderr}\n{logs}"
    # The sidecar exited within the grace period, having aborted nothing.
    assert not outcome.sidecar_killed, logs
    assert outcome.sidecar_exited_after < pod.grace
    events = log_events(sidecar)
    drained = [e for e in events if e["event"] == "drained"]
    assert len(drained) == 1 and drained[0]["aborted"] == 0, drained
    drain_started = next(e for e in events if e["event"] == "drain started")
    if not pod.native:
        # The app called out during the sidecar's drain, and was served.
        assert wall(drain_started["ts"]) < summary["last_at"], (drain_started, summary)
    # Probes: ready until the deletion, 503 during the drain; liveness never failed for as
    # long as the kubelet needs to restart the container.
    before = [ok for at, kind, ok, _ in prober.seen
              if kind == "readinessProbe" and at < outcome.terminated_at]
    after = [status for at, kind, _, status in prober.seen
             if kind == "readinessProbe" and at > outcome.terminated_at]
    assert before and all(before), prober.seen
    assert 503 in after, prober.seen
    liveness = pod.sidecar["livenessProbe"]
    budget = (int(liveness["failureThreshold"]) - 1) * float(liveness["periodSeconds"])
    assert prober.longest_failure("livenessProbe") < budget, prober.seen
    # ... and with code 0 (not killed by the kubelet's SIGTERM that follows preStop).
    assert outcome.sidecar_code == 0, f"sidecar exit code {outcome.sidecar_code}\n{logs}"
