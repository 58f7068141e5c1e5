"""Compiles the request path with mypyc: the same .py files, built as C extensions.

Why: interpreted, a proxied request spends about 19 us in our Python and profiling finds no hot
spot, only interpreter overhead spread over ~150 calls. mypyc turns those calls and attribute
reads into C: the sidecar's own instructions per request fall to about a third, and a request,
kernel included, costs about 40 % less CPU, from the same source (docs/architecture.md says
what keeps it so). Only modules on the path of every request are compiled; the rest of the
sidecar (config, discovery, admin, metrics) stays interpreted.

    pip install .                       # compiled when a C compiler is present
    SIDECAR_COMPILE=0 pip install .     # pure Python: same behaviour, slower

The extensions are optional: where the compiler or the build fails, the install still succeeds
and the sidecar runs the .py files (it logs `compiled: false` at start). In an editable install
the .so files sit beside the sources, and the in-place build records the size and modification
time of each compiled source (sidecar/_compiled.json). At import, a source tree uses its compiled
modules only while that record matches the files on disk; after an edit it runs the .py files,
with one warning line, until `pip install -e .` (or `python setup.py build_ext --inplace`) runs
again (sidecar/_build.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The build record of an in-place build; sidecar/_build.py reads it (its MANIFEST).
MANIFEST = ROOT / "sidecar" / "_compiled.json"

# The path of every request (docs/architecture.md), and what it calls per request. A module
# here may not be monkeypatched, nor its classes subclassed from interpreted code except the
# base classes marked `allow_interpreted_subclasses`: keep it to the data path.
COMPILED = [
    "sidecar/clock.py",
    "sidecar/flow_control.py",
    "sidecar/streams.py",
    "sidecar/timers.py",
    "sidecar/http/headers.py",
    "sidecar/http/parser.py",
    "sidecar/http/writer.py",
    "sidecar/http/h2engine.py",
    "sidecar/grpc.py",
    "sidecar/downstream/router.py",
    "sidecar/downstream/context.py",
    "sidecar/downstream/exchange.py",
    "sidecar/downstream/protocol.py",
    "sidecar/downstream/http2.py",
    "sidecar/upstream/cluster.py",
    "sidecar/upstream/connection.py",
    "sidecar/upstream/pool.py",
    "sidecar/upstream/http2.py",
    "sidecar/upstream/h2settings.py",
    "sidecar/policy/window.py",
    "sidecar/policy/budget.py",
    "sidecar/policy/breaker.py",
    "sidecar/policy/outlier.py",
    "sidecar/policy/resilience.py",
    "sidecar/observe/stats.py",
]


# The HTTP/2 engine's binding of libnghttp2 (sidecar/http/_nghttp2.py), compiled with cffi in
# API mode where a compiler and libnghttp2-dev exist; without them the engine loads
# libnghttp2.so.14 at run time (ABI mode). Its declarations' file is stamped with the mypyc
# sources: a tree whose binding was built from other declarations runs its sources.
NGHTTP2_CDEF = "sidecar/http/_nghttp2_cdef.py"
NGHTTP2_MODULE = "sidecar.http._nghttp2_api"  # MODULE there
NGHTTP2_C = "build/cffi/_nghttp2_api.c"

# The build environment (pip's isolation, a container's builder stage) has mypy but not the
# runtime dependencies: their types are Any there, which strict mode reports as errors
# (returning Any, unused ignores) and mypyc would refuse to build on. Those checks are for
# `mypy sidecar` in CI, which runs strictly with the dependencies installed.
_BUILD_FLAGS = [
    "--ignore-missing-imports",
    "--no-warn-return-any",
    "--no-warn-unused-ignores",
    "--allow-subclassing-any",
    "--allow-untyped-calls",
    "--allow-untyped-decorators",
]


def stamps() -> dict[str, list[int]]:
    """Size and modification time (ns) of each compiled source, as sidecar/_build.py compares
    them. Taken before mypyc reads the sources: a file edited during the build then differs
    from its record, and the tree runs the sources rather than a build of an older text."""
    out = {}
    for relative in [*COMPILED, NGHTTP2_CDEF]:
        st = (ROOT / relative).stat()
        out[relative] = [st.st_size, st.st_mtime_ns]
    return out


_STAMPS = stamps()


class RecordingBuildExt(build_ext):
    """build_ext that, building in place (`pip install -e .`, `build_ext --inplace`), writes
    the record of which sources the compiled modules were built from."""

    def run(self) -> None:
        super().run()
        if self.inplace:  # also set by pip install -e (setuptools editable_mode)
            mypyc = [ext for ext in self.extensions if ext.name != NGHTTP2_MODULE]
            built = mypyc and all(
                os.path.exists(self.get_ext_fullpath(ext.name)) for ext in mypyc
            )
            if built:
                MANIFEST.write_text(json.dumps({"sources": _STAMPS}, indent=1) + "\n")
            else:  # nothing (or not everything) compiled: the tree runs its sources
                MANIFEST.unlink(missing_ok=True)


def nghttp2_extension() -> list[object]:
    """The compiled binding, optional: without cffi, a compiler or nghttp2.h the install still
    succeeds and the engine runs in ABI mode (scripts/check installs libnghttp2-dev)."""
    try:
        # By path: the package's __init__ must not run at build time.
        spec = importlib.util.spec_from_file_location("_nghttp2_cdef", ROOT / NGHTTP2_CDEF)
        assert spec is not None and spec.loader is not None
        cdef = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cdef)
        (ROOT / NGHTTP2_C).parent.mkdir(parents=True, exist_ok=True)
        cdef.builder().emit_c_code(str(ROOT / NGHTTP2_C))
    except Exception as exc:  # noqa: BLE001 (no cffi in the build environment: ABI mode)
        print(f"setup.py: no compiled nghttp2 binding, ABI mode at run time: {exc!r}",
              file=sys.stderr)
        return []
    return [Extension(NGHTTP2_MODULE, [NGHTTP2_C], libraries=["nghttp2"],
                      extra_compile_args=list(cdef.COMPILE_ARGS), optional=True)]


def ext_modules() -> list[object]:
    if os.environ.get("SIDECAR_COMPILE", "1") == "0":
        MANIFEST.unlink(missing_ok=True)  # asked for pure Python: old .so files stay unused
        return []
    return mypyc_extensions() + nghttp2_extension()


def mypyc_extensions() -> list[object]:
    try:
        from mypyc.build import mypycify
    except ImportError:  # a build without build isolation and without mypy: pure Python
        return []
    try:
        extensions = mypycify([*_BUILD_FLAGS, *COMPILED], opt_level="3", debug_level="0")
    except (Exception, SystemExit) as exc:  # noqa: BLE001 (mypyc exits on type errors)
        # mypyc itself failed (a construct it cannot compile): install the sources, loudly.
        # CI still fails, on the compiled() check (scripts/check, tests/unit/test_build.py).
        print(f"setup.py: mypyc failed, installing pure Python: {exc!r}", file=sys.stderr)
        return []
    for ext in extensions:
        ext.optional = True  # no compiler: install the pure-Python package instead of failing
    return list(extensions)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": RecordingBuildExt})
