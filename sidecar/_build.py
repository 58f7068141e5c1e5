"""Which build of the request path is running: mypyc-compiled (setup.py) or the .py files.

`compiled()` answers for the startup log line and the benchmark, so a figure is never quoted
for the wrong build. `check_source_tree()` runs at import. In a source tree (an editable
install, where `pip install -e .` builds the .so files in place) the compiled modules are used
only when they were built from exactly the .py files on disk: the build writes a record of
each compiled source's size and modification time (`sidecar/_compiled.json`, setup.py), and
the import compares it with one `stat()` per compiled source. When any differs (a module was
edited, touched, checked out) or the record is missing, the whole tree runs as pure Python,
with one warning line on stderr saying how to rebuild: editing a compiled module never
leaves the checkout unusable, nor runs code that is no longer on disk. Installed packages (a
wheel, the image) are not checked: there the compiled build is the one that was installed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# The module whose build is reported: on the path of every request, and in setup.py's list.
_PROBE = "sidecar.downstream.protocol"
# Written by setup.py's build_ext after an in-place build: {"sources": {path: [size, mtime_ns]}}
# with paths relative to the source tree ("sidecar/timers.py"). Keep the name in step with
# setup.py (MANIFEST there).
MANIFEST = "_compiled.json"
REBUILD = "`pip install -e .` (or `python setup.py build_ext --inplace`)"
NO_RECORD = "(no build record)"


def compiled() -> bool:
    """True when the request path runs as mypyc-compiled C."""
    module = sys.modules.get(_PROBE) or importlib.import_module(_PROBE)
    origin = getattr(module, "__file__", "") or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def source_stamp(path: Path) -> list[int]:
    """What the build record keeps of a source: its size and modification time (ns)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def stale_sources(package: Path = _PACKAGE) -> list[str] | None:
    """None when the tree may run its compiled modules: an installed package, a source tree
    without compiled modules, or one whose build record matches every compiled source.
    Otherwise the sources that differ from the build (relative paths; [NO_RECORD] when
    compiled modules exist without a record). Cost: one stat per compiled source."""
    root = package.parent
    if not (root / "setup.py").exists():
        return None  # an installed package, not a source tree
    try:
        record = json.loads((package / MANIFEST).read_text(encoding="utf-8"))
        sources: dict[str, list[int]] = record["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        # No record: either no compiled build (nothing to say) or one from before records,
        # whose sources cannot be vouched for. One stat of the probe module decides.
        probe = package.joinpath(*_PROBE.split(".")[1:])
        built = any(
            probe.with_name(probe.name + s).exists() for s in importlib.machinery.EXTENSION_SUFFIXES
        )
        return [NO_RECORD] if built else None
    stale = []
    for relative, stamp in sources.items():
        try:
            if source_stamp(root / relative) != stamp:
                stale.append(relative)
        except OSError:
            stale.append(relative)
    return sorted(stale) or None


def use_sources() -> None:
    """Import this package's modules from their .py files even where compiled ones exist: for
    SIDECAR_PURE=1 (how CI tests the build a machine without a compiler gets) and for a tree
    whose compiled modules do not match its sources. A path hook, so no directory is walked:
    every directory of the package gets a finder that knows only source and bytecode files."""
    loaders: list[tuple[type[importlib.abc.Loader], list[str]]] = [
        (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
    ]
    root = str(_PACKAGE)

    def ours(path: str) -> bool:
        return path == root or path.startswith(root + os.sep)

    def source_finder(path: str) -> importlib.machinery.FileFinder:
        if not ours(path):
            raise ImportError("not a directory of the sidecar package")
        return importlib.machinery.FileFinder(path, *loaders)

    sys.path_hooks.insert(0, source_finder)
    # The package's own directory already has a finder (it found sidecar/_build.py): replace it.
    for path in [root, *(p for p in sys.path_importer_cache if ours(p))]:
        sys.path_importer_cache[path] = source_finder(path)


def check_source_tree() -> None:
    """At import: run the compiled modules only if they were built from these sources."""
    stale = stale_sources(_PACKAGE)
    if stale is None:
        return
    use_sources()
    if stale == [NO_RECORD]:
        why = f"compiled modules exist without the record of their build ({MANIFEST})"
    else:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        why = f"the compiled modules were built from other versions of {', '.join(stale[:3])}{more}"
    sys.stderr.write(
        f"sidecar: running the pure-Python sources: {why}; rebuild with {REBUILD}, or delete "
        "them: find sidecar -name '*.so' -delete\n"
    )
