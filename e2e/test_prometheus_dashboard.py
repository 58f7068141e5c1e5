"""Component e2e: the dashboard's every query returns data from a real Prometheus that scraped the
real sidecar, started with the config of the chart's own ConfigMap.

- `helm template` renders the chart with e2e/values/dashboard.yaml (upstream clusters of each
  kind the dashboard draws) and `podMonitor.enabled=true`;
- the sidecar container starts as rendered (command, args, env, the ConfigMap as its config
  file), after `e2e.rendered.localize_config` rewrote only addresses: free 127.0.0.1 ports,
  the clusters' endpoints -> local upstreams (healthy, 503, TLS, and a port nobody listens on);
- traffic runs through the egress listener the whole time;
- a real Prometheus (apt `prometheus`) scrapes the port and path of the rendered PodMonitor
  every 1 s, with the target labels the operator would add (namespace, pod, container);
- every query of `helm/dashboards/generate.py:panel_queries()` must return data, some must
  show the traffic we made; a misspelled metric must return nothing; `promtool check metrics`
  passes on a scrape.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import requests
import trustme
import yaml
from aiohttp import web

from e2e.kubelet import Container, probe_once, run_startup_probe, start_sidecar, stop_all
from e2e.rendered import E2E_VALUES, FAKE_POD_NAME, Pod, PortMap
from tests.chart.helmrun import CHART, NAMESPACE, Helm
from tests.harness import ThreadedServer, free_port

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
APT_PACKAGE = "prometheus"  # Debian's, with promtool
SCRAPE_INTERVAL = "1s"
FIRST_SAMPLES_WAIT = 30.0  # the first sample shows ~5-6 s after start (SD throttle)
SNI = "payments.shop.svc"
CLUSTERS = ("backend", "flaky", "payments", "dead", "orders")
# Panels that must show the traffic we made: title -> the cluster with a positive value.
MUST_SHOW = {
    "Request rate by cluster": "backend",
    "Error ratio by cluster (5xx)": "flaky",
    "Latency p50 / p99 by cluster [B]": "backend",
    "Local errors by code": "dead",
    "Upstream connections opened / closed [A]": "payments",
    "Connect time p99": "payments",
    "TLS resumption ratio": "payments",
    "Retries by reason": "flaky",
    "Healthy endpoints [A]": "backend",
    "Health checks by result": "backend",
    "gRPC responses by status": "orders",
    "gRPC error ratio (not ok)": "orders",
    "Open upstream streams": "orders",
}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "dashboard_generate", CHART / "dashboards" / "generate.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def ensure_prometheus() -> None:
    """Prometheus and promtool from apt: installed here if missing (CI's scripts/check does it
    too). Where installing is impossible the test fails, with the reason: inside the test
    command a missing tool is a failure, not a skip."""
    if PROMETHEUS.exists() and PROMTOOL.exists():
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.fail(f"{PROMETHEUS} missing and cannot apt-get install {APT_PACKAGE} here "
                    f"(apt-get {'found' if apt else 'missing'}, uid {os.geteuid()}); "
                    "`bash scripts/check` installs it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-qq", "--no-install-recommends", APT_PACKAGE]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        subprocess.run([apt, "update", "-qq"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not PROMETHEUS.exists():
        pytest.fail(f"apt-get install {APT_PACKAGE} failed: {proc.stderr[-2000:]}")


# --- the upstreams ----------------------------------------------------------------------------
def upstream_app(status: int = 200, close: bool = False) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        response = web.Response(status=status, text=f"{status} {request.path}\n")
        if close:
            response.force_close()  # a new (resumed) TLS connection for every request
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


def grpc_upstream() -> tuple[grpc.Server, int]:
    """A grpcio server (h2c) with no generated code: `/orders.Orders/Get` answers OK, and every
    fourth call UNAVAILABLE (a Trailers-Only answer); `/orders.Orders/Watch` streams a message
    every 100 ms for about 3 s, so that upstream streams stay open while Prometheus scrapes."""
    from concurrent import futures

    calls = Counter[str]()

    def get(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls["get"] += 1
        if calls["get"] % 4 == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try another")
        return b"order:" + request

    def watch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for n in range(30):
            if not context.is_active():
                return
            yield b"event %d" % n
            time.sleep(0.1)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("orders.Orders", {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "Watch": grpc.unary_stream_rpc_method_handler(watch),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@contextlib.contextmanager
def upstreams(tmp: Path) -> Iterator[tuple[dict[str, list[str]], Path]]:
    """(cluster -> local endpoints, the CA file the TLS one is signed by)."""
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(SNI).configure_cert(context)
    servers = [
        ThreadedServer(upstream_app()),
        ThreadedServer(upstream_app()),
        ThreadedServer(upstream_app(503)),
        ThreadedServer(upstream_app(close=True), ssl_context=context),
    ]
    orders, orders_port = grpc_upstream()
    try:
        yield {
            "backend": [f"127.0.0.1:{servers[0].port}", f"127.0.0.1:{servers[1].port}"],
            "flaky": [f"127.0.0.1:{servers[2].port}"],
            "payments": [f"127.0.0.1:{servers[3].port}"],
            "dead": [f"127.0.0.1:{free_port()}"],  # nobody listens there
            "orders": [f"127.0.0.1:{orders_port}"],
        }, ca_file
    finally:
        orders.stop(grace=None)
        for server in servers:
            server.stop()


class Traffic:
    """An app sending requests through the egress listener, round-robin over the clusters'
    hosts, until stopped. Counts the status codes per host."""

    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        self.codes: Counter[tuple[str, int]] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        session = requests.Session()
        session.trust_env = False
        session.proxies = {"http": self.proxy}
        n = 0
        while not self._stop.is_set():
            host = ("backend", "flaky", "payments", "dead", "backend")[n % 5]
            try:
                r = session.get(f"http://{host}/orders/{n}", timeout=5)
                self.codes[(host, r.status_code)] += 1
            except requests.RequestException as exc:
                self.errors.append(f"{host}: {exc}")
            n += 1
            self._stop.wait(0.01)
        session.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class GrpcTraffic:
    """A gRPC app: one channel to the egress listener (h2c, authority `orders`), unary calls
    in a loop and two overlapping server-streaming calls at all times. Counts the statuses."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.default_authority", "orders"),
            ("grpc.enable_http_proxy", 0),
            ("grpc.enable_retries", 0),
        ])
        self.codes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._unary, daemon=True)] + [
            threading.Thread(target=self._watch, args=(delay,), daemon=True)
            for delay in (0.0, 1.5)
        ]
        for thread in self._threads:
            thread.start()

    def _unary(self) -> None:
        get = self.channel.unary_unary("/orders.Orders/Get")
        n = 0
        while not self._stop.is_set():
            try:
                get(b"%d" % n, timeout=5)
                self.codes["ok"] += 1
            except grpc.RpcError as exc:
                self.codes[exc.code().name.lower()] += 1
            n += 1
            self._stop.wait(0.02)

    def _watch(self, delay: float) -> None:
        watch = self.channel.unary_stream("/orders.Orders/Watch")
        self._stop.wait(delay)
        while not self._stop.is_set():
            try:
                for _ in watch(b"", timeout=10):
                    if self._stop.is_set():
                        break
                self.codes["watch"] += 1
            except grpc.RpcError as exc:
                self.codes["watch_" + exc.code().name.lower()] += 1

    def stop(self) -> None:
        self._stop.set()
        self.channel.close()
        for thread in self._threads:
            thread.join(10)


