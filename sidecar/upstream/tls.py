"""TLS origination per cluster: the context, session resumption, cert reload, error details."""

# Theory of operation.
#
# Resumption. asyncio's and uvloop's `create_connection` take an `ssl=` context but no `session=`:
# there is no public way to offer a cached `ssl.SSLSession`. Both loops, however, build the
# SSLObject of every connection by calling `context.wrap_bio(incoming, outgoing, server_side=...,
# server_hostname=...)` on the very context they were given, and `wrap_bio` accepts `session=`.
# `_ResumingContext` overrides `wrap_bio` to pass the cached session of that server name, so
# resumption works on both loops with no change to their code.
#
# Capture. A TLS 1.2 session is complete when the handshake ends. TLS 1.3 tickets arrive *after*
# the handshake, in post-handshake messages OpenSSL processes on a later read; the session seen
# right after connect is not resumable. So the session is captured late: after the first response
# bytes (`capture_session`, from the pool's `release`); the newest wins.
# Connections that leave the pool as byte tunnels (TCP listeners, upgrades) never come back for
# either, so the context also keeps the SSLObject of the newest connection per name and, when the
# next connection is made, takes that one's session if a ticket has arrived since.
#
# Cost. Reading `SSLObject.session` is not an attribute read: CPython copies the session through
# i2d/d2i_SSL_SESSION, an ASN.1 round trip of the session and the server's certificate chain. With
# a read on connect, at the first response and at close, it was 40 % of the CPU of a sidecar
# opening a resumed connection per request (resumption was slower than full handshakes). So a
# name's cache is refreshed only when it holds nothing captured in the last _RECAPTURE seconds,
# or when an offered session was not resumed (the server no longer takes it): the session read
# happens about once per name per _RECAPTURE, not per connection. Offering the session costs the
# same copy the other way (`wrap_bio(session=)` copies before SSL_set_session), once per
# connection: tls_native.py hands OpenSSL the cached session itself, by reference, and falls back
# to `session=` where it cannot prove the objects' layout. And the certificate both loops decode
# into the `peercert` extra at every handshake end is decoded only when read (`_PeerCert`).
#
# Scope. Sessions are cached per SNI name, not per endpoint: every endpoint of a cluster serves
# the same name (and, in practice, shares ticket keys or a session cache), so a new connection to
# any endpoint resumes. A session is only ever offered to the name it was made for.
#
# Reload. Existing connections keep the SSLContext they were made with; a reload builds a new one
# for new connections. Python binds a session to the SSL_CTX it came from (offering it to another
# raises "Session refers to a different SSLContext"), and a resumed session skips certificate
# verification, so each context has its own cache: a reload (new CA, new client certificate)
# always starts with one full handshake, which is also what makes a rotated client cert be seen.
# Whoever kept a reference to an older context (the HTTP health checker is given one at start)
# still gets the new material: a superseded context hands every new connection to the current one.
#
# Where. Every connection the pool opens to a TLS cluster is TLS: HTTP requests, `Upgrade`
# tunnels and `protocol: tcp` listeners (the app sends plaintext, the upstream receives it over
# TLS; TLS as asyncio does it cannot carry the app's half-close, so the tunnel keeps the other
# direction open until the upstream closes), and CONNECT tunnels routed to a TLS cluster: the
# operator said that cluster speaks TLS, so the app's bytes inside the tunnel are plaintext
# and the sidecar wraps them (issue 4). An app that does its own TLS (https:// through
# HTTP_PROXY) CONNECTs to a forward-proxy target: those get dynamic clusters without TLS and
# tunnel the app's bytes as they are.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from sidecar.clock import MONOTONIC, Clock
from sidecar.upstream.tls_native import SessionOffer

if TYPE_CHECKING:
    from sidecar.config import TlsConfig

log = logging.getLogger("sidecar.tls")

_RECAPTURE: Final = 10.0  # seconds a captured session is kept before a newer one is read
_VERSIONS: Final = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
DEFAULT_HANDSHAKE_TIMEOUT: Final = 5.0
INSECURE_WARNING: Final = (
    "insecure_skip_verify is on: the upstream's certificate and hostname are NOT verified"
)

