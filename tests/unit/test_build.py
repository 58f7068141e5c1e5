"""The compiled build (setup.py, mypyc): which one runs, and the guard that runs a source tree's
.py files when its compiled modules were not built from them.

Real files in a temporary source tree; times set with os.utime."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import _build

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
REPO = Path(__file__).resolve().parents[2]
PROBE = "downstream/protocol"  # the module compiled() asks about


def tree(tmp_path: Path, *, record: bool = True) -> Path:
    """A source tree as an in-place build leaves it: .py and .so side by side, and the record
    setup.py writes of the sources the build was made from."""
    (tmp_path / "setup.py").write_text("")
    package = tmp_path / "sidecar"
    for name in ("http/parser", "timers", PROBE):
        (package / f"{name}.py").parent.mkdir(parents=True, exist_ok=True)
        (package / f"{name}.py").write_text("x = 1\n")
        (package / f"{name}{SUFFIX}").write_bytes(b"")
    if record:
        sources = ["sidecar/http/parser.py", "sidecar/timers.py", f"sidecar/{PROBE}.py"]
        write_record(package, sources)
    return package


def write_record(package: Path, sources: list[str]) -> None:
    stamps = {s: _build.source_stamp(package.parent / s) for s in sources}
    (package / _build.MANIFEST).write_text(json.dumps({"sources": stamps}))


def test_a_fresh_build_runs_compiled(tmp_path: Path) -> None:
    assert _build.stale_sources(tree(tmp_path)) is None


def test_a_source_edited_after_the_build_sends_the_tree_to_its_sources(tmp_path: Path) -> None:
    package = tree(tmp_path)
    (package / "http/parser.py").write_text("x = 22\n")
    assert _build.stale_sources(package) == ["sidecar/http/parser.py"]


def test_a_touched_source_counts_as_edited(tmp_path: Path) -> None:
    # Same size, new time: we do not read the files to find out (a stat each is the cost).
    package = tree(tmp_path)
    st = (package / "timers.py").stat()
    os.utime(package / "timers.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert _build.stale_sources(package) == ["sidecar/timers.py"]


def test_a_deleted_source_counts_as_edited(tmp_path: Path) -> None:
    package = tree(tmp_path)
    (package / "timers.py").unlink()
    assert _build.stale_sources(package) == ["sidecar/timers.py"]


def test_compiled_modules_without_a_record_are_not_trusted(tmp_path: Path) -> None:
    # A build from before records, or one whose record was lost: nothing vouches for it.
    assert _build.stale_sources(tree(tmp_path, record=False)) == ["(no build record)"]


def test_a_tree_without_compiled_modules_is_silent(tmp_path: Path) -> None:
    package = tree(tmp_path, record=False)
    for so in package.rglob(f"*{SUFFIX}"):
        so.unlink()
    assert _build.stale_sources(package) is None


def test_an_installed_package_is_not_checked(tmp_path: Path) -> None:
    package = tree(tmp_path, record=False)
    (tmp_path / "setup.py").unlink()  # site-packages has no setup.py beside the package
    assert _build.stale_sources(package) is None


def copy_of_the_package(tmp_path: Path) -> Path:
    """This repository's sidecar package in a scratch source tree, with a planted "compiled"
    protocol module that is not a loadable extension: importing it proves the compiled file
    was chosen, without building (the build takes minutes; scripts/check does it)."""
    shutil.copytree(REPO / "sidecar", tmp_path / "sidecar",
                    ignore=shutil.ignore_patterns("__pycache__", f"*{SUFFIX}", _build.MANIFEST))
    (tmp_path / "setup.py").write_text("")
    package = tmp_path / "sidecar"
    (package / f"{PROBE}{SUFFIX}").write_bytes(b"not an ELF file")
    write_record(package, [f"sidecar/{PROBE}.py", "sidecar/timers.py"])
    return package


def import_probe(root: Path) -> subprocess.CompletedProcess[str]:
    probe = "from sidecar import _build; print(_build.compiled())"
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("SIDECAR_PURE", None)
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=60, cwd=root)


def test_the_import_uses_a_matching_build_and_falls_back_to_sources_after_an_edit(
    tmp_path: Path,
) -> None:
    package = copy_of_the_package(tmp_path)
    chosen = import_probe(tmp_path)
    assert chosen.returncode != 0, chosen.stdout  # the planted .so was loaded: it matched
    assert "ImportError" in chosen.stderr and "sidecar: running" not in chosen.stderr
    # Edit a compiled module (here: touch it): the tree now runs every module from its source.
    st = (package / "timers.py").stat()
    os.utime(package / "timers.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    fallback = import_probe(tmp_path)
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stdout.strip() == "False"  # the protocol module came from its .py
    lines = fallback.stderr.splitlines()
    assert len(lines) == 1, lines  # one warning line, not one per module
    assert "sidecar/timers.py" in lines[0] and "pip install -e ." in lines[0]


def test_compiled_reports_the_build_that_runs() -> None:
    from sidecar.downstream import protocol

    assert _build.compiled() == protocol.__file__.endswith(SUFFIX)


@pytest.mark.skipif(
    os.environ.get("SIDECAR_EXPECT_COMPILED") != "1",
    reason="by design: only where the build must be compiled (scripts/check sets "
    "SIDECAR_EXPECT_COMPILED=1 when it built one; SIDECAR_COMPILE=0 and the pure pass do not)",
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
