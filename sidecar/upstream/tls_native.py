"""Offer a cached TLS session to a new connection without CPython's copy (see upstream/tls.py).

Why. `SSLContext.wrap_bio(..., session=s)` does not hand `s` to OpenSSL: CPython first copies it
through i2d/d2i_SSL_SESSION (`_ssl_session_dup`, a workaround for openssl/openssl#1550), an ASN.1
round trip of the session *and the server's certificate*, whose public key OpenSSL 3 decodes
through its provider machinery. Profiled (py-spy --native) on a client resuming every
connection, that copy was a third of the client's CPU per handshake, more than the handshake's
own cryptography. OpenSSL itself shares an `SSL_SESSION` between connections by reference
count (curl and Envoy do exactly that); the hazards #1550 guards against are covered here: the
loop is one thread, a connection that receives a new ticket copies the session itself
(OpenSSL >= 1.1.1), and a session a failed connection marked not resumable is not offered again
(`offer` returns False and the caller drops it).

How. `ctypes` calls `SSL_set_session` of the very libssl the `_ssl` module is linked against
(looked up through `_ssl`'s own handle), with the `SSL *` and `SSL_SESSION *` read from the
CPython objects (`_ssl._SSLSocket.ssl`, `_ssl.SSLSession.session`: fixed struct layouts since
3.7). Those offsets are not an API, so they are proved at import on objects made for the
purpose (the `SSL *`'s `SSL_CTX *` must be the context's, the session's times must be the
Python object's); anything unexpected (another layout, a statically linked `_ssl`, no ctypes)
leaves `AVAILABLE` False and the caller uses the pure path, `wrap_bio(session=...)`.
`SIDECAR_TLS_NATIVE=0` in the environment forces the pure path.
"""

from __future__ import annotations

import ctypes
import os
import ssl
from typing import Final

_OBJECT_HEAD: Final = object.__basicsize__  # PyObject_HEAD: refcount + type
_PTR: Final = ctypes.sizeof(ctypes.c_void_p)
# struct PySSLSocket { PyObject_HEAD; PyObject *Socket; SSL *ssl; PySSLContext *ctx; ... }
_SOCKET_SSL: Final = _OBJECT_HEAD + _PTR
_SOCKET_CTX: Final = _OBJECT_HEAD + 2 * _PTR
# struct PySSLSession { PyObject_HEAD; SSL_SESSION *session; PySSLContext *ctx; }
_SESSION_PTR: Final = _OBJECT_HEAD
_SESSION_CTX: Final = _OBJECT_HEAD + _PTR
# struct PySSLContext { PyObject_HEAD; SSL_CTX *ctx; ... }
_CONTEXT_PTR: Final = _OBJECT_HEAD


def _field(obj: object, offset: int) -> int:
    """The pointer stored `offset` bytes into the C struct of `obj` (0 when NULL)."""
    return ctypes.c_void_p.from_address(id(obj) + offset).value or 0


class _LibSsl:
    """The three libssl functions the fast path calls, bound with their C signatures."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.set_session = lib.SSL_set_session
        self.set_session.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.set_session.restype = ctypes.c_int
        self.is_resumable = lib.SSL_SESSION_is_resumable
        self.is_resumable.argtypes = [ctypes.c_void_p]
        self.is_resumable.restype = ctypes.c_int
        self.get_ctx = lib.SSL_get_SSL_CTX
        self.get_ctx.argtypes = [ctypes.c_void_p]
        self.get_ctx.restype = ctypes.c_void_p
        self.session_time = lib.SSL_SESSION_get_time
        self.session_time.argtypes = [ctypes.c_void_p]
        self.session_time.restype = ctypes.c_long


def _load() -> _LibSsl | None:
    if os.environ.get("SIDECAR_TLS_NATIVE", "1") == "0":
        return None
    try:
        import _ssl

        path = getattr(_ssl, "__file__", None)
        if not path:  # built into the interpreter: which libssl is not ours to guess
            return None
        lib = _LibSsl(ctypes.CDLL(path))  # dlsym through _ssl's handle: its own libssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        sslobj = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="probe")
        sock = sslobj._sslobj  # type: ignore[attr-defined]  # the _ssl._SSLSocket
        ssl_ptr = _field(sock, _SOCKET_SSL)
        if not ssl_ptr or _field(sock, _SOCKET_CTX) != id(context):
            return None
        if lib.get_ctx(ssl_ptr) != _field(context, _CONTEXT_PTR):
            return None
    except (ImportError, OSError, AttributeError, ValueError, TypeError):
        return None
    return lib


def _session_layout_ok(lib: _LibSsl, session: ssl.SSLSession, context: ssl.SSLContext) -> bool:
    """The session's fields are where we read them (checked once, on the first real session:
    a session cannot be made without a handshake)."""
    pointer = _field(session, _SESSION_PTR)
    return (
        bool(pointer)
        and _field(session, _SESSION_CTX) == id(context)
        and lib.session_time(pointer) == session.time
    )


_LIB: Final = _load()
AVAILABLE: Final = _LIB is not None


class SessionOffer:
    """`offer(sslobj, session)`: `SSL_set_session` by reference, or False (use the pure path)."""

    __slots__ = ("enabled", "_checked", "_session", "_pointer", "_owner")

    def __init__(self, enabled: bool = AVAILABLE) -> None:
        self.enabled = enabled and _LIB is not None
        self._checked = False
        # The last session offered and its two pointers: a name's cached session changes about
        # once per _RECAPTURE, so they are read from it once, not per connection.
        self._session: ssl.SSLSession | None = None
        self._pointer = 0
        self._owner = 0

    def offer(self, sslobj: ssl.SSLObject, session: ssl.SSLSession) -> bool | None:
        """Offer `session` on the not yet started `sslobj` (made by the context the session
        came from). True: offered. False: the session can no longer be resumed (drop it).
        None: the fast path is off; offer it the pure way."""
        lib = _LIB
        if not self.enabled or lib is None:
            return None
        if not self._checked:
            if not _session_layout_ok(lib, session, sslobj.context):
                self.enabled = False
                return None
            self._checked = True
        if session is not self._session:
            self._session = session
            self._pointer = _field(session, _SESSION_PTR)
            self._owner = _field(session, _SESSION_CTX)
        if self._owner != id(sslobj.context):
            return None  # another context's session: the pure path refuses it (ValueError)
        pointer = self._pointer
        if not lib.is_resumable(pointer):
            return False
        sock = sslobj._sslobj  # type: ignore[attr-defined]
        return bool(lib.set_session(_field(sock, _SOCKET_SSL), pointer))