# A file's identity as seen through its symlinks: a Kubernetes secret update swaps the `..data`
# symlink to a new directory, so the resolved path and inode change even if mtime and size do not.
_Fingerprint = tuple[tuple[object, ...], ...]


_SNI_KEYS: Final[dict[str | bytes, str]] = {}  # server name as given -> its cache key
_SNI_KEYS_MAX: Final = 1024


def _sni_key(name: str | bytes) -> str:
    """The form `SSLObject.server_hostname` reports (IDNA A-label): lookups and captures agree.
    Remembered per name: the IDNA codec is a Python-level codec, read on every connect."""
    key = _SNI_KEYS.get(name)
    if key is None:
        key = (name.encode("idna") if isinstance(name, str) else name).decode("ascii").lower()
        if len(_SNI_KEYS) >= _SNI_KEYS_MAX:
            _SNI_KEYS.clear()
        _SNI_KEYS[name] = key
    return key


def _still_valid(session: ssl.SSLSession) -> bool:
    # OpenSSL stamps sessions with wall-clock seconds, so this compares against wall-clock time.
    return session.time + session.timeout > time.time()  # noqa: TID251 (wall clock, as OpenSSL)


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt for an encrypted key's passphrase on the terminal;
    # this makes such a key fail to load instead of hanging a daemon.
    return b""


def _resumable(sslobj: ssl.SSLObject) -> ssl.SSLSession | None:
    """The connection's session if a later connection could resume it, else None."""
    session = sslobj.session
    if session is None:
        return None
    if sslobj.version() == "TLSv1.3":
        # Before its NewSessionTicket arrives a TLS 1.3 session cannot be resumed; storing it
        # would evict a good ticket with a useless one.
        return session if session.has_ticket else None
    return session if session.has_ticket or session.id else None


class _Current:
    """The context an origin gives new connections; shared by every context it ever built."""

    __slots__ = ("context",)

    def __init__(self) -> None:
        self.context: _ResumingContext | None = None


class TlsFileError(ValueError):
    """A CA, certificate or key file that cannot be loaded: a configuration error, named."""


@contextlib.contextmanager
def _naming(setting: str, paths: str) -> Iterator[None]:
    """Turn a failed load into a TlsFileError naming the setting and the file(s)."""
    try:
        yield
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        if isinstance(exc, ssl.SSLError):
            reason = _reason_text(exc) if exc.reason else str(exc)
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = str(exc)
        raise TlsFileError(f"tls.{setting} {paths}: {reason}") from exc


class _PeerCert(Mapping[str, Any]):
    """`getpeercert()`'s dict, decoded when first read rather than at every handshake.

    Both loops call `getpeercert()` when a handshake completes, for the transport's `peercert`
    extra, which nothing in the sidecar reads; decoding the certificate's names into Python
    tuples was 6 % of the CPU of a resumed TLS 1.2 connection. Read it and it is the same dict.
    """

    __slots__ = ("_sslobj", "_decoded")

    def __init__(self, sslobj: ssl.SSLObject) -> None:
        self._sslobj = sslobj
        self._decoded: dict[str, Any] | None = None

    def _cert(self) -> dict[str, Any]:
        if self._decoded is None:
            self._decoded = ssl.SSLObject.getpeercert(self._sslobj) or {}
        return self._decoded

    def __getitem__(self, key: str) -> Any:
        return self._cert()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cert())

    def __len__(self) -> int:
        return len(self._cert())

    def __repr__(self) -> str:
        return repr(self._cert())


class _SSLObject(ssl.SSLObject):
    """An SSLObject whose decoded peer certificate is computed when asked for (`_PeerCert`)."""

    def getpeercert(self, binary_form: bool = False) -> Any:
        if binary_form or not self.context.verify_mode:
            # The DER bytes are not decoded; an unverified peer's dict is {} at no cost.
            return super().getpeercert(binary_form)
        return _PeerCert(self)


