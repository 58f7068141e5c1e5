"""Image tier (opt-in: `SIDECAR_PODMAN=1`, marker `podman`): build the Dockerfile with podman from
apt, unchanged, then run the image the way the chart does and check what it promises.

No registry can be pulled here (TESTING.md), so:
- the base `python:3.11-slim` is a local stand-in: a `debootstrap --variant=minbase bookworm`
  rootfs with Debian's Python 3.11 (`python` linked like the official image's), imported with
  `podman import` and cached as an image (built once, ~2 min);
- pip inside the build takes nothing from the network: a wheelhouse made on the host with
  `pip download` (the pyproject's dependencies and build requirements: setuptools, wheel,
  mypy) is bind-mounted at /wheelhouse, and the stand-in's /etc/pip.conf points pip at it
  (`no-index`, `find-links`). The builder stage's `apt-get install gcc` does reach Debian's
  mirror (the one registry besides PyPI this machine reaches), so the build has a network;
- the stand-in carries Python's headers (python3-dev), as the official image does, for the
  mypyc build of the request path (setup.py);
- podman runs with runc and low default ulimits from a private containers.conf
  (`CONTAINERS_CONF`), and `podman build --pull=never`.

Then the image runs read-only, as its own non-root user, with all capabilities dropped and the
chart's rendered ConfigMap as its config (addresses localized, host network on 127.0.0.1): it
must turn ready on the status port and exit 0 on SIGTERM (`podman stop`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from e2e.kubelet import probe_once
from e2e.rendered import Pod, PortMap, localize_config
from tests.chart.helmrun import REPO, Helm

# Cold, the first test also builds the base image and the image (~2-3 min): beyond the
# suite's 120 s default.
pytestmark = [pytest.mark.podman, pytest.mark.timeout(1200)]

PODMAN = shutil.which("podman")
BASE = "localhost/python:3.11-slim"  # what `FROM python:3.11-slim` resolves to, --pull=never
IMAGE = "localhost/connection-sidecar:e2e"
CACHE = Path(os.environ.get("SIDECAR_TOOLS_DIR", Path.home() / ".cache" / "sidecar-tools"))
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
PIP_CONF = "[global]\nno-index = true\nfind-links = /wheelhouse\n"
MIRROR = "http://deb.debian.org/debian"


def skip_reason() -> str | None:
    """Why this opt-in tier does not run: only that it was not asked for."""
    if os.environ.get("SIDECAR_PODMAN") != "1":
        return "opt-in: set SIDECAR_PODMAN=1 (builds the image with podman, ~2-3 min cold)"
    return None


def missing_tool() -> str | None:
    """Asked for (SIDECAR_PODMAN=1) but unable to run: a failure, not a skip."""
    if PODMAN is None:
        return "podman is not installed (apt-get install podman runc debootstrap)"
    for tool in ("runc", "debootstrap"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (apt-get install {tool})"
    if os.geteuid() != 0:
        return "needs root (debootstrap, rootful podman with runc)"
    return None


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    problem = missing_tool()
    if problem:
        pytest.fail(f"SIDECAR_PODMAN=1 asks for the image tier, but {problem}", pytrace=False)
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def run(env: dict[str, str], *args: str, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc


def ensure_base_image(env: dict[str, str], tmp: Path) -> None:
    """The stand-in python:3.11-slim, built once from a debootstrap rootfs."""
    assert PODMAN
    if run(env, PODMAN, "image", "exists", BASE, check=False).returncode == 0:
        return
    rootfs = tmp / "rootfs"
    run(env, "debootstrap", "--variant=minbase",
        "--include=python3,python3-venv,python3-dev,passwd", "bookworm", str(rootfs), MIRROR,
        timeout=900)
    (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
    (rootfs / "etc/pip.conf").write_text(PIP_CONF)
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (rootfs / cache).glob("*"):
            if item.is_file():
                item.unlink()
    tarball = tmp / "rootfs.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(rootfs, arcname=".")
    run(env, PODMAN, "import",
        "--change", "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]',
        str(tarball), BASE)
    shutil.rmtree(rootfs, ignore_errors=True)
    tarball.unlink()


def wheelhouse() -> Path:
    """The build's dependencies as wheels, downloaded on the host (pip's cache makes it cheap)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    where = CACHE / "wheelhouse"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--only-binary=:all:", "--dest", str(where), *requirements],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip download failed:\n{proc.stderr[-3000:]}")
    return where


