"""Which build of the request path is running: mypyc-compiled (setup.py) or the .py files.

`compiled()` answers for the startup log line and the benchmark, so a figure is never quoted
for the wrong build. `check_source_tree()` runs at import: in a source tree (an editable
install, where `pip install -e .` builds the .so files in place) a compiled module older than
its .py would silently run code that is no longer on disk, so importing refuses, and says how
to rebuild. Installed packages are not checked: their files all carry the install's time.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# The module whose build is reported: on the path of every request, and in setup.py's list.
_PROBE = "sidecar.downstream.protocol"


class StaleBuild(ImportError):
    pass


def compiled() -> bool:
    """True when the request path runs as mypyc-compiled C."""
    module = sys.modules.get(_PROBE) or importlib.import_module(_PROBE)
    origin = getattr(module, "__file__", "") or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def stale_modules(package: Path = _PACKAGE) -> list[str]:
    """Compiled modules of a source tree older than their .py, as paths relative to it."""
    if not (package.parent / "setup.py").exists():
        return []  # an installed package, not a source tree
    # Each module's .so is a shim (its copy keeps an old time when unchanged); the code is in
    # the group library mypyc writes beside the package, rebuilt whenever any source changes.
    groups = [p.stat().st_mtime for p in package.parent.glob("*__mypyc*")]
    stale = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in package.rglob(f"*{suffix}"):
            source = ext.with_name(ext.name[: -len(suffix)] + ".py")
            built = max([ext.stat().st_mtime, *groups])
            if source.exists() and source.stat().st_mtime > built:
                stale.append(str(source.relative_to(package.parent)))
    return sorted(stale)


def use_sources() -> None:
    """Import this package's modules from their .py files even where compiled ones exist
    (SIDECAR_PURE=1): how CI tests the pure-Python build a machine without a compiler gets."""
    loaders = [
        (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
    ]
    for directory in [_PACKAGE, *(p.parent for p in _PACKAGE.rglob("__init__.py"))]:
        sys.path_importer_cache[str(directory)] = importlib.machinery.FileFinder(
            str(directory), *loaders
        )


def check_source_tree() -> None:
    stale = stale_modules(_PACKAGE)
    if stale:
        raise StaleBuild(
            f"compiled modules are older than their sources: {', '.join(stale)}. Rebuild with "
            "`pip install -e .`, or remove the compiled build to run the sources: "
            "`find sidecar -name '*.so' -delete`"
        )