class _ResumingContext(ssl.SSLContext):
    """A client context whose `wrap_bio` offers the cached session of the server name asked for."""

    sslobject_class = _SSLObject

    sessions: dict[str, ssl.SSLSession]
    session_reuse: bool
    current: _Current
    # The newest connection per server name: its session may have become resumable since.
    newest: dict[str, ssl.SSLObject]
    # When each name's session was captured (clock seconds): younger than _RECAPTURE, none is
    # read.
    captured_at: dict[str, float]
    clock: Clock
    # Offers a cached session by reference, not through CPython's copy (see tls_native.py).
    offer: SessionOffer

    def wants_session(self, key: str) -> bool:
        captured = self.captured_at.get(key)
        return captured is None or self.clock.now() - captured >= _RECAPTURE

    def keep(self, key: str, session: ssl.SSLSession) -> None:
        self.sessions[key] = session
        self.captured_at[key] = self.clock.now()

    def forget(self, key: str) -> None:
        """Drop the name's session: the next connection's is read (see Cost)."""
        self.sessions.pop(key, None)
        self.captured_at.pop(key, None)

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        successor = self.current.context
        if successor is not None and successor is not self and not server_side and session is None:
            # Superseded by a reload: new connections get the new material (and its sessions).
            return successor.wrap_bio(incoming, outgoing, server_side, server_hostname)
        if session is None and self.session_reuse and not server_side and server_hostname:
            key = _sni_key(server_hostname)
            newest = self.newest.pop(key, None)
            if newest is not None:
                fresh = _resumable(newest) if self.wants_session(key) else None
                if fresh is not None:
                    self.keep(key, fresh)
                else:
                    self.newest[key] = newest  # its ticket may still come; keep waiting
            cached = self.sessions.get(key)
            if cached is not None and not _still_valid(cached):
                self.forget(key)
            elif cached is not None:
                if self.offer.enabled:
                    sslobj = super().wrap_bio(incoming, outgoing, server_side, server_hostname)
                    offered = self.offer.offer(sslobj, cached)
                    if offered is not None:
                        if not offered:  # marked not resumable (a failed connection used it)
                            self.forget(key)
                        return sslobj
                    # The fast path turned itself off (unexpected layout): the pure way below.
                try:
                    return super().wrap_bio(
                        incoming, outgoing, server_side, server_hostname, session=cached
                    )
                except ValueError:
                    # A session this context cannot take (another SSL_CTX): drop it and do a
                    # full handshake. An offered session the *server* no longer knows is not an
                    # error at all: OpenSSL silently falls back to a full handshake.
                    self.forget(key)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session=session)