@pytest.fixture(scope="module")
def image(podman: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    assert PODMAN
    ensure_base_image(podman, tmp_path_factory.mktemp("base"))
    wheels = wheelhouse()
    started = time.monotonic()
    run(podman, PODMAN, "build", "--pull=never",
        "--volume", f"{wheels}:/wheelhouse:ro",
        "--build-arg", "REVISION=e2e", "--tag", IMAGE, "--file", str(REPO / "Dockerfile"),
        str(REPO), timeout=900)
    print(f"podman build: {time.monotonic() - started:.0f}s")
    return IMAGE


def test_image_metadata(podman: dict[str, str], image: str) -> None:
    assert PODMAN
    info = json.loads(run(podman, PODMAN, "image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["sidecar"] and config["Cmd"] == ["run"]
    assert {"15000/tcp", "15001/tcp", "15020/tcp"} <= set(config.get("ExposedPorts", {}))
    assert "Healthcheck" not in config or not config["Healthcheck"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.revision"] == "e2e"
    assert labels["org.opencontainers.image.title"] == "connection-sidecar"
    # No build tools and no sources in the final image: only the venv came over.
    probe = run(podman, PODMAN, "run", "--rm", "--network=none", "--entrypoint", "sh", image,
                "-c", "id -u; command -v gcc cc make || true; test -e /src && echo HAS_SRC || true")
    lines = probe.stdout.split()
    assert lines == ["10001"], probe.stdout  # non-root; no compiler; no sources
    version = run(podman, PODMAN, "run", "--rm", "--network=none", image, "--version")
    assert version.stdout.startswith("sidecar "), version.stdout
    # The request path is the mypyc build (the Dockerfile asserts it too).
    build = run(podman, PODMAN, "run", "--rm", "--network=none", "--entrypoint", "python", image,
                "-c", "from sidecar._build import compiled; print(compiled())")
    assert build.stdout.strip() == "True", build.stdout + build.stderr


def test_image_runs_the_charts_config_locked_down(
    podman: dict[str, str], image: str, e2e_helm: Helm, tmp_path: Path
) -> None:
    """The chart's securityContext, as podman flags: read-only root, uid 10001, no
    capabilities, no privilege escalation; /tmp an emptyDir; the ConfigMap mounted read-only."""
    assert PODMAN
    pod = Pod.from_rendered(e2e_helm.template())
    ports = PortMap()
    mount, rendered = pod.sidecar_config()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(
        yaml.safe_dump(localize_config(rendered, ports))
    )
    security = pod.sidecar["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
    name = f"sidecar-e2e-{os.getpid()}"
    env_flags = [f"--env={k}={v}" for k, v in Pod.env_of(pod.sidecar).items()]
    run(podman, PODMAN, "run", "--detach", "--name", name, "--network=host", "--read-only",
        f"--user={security['runAsUser']}:{security['runAsGroup']}", "--cap-drop=ALL",
        "--security-opt=no-new-privileges", "--tmpfs=/tmp:rw,size=64m",
        f"--volume={tmp_path / 'config'}:{mount}:ro", *env_flags,
        image, *pod.sidecar["args"])
    try:
        deadline = time.monotonic() + 30
        ready = False
        while time.monotonic() < deadline and not ready:
            ready, _ = probe_once(pod.sidecar["startupProbe"], ports)
            time.sleep(0.2)
        logs = run(podman, PODMAN, "logs", name, check=False)
        assert ready, logs.stdout + logs.stderr
        stop = run(podman, PODMAN, "stop", "--time", str(pod.grace), name, timeout=pod.grace + 30)
        assert stop.returncode == 0
        state = json.loads(run(podman, PODMAN, "inspect", name).stdout)[0]["State"]
        logs = run(podman, PODMAN, "logs", name, check=False)
        assert state["ExitCode"] == 0, logs.stdout + logs.stderr
    finally:
        run(podman, PODMAN, "rm", "--force", "--time", "0", name, check=False)
