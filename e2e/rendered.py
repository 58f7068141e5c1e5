"""What the e2e tests take from `helm template`, and the one documented transformation that makes
a rendered pod runnable on this machine.

The pod's network namespace is emulated by renumbering ports: every port the pod uses (the
sidecar's admin, status and listener addresses) maps to a free port on 127.0.0.1, and that one
`PortMap` is applied wherever the rendered objects name those ports (the ConfigMap's
addresses, the probes, the preStop/postStart hook URLs, the app's HTTP_PROXY). The config
itself changes only in addresses (see `localize_config`); `changed_paths` proves it.
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.chart.helmrun import NAMESPACE, RELEASE, Rendered
from tests.harness import free_port

SIDECAR_CONTAINER = "connection-sidecar"
APP_CONTAINER = "app"
CONFIG_KEY = "config.yaml"
E2E_VALUES = Path(__file__).resolve().parent / "values"
# What the downward API would give the container (POD_NAME / POD_NAMESPACE).
FAKE_POD_NAME = f"{RELEASE}-connection-sidecar-6d5f9c7b8-x2k4p"
FIELD_REFS = {"metadata.name": FAKE_POD_NAME, "metadata.namespace": NAMESPACE}


class PortMap:
    """The pod's ports -> free ports on 127.0.0.1, assigned on first use and then stable."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}

    def port(self, pod_port: int) -> int:
        if pod_port not in self.ports:
            self.ports[pod_port] = free_port()
        return self.ports[pod_port]

    def address(self, address: str) -> str:
        """`host:port` (any host: 127.0.0.1, 0.0.0.0) -> `127.0.0.1:<free port>`."""
        _, _, port = str(address).rpartition(":")
        return f"127.0.0.1:{self.port(int(port))}"

    def text(self, value: str) -> str:
        """Every `127.0.0.1:<port>` / `localhost:<port>` inside a string, remapped."""
        return re.sub(
            r"\b(?:127\.0\.0\.1|localhost):(\d+)",
            lambda m: f"127.0.0.1:{self.port(int(m.group(1)))}",
            value,
        )


def localize_config(
    config: dict[str, Any],
    ports: PortMap,
    endpoints: Mapping[str, list[str]] | None = None,
    ca_file: Path | None = None,
) -> dict[str, Any]:
    """The rendered sidecar config, made runnable here. The whole transformation:

    1. `admin.address`, `status.address` and every `listeners[].address` -> 127.0.0.1 and a
       free port (through `ports`, so probes and hooks follow);
    2. for each cluster named in `endpoints`: its static `discovery.endpoints` -> those local
       upstreams (the rendered discovery must be static: nothing else is rewritten);
    3. when a cluster has `tls.ca_file`: -> `ca_file`, the local upstreams' test CA.

    Nothing else changes: routes, pools, retries, drain, TLS settings stay as rendered.
    """
    out = copy.deepcopy(config)
    for section in ("admin", "status"):
        if section in out and "address" in out[section]:
            out[section]["address"] = ports.address(out[section]["address"])
    for listener in out.get("listeners") or []:
        listener["address"] = ports.address(listener["address"])
    endpoints = endpoints or {}
    for cluster in out.get("clusters") or []:
        if cluster["name"] in endpoints:
            assert cluster["discovery"]["type"] == "static", cluster
            cluster["discovery"]["endpoints"] = list(endpoints[cluster["name"]])
        tls = cluster.get("tls") or {}
        if tls.get("ca_file"):
            assert ca_file is not None, f"cluster {cluster['name']} needs a CA"
            tls["ca_file"] = str(ca_file)
    missing = set(endpoints) - {c["name"] for c in out.get("clusters") or []}
    assert not missing, f"no such clusters in the rendered config: {missing}"
    return out


ALLOWED_CHANGES = re.compile(
    r"^(admin\.address|status\.address|listeners\[\d+\]\.address"
    r"|clusters\[\d+\]\.discovery\.endpoints(\[\d+\])?|clusters\[\d+\]\.tls\.ca_file)$"
)


def changed_paths(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """The paths (`clusters[0].pool.min_idle`) where two YAML trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                yield sub
            else:
                yield from changed_paths(a[key], b[key], sub)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from changed_paths(x, y, f"{path}[{index}]")
    elif a != b:
        yield path


def assert_only_addresses_changed(rendered: dict[str, Any], local: dict[str, Any]) -> None:
    unexpected = [p for p in changed_paths(rendered, local) if not ALLOWED_CHANGES.match(p)]
    assert not unexpected, f"the transformation changed more than addresses: {unexpected}"


@dataclass
class Pod:
    """The example app's pod template from the rendered Deployment, and its ConfigMap."""

    spec: dict[str, Any]
    config_maps: dict[str, dict[str, str]]
    native: bool = field(init=False)
    sidecar: dict[str, Any] = field(init=False)
    app: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        inits = {c["name"]: c for c in self.spec.get("initContainers") or []}
        mains = {c["name"]: c for c in self.spec["containers"]}
        self.native = SIDECAR_CONTAINER in inits
        self.sidecar = inits.get(SIDECAR_CONTAINER) or mains[SIDECAR_CONTAINER]
        self.app = mains[APP_CONTAINER]
        if self.native:
            assert self.sidecar.get("restartPolicy") == "Always"
        else:
            # A classic sidecar must come first: its postStart blocks the later containers.
            assert self.spec["containers"][0]["name"] == SIDECAR_CONTAINER

    @classmethod
    def from_rendered(cls, rendered: Rendered) -> Pod:
        deployment = rendered.one("Deployment")
        config_maps = {cm["metadata"]["name"]: cm["data"] for cm in rendered.all("ConfigMap")}
        return cls(deployment["spec"]["template"]["spec"], config_maps)

    @property
    def grace(self) -> int:
        return int(self.spec["terminationGracePeriodSeconds"])

    def sidecar_config(self) -> tuple[str, dict[str, Any]]:
        """(mountPath of the config volume, the parsed config.yaml of its ConfigMap)."""
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        for mount in self.sidecar["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                data = self.config_maps[volume["configMap"]["name"]]
                return mount["mountPath"], yaml.safe_load(data[CONFIG_KEY])
        raise AssertionError("the sidecar mounts no ConfigMap")

    @staticmethod
    def env_of(container: dict[str, Any]) -> dict[str, str]:
        """A container's env as the kubelet would set it; fieldRefs from FIELD_REFS."""
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
            else:
                ref = item["valueFrom"]["fieldRef"]["fieldPath"]
                assert ref in FIELD_REFS, f"no fake for the downward API field {ref}"
                env[item["name"]] = FIELD_REFS[ref]
        return env


def resolve_command(argv: list[str]) -> list[str]:
    """The image's `sidecar` entrypoint -> this Python's console script (installed editable),
    else `python -m sidecar`."""
    if argv and argv[0] == "sidecar":
        script = Path(sys.executable).with_name("sidecar")
        if script.exists():
            return [str(script), *argv[1:]]
        found = shutil.which("sidecar")
        return [found, *argv[1:]] if found else [sys.executable, "-m", "sidecar", *argv[1:]]
    return argv