class TlsOrigin:
    """One cluster's TLS client side: context, session cache, counters, and cert reload."""

    def __init__(
        self,
        *,
        sni: str,
        enabled: bool = True,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        session_reuse: bool = True,
        alpn: Sequence[str] = ("http/1.1",),
        min_version: str = "TLSv1.2",
        insecure_skip_verify: bool = False,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        handshakes: dict[bool, int] | None = None,
        clock: Clock = MONOTONIC,
        native_sessions: bool = True,
    ) -> None:
        """Build the first context; a bad file or option raises (a config error at start).

        `handshakes` may be the cluster's stats dict (`{True: n, False: n}`) to count into.
        `handshake_timeout` None: the TCP connect and the handshake share the pool's
        connect_timeout (see `connect_timeouts`). `native_sessions` False: offer cached
        sessions the pure way, through CPython's copy (see tls_native.py).
        """
        if min_version not in _VERSIONS:
            raise ValueError(f"min_version must be one of {', '.join(_VERSIONS)}: {min_version!r}")
        if key_file is not None and cert_file is None:
            raise ValueError("key_file needs cert_file")
        if not sni:
            raise ValueError(
                "tls.sni is required when the discovery endpoints are IP addresses (it names "
                "the certificate to verify and the SNI to send)"
            )
        if handshake_timeout is not None and handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        self.enabled = enabled
        # Typed optional only to match the pool's TlsHooks protocol; it is never None here.
        self.server_hostname: str | None = sni
        self.sni = sni
        self.ca_file = os.fspath(ca_file) if ca_file is not None else None
        self.cert_file = os.fspath(cert_file) if cert_file is not None else None
        self.key_file = os.fspath(key_file) if key_file is not None else None
        self.session_reuse = session_reuse
        self.alpn = list(alpn)
        self.min_version = min_version
        self.insecure_skip_verify = insecure_skip_verify
        self.handshake_timeout = None if handshake_timeout is None else float(handshake_timeout)
        self.handshakes: dict[bool, int] = handshakes if handshakes is not None else {}
        self.handshakes.setdefault(True, 0)
        self.handshakes.setdefault(False, 0)
        self.reloads = 0
        self.reload_errors = 0
        self.clock = clock
        self.native_sessions = native_sessions
        self._current = _Current()
        self._seen: _Fingerprint = ()
        if not enabled:
            return
        if insecure_skip_verify:
            log.warning("tls: %s (sni %s)", INSECURE_WARNING, sni)
        self._seen = self._fingerprint()
        self._current.context = self._build()

    @classmethod
    def from_config(
        cls,
        cfg: TlsConfig,
        default_sni: str,
        *,
        speaks: frozenset[str] | None = None,
        handshakes: dict[bool, int] | None = None,
    ) -> TlsOrigin | None:
        """From a cluster's `tls` section; None when TLS is off. `speaks`: the ALPN ids the
        upstream leg can serve; the configured `alpn` is offered without the others, so that an
        endpoint cannot choose what nothing here speaks (None: offer it as configured)."""
        if not cfg.enabled:
            return None
        return cls(
            sni=cfg.sni or default_sni,
            ca_file=cfg.ca_file,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            session_reuse=cfg.session_reuse,
            alpn=[p for p in cfg.alpn if speaks is None or p in speaks],
            min_version=cfg.min_version,
            insecure_skip_verify=cfg.insecure_skip_verify,
            handshake_timeout=cfg.handshake_timeout,  # None: the pool's connect_timeout
            handshakes=handshakes,
        )

    # --- what the connection code calls -----------------------------------------------------
    def context_for_connect(self) -> ssl.SSLContext:
        """The current context; pass it as `ssl=` with `server_hostname=self.server_hostname`."""
        context = self._current.context
        if context is None:
            raise RuntimeError("TLS is disabled for this cluster")
        return context

    @property
    def _context(self) -> _ResumingContext | None:
        return self._current.context

    def connect_timeouts(self, connect_timeout: float) -> tuple[float, float]:
        """(the handshake's own limit, the limit of TCP connect + handshake) for a connect.

        Without a `handshake_timeout` both share `connect_timeout`, as in plain TCP; with one,
        the TCP connect keeps `connect_timeout` and the handshake gets its own on top.
        """
        if self.handshake_timeout is None:
            return connect_timeout, connect_timeout
        return self.handshake_timeout, connect_timeout + self.handshake_timeout

    def on_connected(self, transport: asyncio.BaseTransport) -> None:
        """After `create_connection` returned: count the handshake, keep a TLS 1.2 session, and
        remember the connection so that the next connect can take its TLS 1.3 ticket."""
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None:
            return
        resumed = bool(sslobj.session_reused)
        self.handshakes[resumed] += 1
        context = sslobj.context
        hostname = sslobj.server_hostname
        if not (self.session_reuse and isinstance(context, _ResumingContext) and hostname):
            return
        key = _sni_key(hostname)
        if not resumed:
            context.captured_at.pop(key, None)  # what we offered (if anything) was refused
        if context.wants_session(key):
            self.capture_session(transport)
            context.newest[key] = sslobj

    def capture_session(self, transport: asyncio.BaseTransport) -> None:
        """Keep the connection's newest session; call once the first response bytes arrived."""
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None or not self.session_reuse or sslobj.server_side:
            return
        context = sslobj.context
        hostname = sslobj.server_hostname
        if not isinstance(context, _ResumingContext) or not hostname:
            return
        key = _sni_key(hostname)
        if not context.wants_session(key):
            return  # one captured less than _RECAPTURE ago is cached (see Cost)
        session = _resumable(sslobj)
        if session is None:
            return
        # Into the cache of the context that made this connection: after a reload, connections
        # of the old context must not feed sessions to the new one.
        context.keep(key, session)

    def describe_error(self, exc: BaseException) -> str:
        """`describe_tls_error`, plus the setting of this origin that explains the failure."""
        detail = describe_tls_error(exc)
        kind = classify_tls_error(exc)
        if kind == "unknown_ca":
            return f"{detail}; trusting {self.ca_file or 'the system trust store'}"
        if kind == "protocol_version":
            return f"{detail}; min_version is {self.min_version}"
        if kind in ("handshake_failure", "client_certificate_rejected"):
            mine = self.cert_file or "none configured"
            return f"{detail}; client certificate: {mine}"
        return detail

    # --- observation ------------------------------------------------------------------------
    def resumption_ratio(self) -> float | None:
        """Resumed / all completed handshakes; None before the first one."""
        total = self.handshakes[True] + self.handshakes[False]
        return self.handshakes[True] / total if total else None

    def cached_sessions(self) -> int:
        return len(self._context.sessions) if self._context is not None else 0

    def __repr__(self) -> str:
        return (
            f"<TlsOrigin sni={self.sni} [Handshakes: {self.handshakes[True]} resumed, "
            f"{self.handshakes[False]} full | Sessions: {self.cached_sessions()} | "
            f"Reloads: {self.reloads}, {self.reload_errors} rejected]>"
        )

    # --- certificate reload -----------------------------------------------------------------
    def maybe_reload(self) -> bool:
        """Rebuild the context if a cert/key/CA file changed; True when a new one is in use.

        A file that fails to load is rejected with a log line: the previous context stays in use,
        and the same broken files are not retried until they change again.
        """
        if not self.enabled:
            return False
        seen = self._fingerprint()  # before reading: a change during the read is seen next time
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            context = self._build()
        except (OSError, ValueError) as exc:  # TlsFileError, or anything else a load raises
            self.reload_errors += 1
            log.error(
                "tls: rejected new certificate files for sni %s, keeping the previous ones: %s",
                self.sni,
                exc,
            )
            return False
        self._current.context = context
        self.reloads += 1
        log.info("tls: reloaded certificate files for sni %s", self.sni)
        return True

    async def watch(self, interval: float) -> None:
        """Call `maybe_reload` every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.maybe_reload()

    def _files(self) -> list[str]:
        return [p for p in (self.ca_file, self.cert_file, self.key_file) if p is not None]

    def _fingerprint(self) -> _Fingerprint:
        out: list[tuple[object, ...]] = []
        for path in self._files():
            try:
                real = os.path.realpath(path)
                st = os.stat(real)
            except OSError as exc:
                out.append((path, "error", exc.errno))
                continue
            out.append((path, real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _build(self) -> _ResumingContext:
        context = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # verification + hostname check on
        context.minimum_version = _VERSIONS[self.min_version]
        if self.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_file is not None:
            ca_file = self.ca_file
            with _naming("ca_file", ca_file):
                context.load_verify_locations(cafile=ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if self.cert_file is not None:
            cert_file, key_file = self.cert_file, self.key_file
            with _naming("cert_file/key_file", f"{cert_file}, {key_file or cert_file}"):
                context.load_cert_chain(cert_file, key_file, password=_no_password)
        if self.alpn:
            context.set_alpn_protocols(self.alpn)
        context.sessions = {}
        context.session_reuse = self.session_reuse
        context.current = self._current
        context.newest = {}
        context.captured_at = {}
        context.clock = self.clock
        context.offer = SessionOffer(self.native_sessions)
        return context


# --- error details for 502 connect_failed ----------------------------------------------------
_PROTOCOL_REASONS: Final = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "WRONG_SSL_VERSION",
        "VERSION_TOO_LOW",
        "VERSION_TOO_HIGH",
    }
)
_CLIENT_CERT_REASONS: Final = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
    }
)
_NOT_TLS_REASONS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE"}
)
_ALPN_REASONS: Final = frozenset({"TLSV1_ALERT_NO_APPLICATION_PROTOCOL", "NO_APPLICATION_PROTOCOL"})
# X509_V_ERR_* codes: https://docs.openssl.org/3.0/man1/openssl-verification-options/
_UNKNOWN_CA_CODES: Final = frozenset({2, 18, 19, 20, 21})
_EXPIRED: Final = 10
_NOT_YET_VALID: Final = 9
_HOSTNAME_CODES: Final = frozenset({62, 64})
_HANDSHAKE_TIMEOUT = re.compile(r"SSL handshake is taking longer than ([0-9.]+) seconds")


def _tls_cause(exc: BaseException) -> BaseException:
    """The most telling exception in a `raise ... from` chain (an SSLError beats a wrapper)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ssl.SSLError, TimeoutError, ConnectionAbortedError)):
            return current
        current = current.__cause__ or current.__context__
    return exc


