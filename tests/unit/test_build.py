"""The compiled build (setup.py, mypyc): which one runs, and the stale-build guard.

Real files in a temporary source tree; times set with os.utime."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import _build

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def tree(tmp_path: Path) -> Path:
    (tmp_path / "setup.py").write_text("")
    package = tmp_path / "sidecar"
    (package / "http").mkdir(parents=True)
    for name in ("http/parser", "timers"):
        (package / f"{name}.py").write_text("")
        (package / f"{name}{SUFFIX}").write_bytes(b"")
    (tmp_path / f"0123abcd__mypyc{SUFFIX}").write_bytes(b"")
    return package


def touch(path: Path, when: float) -> None:
    os.utime(path, (when, when))


def test_a_fresh_build_is_not_stale(tmp_path: Path) -> None:
    package = tree(tmp_path)
    for path in package.rglob("*.py"):
        touch(path, 1000)
    assert _build.stale_modules(package) == []


def test_a_source_edited_after_the_build_is_stale(tmp_path: Path) -> None:
    package = tree(tmp_path)
    for path in [*package.rglob("*"), *tmp_path.glob("*__mypyc*")]:
        touch(path, 1000)
    touch(package / "http/parser.py", 2000)
    assert _build.stale_modules(package) == ["sidecar/http/parser.py"]


def test_an_unchanged_shim_with_an_old_time_is_not_stale_after_a_rebuild(tmp_path: Path) -> None:
    # setuptools copies an unchanged module shim with its old time; the group library, where
    # the code is, is rebuilt: that one decides.
    package = tree(tmp_path)
    touch(package / f"http/parser{SUFFIX}", 1000)
    touch(package / "http/parser.py", 2000)
    touch(tmp_path / f"0123abcd__mypyc{SUFFIX}", 3000)
    assert _build.stale_modules(package) == []


def test_an_installed_package_is_not_checked(tmp_path: Path) -> None:
    package = tree(tmp_path)
    (tmp_path / "setup.py").unlink()  # site-packages has no setup.py beside the package
    touch(package / "http/parser.py", 5000)
    assert _build.stale_modules(package) == []


def test_the_guard_names_the_stale_sources_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tree(tmp_path)
    for path in [*package.rglob("*"), *tmp_path.glob("*__mypyc*")]:
        touch(path, 1000)
    touch(package / "timers.py", 2000)
    monkeypatch.setattr(_build, "_PACKAGE", package)
    with pytest.raises(_build.StaleBuild, match=r"sidecar/timers\.py.*pip install -e \."):
        _build.check_source_tree()


def test_compiled_reports_the_build_that_runs() -> None:
    from sidecar.downstream import protocol

    assert _build.compiled() == protocol.__file__.endswith(SUFFIX)


@pytest.mark.skipif(
    os.environ.get("SIDECAR_EXPECT_COMPILED") != "1",
    reason="only where the build must be compiled (scripts/check sets it when it built one)",
)
def test_the_request_path_is_compiled_where_the_build_says_so() -> None:
    # Benchmarks and CI must test what ships: a silently failed compile would fall back to
    # pure Python and make every figure wrong.
    assert _build.compiled()


def test_sidecar_pure_imports_the_sources_even_where_compiled_modules_exist() -> None:
    # A fresh interpreter: the choice is made when the package is first imported.
    probe = "from sidecar import _build; print(_build.compiled())"
    env = {**os.environ, "SIDECAR_PURE": "1"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"
