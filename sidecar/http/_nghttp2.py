"""The binding of libnghttp2 that sidecar/http/h2engine.py uses: compiled, or loaded at run time.

Two builds of the same declarations (sidecar/http/_nghttp2_cdef.py):
- API mode, `sidecar.http._nghttp2_api`, compiled by setup.py where a C compiler and
  libnghttp2-dev exist: the callbacks are generated C (`extern "Python"`), ~3 us cheaper per
  request and side than libffi closures (bench/h2_engine.py);
- ABI mode, the fallback: `ffi.dlopen("libnghttp2.so.14")` at the first session, needing only
  the shared library (Debian/Ubuntu `libnghttp2-14`, present wherever curl is). It is what runs
  when the compiled module is absent, or when the tree runs its sources (SIDECAR_PURE=1, a
  stale build: sidecar/_build.py), so the pure-Python test run covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from sidecar.http._nghttp2_cdef import CDEF

try:
    from sidecar.http import _nghttp2_api as _api  # type: ignore[attr-defined]
except ImportError:
    _api = None

MODE: Final = "api" if _api is not None else "abi"
# The runtime library's soname, as Debian, Ubuntu, Fedora and Alpine ship it.
SONAME: Final = "libnghttp2.so.14"

if _api is not None:
    ffi: Any = _api.ffi
    _lib: Any = _api.lib
else:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    _lib = None


def load() -> Any:
    """The library (ABI mode: opened on first use, so importing this module costs no dlopen)."""
    global _lib
    if _lib is None:
        try:
            _lib = ffi.dlopen(SONAME)
        except OSError as exc:
            raise OSError(f"HTTP/2 needs {SONAME} (apt-get install libnghttp2-14): {exc}") from exc
    return _lib


def c_callback(name: str, ctype: str, fn: Callable[..., int]) -> Any:
    """fn as a C function pointer of type ctype: the compiled `h2e_<name>`, or a libffi
    closure. Called once per process per callback; the result must be kept alive."""
    if _api is not None:
        ffi.def_extern(name=f"h2e_{name}")(fn)
        return getattr(_lib, f"h2e_{name}")
    return ffi.callback(ctype, fn)