def _reason_text(exc: ssl.SSLError) -> str:
    reason = exc.reason or ""
    return reason.lower().replace("_", " ") if reason else str(exc)


def classify_tls_error(exc: BaseException) -> str:
    """A bounded kind for logs and metrics: `unknown_ca`, `hostname_mismatch`, `expired`, ..."""
    exc = _tls_cause(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _UNKNOWN_CA_CODES:
            return "unknown_ca"
        if code in _HOSTNAME_CODES:
            return "hostname_mismatch"
        if code == _EXPIRED:
            return "expired"
        if code == _NOT_YET_VALID:
            return "not_yet_valid"
        return "verify_failed"
    if isinstance(exc, TimeoutError):
        return "handshake_timeout"
    if isinstance(exc, ConnectionAbortedError) and _HANDSHAKE_TIMEOUT.search(str(exc)):
        return "handshake_timeout"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "closed_during_handshake"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _PROTOCOL_REASONS:
            return "protocol_version"
        if reason in _CLIENT_CERT_REASONS:
            return "client_certificate_rejected"
        if reason in _NOT_TLS_REASONS:
            return "not_tls"
        if reason in _ALPN_REASONS:
            return "alpn"
        if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
            return "handshake_failure"
        return "tls_error"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, ConnectionResetError):
        return "closed_during_handshake"
    return "connect_error"