# --- Prometheus -------------------------------------------------------------------------------
class Prometheus:
    """A real Prometheus on 127.0.0.1 with a temp TSDB, scraping one target; stopped by PID."""

    def __init__(self, tmp: Path, target: str, path: str, labels: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                       "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [{
                "job_name": "connection-sidecar",
                "metrics_path": path,
                "static_configs": [{"targets": [target], "labels": labels}],
            }],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = tmp / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
            )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def api(self, endpoint: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{endpoint}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def wait_samples(self, promql: str, at_least: float, timeout: float) -> float:
        """Poll `promql` (a scalar-ish vector) until its value reaches `at_least`."""
        deadline = time.monotonic() + timeout
        value = 0.0
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.logs()}"
            with contextlib.suppress(OSError):
                result = self.query(promql)
                value = float(result[0]["value"][1]) if result else 0.0
                if value >= at_least:
                    return value
            time.sleep(0.25)
        raise AssertionError(f"{promql} reached {value}, not {at_least}, within {timeout}s:\n"
                             f"{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def scrape_target(rendered_monitor: dict[str, Any], pod: Pod, ports: PortMap) -> tuple[str, str]:
    """(127.0.0.1:<port>, path) of the rendered PodMonitor's endpoint: its port name resolved
    through the sidecar container's ports, as the operator does."""
    endpoints = rendered_monitor["spec"]["podMetricsEndpoints"]
    assert len(endpoints) == 1, endpoints
    named = {p["name"]: int(p["containerPort"]) for p in pod.sidecar["ports"]}
    port = named[endpoints[0]["port"]]
    return f"127.0.0.1:{ports.port(port)}", endpoints[0].get("path", "/metrics")


def values_of(result: list[dict[str, Any]], cluster: str) -> list[float]:
    return [float(r["value"][1]) for r in result if r["metric"].get("cluster") == cluster]


def test_every_dashboard_query_returns_data(e2e_helm: Helm, tmp_path: Path) -> None:
    ensure_prometheus()
    queries = load_generator().panel_queries("1m")
    assert len(queries) >= 20, queries
    rendered = e2e_helm.template(
        values=[str(E2E_VALUES / "dashboard.yaml")], sets=["podMonitor.enabled=true"]
    )
    pod = Pod.from_rendered(rendered)
    ports = PortMap()
    sidecar: Container | None = None
    prometheus: Prometheus | None = None
    traffic: Traffic | None = None
    grpc_traffic: GrpcTraffic | None = None
    with upstreams(tmp_path) as (endpoints, ca_file):
        try:
            sidecar, config = start_sidecar(pod, ports, tmp_path, endpoints, ca_file)
            run_startup_probe(pod.sidecar["startupProbe"], ports, sidecar)
            egress = next(lst for lst in config["listeners"] if lst["name"] == "egress")
            traffic = Traffic(f"http://{egress['address']}")
            grpc_traffic = GrpcTraffic(egress["address"])
            target, path = scrape_target(rendered.one("PodMonitor"), pod, ports)
            labels = {"namespace": NAMESPACE, "pod": FAKE_POD_NAME,
                      "container": pod.sidecar["name"]}
            prometheus = Prometheus(tmp_path, target, path, labels)
            started = time.monotonic()
            # Three scrapes of a counter that moves: every rate() window has two samples.
            prometheus.wait_samples("up", 1, FIRST_SAMPLES_WAIT)
            prometheus.wait_samples(
                "count_over_time(sidecar_drain_state[1m])", 3, FIRST_SAMPLES_WAIT
            )
            print(f"prometheus: 3 scrapes after {time.monotonic() - started:.1f}s")
            check_queries(prometheus, queries)
            check_variables(prometheus)
            check_promtool(target, path)
            assert probe_once(pod.sidecar["livenessProbe"], ports)[0]
            assert sidecar.running(), sidecar.logs()
        finally:
            if traffic is not None:
                traffic.stop()
            if grpc_traffic is not None:
                grpc_traffic.stop()
            if prometheus is not None:
                prometheus.stop()
            stop_all(sidecar)
    assert traffic is not None
    print("traffic:", dict(traffic.codes))
    assert not traffic.errors, traffic.errors[:5]
    assert traffic.codes[("backend", 200)] > 0 and traffic.codes[("payments", 200)] > 0
    assert traffic.codes[("flaky", 503)] > 0 and traffic.codes[("dead", 503)] > 0
    assert grpc_traffic is not None
    print("gRPC traffic:", dict(grpc_traffic.codes))
    assert grpc_traffic.codes["ok"] > 0 and grpc_traffic.codes["unavailable"] > 0
    assert grpc_traffic.codes["watch"] > 0


def check_queries(prometheus: Prometheus, queries: list[tuple[str, str]]) -> None:
    empty: list[str] = []
    for title, promql in queries:
        result = prometheus.query(promql)
        if not result:
            empty.append(f"{title}: {promql}")
            continue
        if title in MUST_SHOW:
            cluster = MUST_SHOW[title]
            values = values_of(result, cluster)
            assert any(math.isfinite(v) and v > 0 for v in values), (
                f"{title}: no positive value for cluster {cluster}: {result}"
            )
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert set(MUST_SHOW) <= {title for title, _ in queries}, "MUST_SHOW names a lost panel"
    # Every configured cluster shows up on the per-cluster panels.
    rate_query = dict(queries)["Request rate by cluster"]
    assert {r["metric"]["cluster"] for r in prometheus.query(rate_query)} >= set(CLUSTERS)
    # The check has teeth: a misspelled metric name gives no data.
    assert "sidecar_requests_total" in rate_query
    misspelled = rate_query.replace("sidecar_requests_total", "sidecar_request_total")
    assert prometheus.query(misspelled) == [], misspelled
    assert prometheus.query("sidecar_requests_totl") == []


def check_variables(prometheus: Prometheus) -> None:
    """The dashboard's namespace/pod/cluster variables (label_values) find their values."""
    for label, match, expected in [
        ("namespace", "sidecar_requests_total", NAMESPACE),
        ("pod", "sidecar_requests_total", FAKE_POD_NAME),
        ("cluster", "sidecar_upstream_connections", "backend"),
    ]:
        values = prometheus.api(f"label/{label}/values", **{"match[]": match})
        assert expected in values, (label, values)


def check_promtool(target: str, path: str) -> None:
    with urllib.request.urlopen(f"http://{target}{path}", timeout=5) as r:
        scrape = r.read()
    proc = subprocess.run(
        [str(PROMTOOL), "check", "metrics"], input=scrape, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