def describe_tls_error(exc: BaseException) -> str:
    """The `detail` of a 502 `connect_failed` for a failed TLS connect, in a user's terms."""
    kind = classify_tls_error(exc)
    exc = _tls_cause(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or _reason_text(exc)).rstrip(".")
        message = message[:1].lower() + message[1:]
        if kind == "unknown_ca":
            return f"certificate verify failed: {message} (unknown CA)"
        return f"certificate verify failed: {message}"
    if kind == "handshake_timeout":
        match = _HANDSHAKE_TIMEOUT.search(str(exc))
        if match:
            return f"TLS handshake timeout: no handshake within {match.group(1)}s"
        return "TLS handshake timeout: connect or handshake did not finish in time"
    if kind == "closed_during_handshake":
        return "TLS handshake failed: the upstream closed the connection"
    if isinstance(exc, ssl.SSLError):
        reason = _reason_text(exc)
        if kind == "protocol_version":
            return f"TLS protocol version: no version in common with the upstream ({reason})"
        if kind == "client_certificate_rejected":
            return f"TLS client certificate rejected by the upstream ({reason})"
        if kind == "not_tls":
            return f"TLS handshake failed: the upstream does not speak TLS ({reason})"
        if kind == "alpn":
            return f"TLS ALPN: no application protocol in common ({reason})"
        if kind == "handshake_failure":
            # TLS 1.2 servers send this one alert for a missing client certificate as well as
            # for no common cipher or curve.
            return (
                "TLS handshake refused by the upstream: no common cipher or curve, or a client "
                f"certificate required ({reason})"
            )
        return f"TLS error: {reason}"
    if kind == "connection_refused":
        return "connection refused"
    return f"connect failed: {type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
