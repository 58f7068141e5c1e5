"""HTTP/2 connection engine, sans-IO: bytes in, sink callbacks and bytes out (libnghttp2 inside).

Theory of operation. `H2Session` wraps one nghttp2 session. The Protocol that owns the socket
feeds what it read to `receive()`; the engine calls the `H2Sink` (the Protocol itself) for each
head, chunk of body, trailers, reset, window opening, GOAWAY, PING ACK and SETTINGS, from
inside that call; the sink may answer at once (send_headers/send_data/... only queue frames).
After the read batch the Protocol writes `data_to_send()` once (corking).

Why nghttp2 (bench/h2_engine.py, in memory, CPU per gRPC unary request and side): the `h2`
library costs ~85-130 us (its validation off or on), nghttp2 ~14-17 us through the compiled
cffi binding and ~18-21 us through the ABI-mode fallback (sidecar/http/_nghttp2.py): HPACK,
framing and HTTP messaging checks run in C, and nghttp2 carries the hardening written after
the 2019 and 2023-24 attacks (outbound ACK floods, reset rate, CONTINUATION count).

Flow control is the consumer's: nghttp2's automatic WINDOW_UPDATE is off, and a window opens
only when the caller says the bytes left the sidecar (`consume`). Bytes delivered on a stream
that then closes are given back to the connection window by the engine.

Abuse (SPEC section 11), each reported through `on_h2_abuse` before `receive` raises
H2ProtocolError, with GOAWAY(ENHANCE_YOUR_CALM) queued:
- rapid_reset: streams the client resets before our answer was all queued count against
  those it completes; a debt above RAPID_RESET_DEBT (server role) ends the connection
  (CVE-2023-44487); nghttp2's own reset rate limit (1000 burst, 33/s) stays as a backstop;
- continuation_flood: more CONTINUATION frames than MAX_CONTINUATIONS after one HEADERS;
- hpack_bomb: one decoded header list over HEADER_BOMB_FACTOR (4) times `max_header_bytes`
  (32 bytes per field counted, as SETTINGS_MAX_HEADER_LIST_SIZE, which we advertise) or times
  `max_headers` fields, or more than OVERSIZED_HEADER_DEBT oversized blocks (below) not paid
  back by blocks within the limits;
- settings_flood / ping_flood: more than MAX_OUTBOUND_ACK ACKs owed (the peer sends faster
  than it reads), or more than MAX_SETTINGS entries in one SETTINGS frame.
Zero-window stalls are the caller's (it owns the timers): `send_window` tells it.

Stream errors, where RFC 9113 makes them so (the connection and its other streams go on):
- a header block over `max_header_bytes` or `max_headers` but within HEADER_BOMB_FACTOR times
  them: nghttp2 keeps decoding it (HPACK state is the connection's), the fields past the limit
  are dropped (`content-type` excepted, so that a gRPC call is answered in kind), and the sink
  gets `on_h2_too_large` instead of the head or trailers: the server answers 431 on that
  stream, the client fails that stream. Each such block adds one to a debt that each block
  within the limits pays back; a debt over OVERSIZED_HEADER_DEBT is `hpack_bomb`. A name or
  value over 64 KiB as encoded stays a connection error (COMPRESSION_ERROR): nghttp2's decoder
  refuses it (NGHTTP2_HD_MAX_NV), whatever our limits.
- a stream beyond our SETTINGS_MAX_CONCURRENT_STREAMS (server role): RST_STREAM
  REFUSED_STREAM at its first HEADERS, before the sink sees it (RFC 9113 5.1.2). nghttp2 makes
  a stream beyond its *acknowledged* local limit a connection error, so it is given a backstop
  above ours (ours + STREAM_LIMIT_MARGIN) while the peer is told ours: the SETTINGS frame's
  bytes are rewritten on the way out (the ACK carries no values, so nghttp2's accounting of it
  holds). A refused stream adds one to the rapid-reset debt: a peer that keeps opening streams
  beyond the limit is cut off as rapid_reset before it reaches the backstop.
"""

from __future__ import annotations

from typing import Any, Final

from mypy_extensions import mypyc_attr

from sidecar.http import _nghttp2

ffi: Final[Any] = _nghttp2.ffi
# cffi's backend functions themselves: FFI's methods of the same names are Python wrappers,
# one more call for every header field received.
_backend: Final[Any] = getattr(ffi, "_backend", None)  # ABI mode's FFI wraps its backend
_from_handle: Final[Any] = _backend.from_handle if _backend else ffi.from_handle
_unpack: Final[Any] = _backend.unpack if _backend else ffi.unpack
_newp: Final[Any] = _backend.newp if _backend else ffi.new
_NV_ARRAY: Final[Any] = ffi.typeof("nghttp2_nv[]")

# nghttp2.h constants
_FLAG_END_STREAM: Final = 0x1
_FLAG_ACK: Final = 0x1
_DATA: Final = 0
_HEADERS: Final = 1
_RST_STREAM: Final = 3
_SETTINGS: Final = 4
_PING: Final = 6
_GOAWAY: Final = 7
_WINDOW_UPDATE: Final = 8
_HCAT_REQUEST: Final = 0
_HCAT_RESPONSE: Final = 1
_DATA_FLAG_EOF: Final = 0x1
_DATA_FLAG_NO_END_STREAM: Final = 0x2
_ERR_DEFERRED: Final = -508
_ERR_TEMPORAL_CALLBACK_FAILURE: Final = -521
_ERR_TOO_MANY_SETTINGS: Final = -537
_ERR_CALLBACK_FAILURE: Final = -902
_ERR_FLOODED: Final = -904
_ERR_TOO_MANY_CONTINUATIONS: Final = -905
_SETTINGS_HEADER_TABLE_SIZE: Final = 1
_SETTINGS_ENABLE_PUSH: Final = 2
_SETTINGS_MAX_CONCURRENT_STREAMS: Final = 3
_SETTINGS_INITIAL_WINDOW_SIZE: Final = 4
_SETTINGS_MAX_HEADER_LIST_SIZE: Final = 6

ENHANCE_YOUR_CALM: Final = 0xB
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8

# Limits (SPEC section 11). The debt rises by one per stream the client resets and falls by one
# per stream completed (never below zero): a client cancelling a fair share of its calls never
# reaches it, one that resets most of what it opens does within a few hundred streams.
RAPID_RESET_DEBT: Final = 200
MAX_CONTINUATIONS: Final = 8  # nghttp2's default: 8 x 16 KiB frames > any sane header block
MAX_OUTBOUND_ACK: Final = 1000  # PING/SETTINGS ACKs owed before the peer counts as flooding
MAX_SETTINGS: Final = 32  # entries in one SETTINGS frame
_FIELD_OVERHEAD: Final = 32  # RFC 9113 section 6.5.2: a field costs its name + value + 32
# A header block over the limits is the one stream's error up to this many times them; beyond,
# the peer is decoding-amplifying (HPACK bomb) and the connection ends.
HEADER_BOMB_FACTOR: Final = 4
# Oversized header blocks (each answered 431) a connection may send beyond those within the
# limits before it counts as an HPACK bomb: each costs us a whole decode and an answer.
OVERSIZED_HEADER_DEBT: Final = 32
# nghttp2's own stream limit (a connection error once acknowledged) sits this far above ours,
# beyond the rapid-reset debt, so that our refusals (REFUSED_STREAM, counted) come first.
STREAM_LIMIT_MARGIN: Final = RAPID_RESET_DEBT + 56


class H2ProtocolError(Exception):
    """A connection error: the caller writes `data_to_send()` (GOAWAY), then closes."""


@mypyc_attr(allow_interpreted_subclasses=True)
class H2Sink:
    """What the engine calls. The connection Protocol implements it; defaults ignore. The HTTP/2
    legs subclass it compiled; the tests' recording sinks subclass it interpreted."""

    def on_h2_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        """A request or response head (1xx included)."""

    def on_h2_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Body bytes; call `consume(stream_id, len(data))` once they left the sidecar."""

    def on_h2_trailers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Trailers; the stream's inbound side ended."""

    def on_h2_reset(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM from the peer, or a stream the engine (or GOAWAY) closed."""

    def on_h2_window_open(self, stream_id: int) -> None:
        """More may be sent on stream_id (0: the connection window, for every stream)."""

    def on_h2_goaway(self, last_stream_id: int, error_code: int) -> None:
        """The peer sent GOAWAY; streams above last_stream_id come back as resets (7)."""

    def on_h2_ping_ack(self) -> None:
        """A PING this side sent was answered."""

    def on_h2_settings(self, peer_max_concurrent_streams: int) -> None:
        """The peer's SETTINGS arrived (or changed)."""

    def on_h2_too_large(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                        end_stream: bool, trailers: bool) -> None:
        """A head (`trailers` False) or trailers over `max_header_bytes` or `max_headers`, in
        place of on_h2_headers / on_h2_trailers: `headers` holds the fields within the limits
        (and any `content-type`). The stream is still open: answer or reset it."""

    def on_h2_abuse(self, kind: str) -> None:
        """'rapid_reset' | 'continuation_flood' | 'hpack_bomb' | 'settings_flood' |
        'ping_flood'; GOAWAY(ENHANCE_YOUR_CALM) is already queued and receive() raises next."""


# What a closed session's callbacks would reach instead of the connection (H2Session.close).
_NO_SINK: Final = H2Sink()


class _Stream:
    """The engine's side of one stream: outbound buffer and inbound accounting."""

    __slots__ = ("out", "end", "trailers", "deferred", "unconsumed", "final", "local_reset",
                 "reported")

    def __init__(self) -> None:
        self.out = bytearray()  # accepted, not yet framed by nghttp2
        self.end = False  # the caller ended its side (END_STREAM after `out`, or trailers)
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.deferred = False  # nghttp2 waits for resume_data
        self.unconsumed = 0  # delivered to the sink, not yet consumed
        self.final = False  # client: a non-1xx response head arrived
        self.local_reset = False  # the caller reset it: no on_h2_reset back
        self.reported = False  # on_h2_reset already called


def _nva(headers: list[tuple[bytes, bytes]]) -> tuple[Any, Any]:
    """An nghttp2_nv array over one buffer holding every name and value (nghttp2 copies it
    on submit, so an array may serve again). gRPC answers and trailers repeat from call to
    call: those come from a small cache."""
    key = tuple(headers)
    hit = _NVA_CACHE.get(key)
    if hit is not None:
        return hit
    buf = ffi.from_buffer(b"".join([b for h in headers for b in h]))
    rows = []
    off = 0
    for name, value in headers:
        n = len(name)
        v = len(value)
        rows.append((buf + off, buf + off + n, n, v, 0))
        off += n + v
    made = (_newp(_NV_ARRAY, rows), buf)
    if len(key) <= 8 and off <= 1024:
        if len(_NVA_CACHE) >= _NVA_CACHE_SIZE:
            _NVA_CACHE.clear()
        _NVA_CACHE[key] = made
    return made


_NVA_CACHE: dict[tuple[tuple[bytes, bytes], ...], tuple[Any, Any]] = {}
_NVA_CACHE_SIZE: Final = 256


def _goaway_frame(last_stream_id: int, error_code: int) -> bytes:
    return (
        b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"
        + (last_stream_id & 0x7FFFFFFF).to_bytes(4, "big")
        + error_code.to_bytes(4, "big")
    )


def _with_setting(out: bytes, setting: int, value: int) -> bytes:
    """out with `setting` of its first SETTINGS frame (not an ACK) set to value."""
    i = 0
    buf = bytearray(out)
    while i + 9 <= len(buf):
        n = int.from_bytes(buf[i:i + 3], "big")
        if buf[i + 3] == _SETTINGS and not buf[i + 4] & _FLAG_ACK:
            for e in range(i + 9, i + 9 + n - 5, 6):
                if int.from_bytes(buf[e:e + 2], "big") == setting:
                    buf[e + 2:e + 6] = value.to_bytes(4, "big")
            return bytes(buf)
        i += 9 + n
    raise RuntimeError("no SETTINGS frame to rewrite")


def _goaway_in(out: bytes) -> tuple[int, bytes]:
    """The error code and debug data of the GOAWAY frame in out (-1 when none)."""
    i = 0
    while i + 9 <= len(out):
        n = int.from_bytes(out[i:i + 3], "big")
        if out[i + 3] == _GOAWAY and n >= 8:
            return int.from_bytes(out[i + 13:i + 17], "big"), out[i + 17:i + 9 + n]
        i += 9 + n
    return -1, b""


class H2Session:
    """One HTTP/2 connection, client or server side."""

    def __init__(
        self,
        sink: H2Sink,
        client: bool,
        *,
        max_concurrent_streams: int = 1000,
        initial_window: int = 1 << 20,
        max_header_bytes: int = 65536,
        max_headers: int = 200,
        connection_window: int | None = None,
    ) -> None:
        lib = _nghttp2.load()
        self._lib = lib
        self._sink = sink
        self._client = client
        self._max_concurrent = max_concurrent_streams
        self._initial_window = initial_window
        # Beyond one stream window, so that one stream whose consumer stalls cannot stop the
        # others; bounded, so that the connection's memory is.
        self._conn_window = connection_window or min(initial_window * 8, (1 << 31) - 1)
        self._max_header_bytes = max_header_bytes
        self._max_headers = max_headers
        self._streams: dict[int, _Stream] = {}
        self._blocked: set[int] = set()
        self._hdr: list[tuple[bytes, bytes]] = []
        self._hdr_bytes = 0
        self._hdr_dropped = 0  # fields of the current block past the limits (not kept)
        self._oversized_debt = 0
        self._pending_sid = 0  # a DATA frame's chunk held until its END_STREAM flag is known
        self._pending: bytes = b""
        self._exc: BaseException | None = None
        self._abuse = ""
        self._last_control = ""  # 'ping_flood' | 'settings_flood': what an ACK flood was
        self._error_msg = ""
        self._reset_debt = 0
        self._dead = False
        self._tail = b""  # bytes to write once the session is dead (our GOAWAY)
        self._early = b""  # framed during receive(), not yet handed out
        self._goaway_sent = False
        self._goaway_received = False
        self._closed = False  # close(): the nghttp2 session is freed, every method a no-op
        self._busy = False  # inside nghttp2 (mem_recv/mem_send): close() frees on the way out
        callbacks = _callbacks(lib)
        self._handle = ffi.new_handle(self)
        # The buffer under the last nghttp2_nv array submitted (`_nva`): nghttp2 copies the
        # fields on submit, so it must live across that call. Kept here, not in a local: the
        # compiled module frees a local after its last use, before the call that reads it.
        self._nva_keep: Any = None
        self._pp = ffi.new("char **")
        self._prd = ffi.new("nghttp2_data_provider *")
        self._prd.read_callback = _C_CALLBACKS["read"]
        opt = ffi.new("nghttp2_option **")
        lib.nghttp2_option_new(opt)
        o = opt[0]
        try:
            lib.nghttp2_option_set_no_auto_window_update(o, 1)
            lib.nghttp2_option_set_max_send_header_block_length(o, max(max_header_bytes, 65536))
            lib.nghttp2_option_set_max_outbound_ack(o, MAX_OUTBOUND_ACK)
            lib.nghttp2_option_set_max_settings(o, MAX_SETTINGS)
            lib.nghttp2_option_set_max_continuations(o, MAX_CONTINUATIONS)
            # nghttp2 keeps up to SETTINGS_MAX_CONCURRENT_STREAMS closed streams (~320 bytes
            # each) for RFC 7540 priorities, which the sidecar does not use: 1000 a connection
            # once that many streams passed, 20 MiB over 64 app connections under h2load.
            lib.nghttp2_option_set_no_closed_streams(o, 1)
            pp = ffi.new("nghttp2_session **")
            new = lib.nghttp2_session_client_new2 if client else lib.nghttp2_session_server_new2
            rv = new(pp, callbacks, self._handle, o)
            if rv != 0:
                raise MemoryError(ffi.string(lib.nghttp2_strerror(rv)).decode())
        finally:
            lib.nghttp2_option_del(o)
        self._s = ffi.gc(pp[0], lib.nghttp2_session_del)

    def __repr__(self) -> str:
        role = "client" if self._client else "server"
        state = "dead" if self._dead else "goaway" if (self._goaway_sent or
                                                       self._goaway_received) else "open"
        if self._closed:
            state = "closed"
        return f"<H2Session {role} {state} [Streams: {len(self._streams)} open]>"

    # -- connection --------------------------------------------------------------------------

    def close(self) -> None:
        """The connection is gone: free the nghttp2 session now (its HPACK tables, streams and
        frame buffers) and let go of the sink. Idempotent. The session refers to itself through
        nghttp2's user data (`new_handle`) and to its Protocol, which refers back: without this
        a dead connection's C and Python memory waited for the cyclic collector.

        Afterwards no call reaches nghttp2: receive() raises H2ProtocolError, data_to_send()
        gives b"", what opens a stream raises H2ProtocolError, the rest does nothing (a stream
        is gone, as after a reset). Called inside a callback (a sink closing its connection
        from under receive), the session is freed once nghttp2 has returned."""
        if self._closed:
            return
        self._closed = True
        self._dead = True
        self._sink = _NO_SINK
        self._streams.clear()
        self._blocked.clear()
        self._hdr = []
        self._pending_sid = 0
        self._pending = b""
        self._tail = b""
        self._early = b""
        self._exc = None
        if not self._busy:
            self._free()

    def _free(self) -> None:
        s = self._s
        self._s = ffi.NULL
        self._handle = None
        self._nva_keep = None
        self._streams.clear()  # what callbacks after close() (inside nghttp2) still made
        self._hdr = []
        if s != ffi.NULL:
            ffi.release(s)  # nghttp2_session_del (the ffi.gc destructor), now and only once

    def initiate(self) -> None:
        """Queue our SETTINGS (the client preface goes first, by nghttp2) and the connection
        window."""
        if self._closed:
            raise H2ProtocolError("session closed")
        ours = self._max_concurrent
        # Server: nghttp2 gets the backstop, the peer is told ours (module docstring).
        local = ours if self._client else min(ours + STREAM_LIMIT_MARGIN, (1 << 31) - 1)
        iv = [
            (_SETTINGS_MAX_CONCURRENT_STREAMS, local),
            (_SETTINGS_INITIAL_WINDOW_SIZE, self._initial_window),
            (_SETTINGS_MAX_HEADER_LIST_SIZE, self._max_header_bytes),
            (_SETTINGS_HEADER_TABLE_SIZE, 4096),
        ]
        if self._client:
            iv.append((_SETTINGS_ENABLE_PUSH, 0))
        self._check(self._lib.nghttp2_submit_settings(
            self._s, 0, ffi.new("nghttp2_settings_entry[]", iv), len(iv)))
        if local != ours:
            self._early += _with_setting(self._frames(), _SETTINGS_MAX_CONCURRENT_STREAMS, ours)
        if self._conn_window > 65535:
            self._check(self._lib.nghttp2_session_set_local_window_size(
                self._s, 0, 0, self._conn_window))

    def receive(self, data: bytes) -> None:
        """Feed bytes read from the socket; calls the sink; raises H2ProtocolError."""
        if self._dead:
            raise H2ProtocolError("session closed")
        busy = self._busy  # (True only if a sink fed bytes from inside a callback)
        self._busy = True
        rv = self._lib.nghttp2_session_mem_recv(self._s, data, len(data))
        self._busy = busy
        if self._closed:  # a callback closed the connection
            if not busy:
                self._free()
            raise H2ProtocolError("session closed")
        if self._pending_sid:
            self._flush_pending(False)
        if rv < 0 or self._exc is not None or self._abuse:
            self._fail(rv)
        # Frame what the sink queued now rather than in data_to_send(): nghttp2 says it met a
        # connection error only by wanting no more input once its GOAWAY is framed.
        out = self._frames()
        if self._closed:  # a callback of the framing (a refused stream's reset) closed it
            raise H2ProtocolError("session closed")
        if out:
            self._early = self._early + out if self._early else out
        if not self._lib.nghttp2_session_want_read(self._s) and not (
            self._goaway_sent or self._goaway_received
        ):
            code, debug = _goaway_in(self._early)
            if code == ENHANCE_YOUR_CALM:  # nghttp2's own limits (SETTINGS size, reset rate)
                kind = "settings_flood" if debug.startswith(b"SETTINGS") else "rapid_reset"
                self._sink.on_h2_abuse(kind)
                raise H2ProtocolError(kind)
            raise H2ProtocolError(
                debug.decode("ascii", "replace") or self._error_msg or "protocol error"
            )

    def data_to_send(self) -> bytes:
        """Every frame queued so far, b"" when none."""
        if self._dead:
            out, self._tail = self._tail, b""
            return out
        out = self._frames()
        if self._early:
            out = self._early + out
            self._early = b""
        return out

    def _frames(self) -> bytes:
        lib = self._lib
        s = self._s
        pp = self._pp
        busy = self._busy
        self._busy = True
        n = lib.nghttp2_session_mem_send(s, pp)
        if n <= 0:
            self._busy = busy
            if self._closed:
                if not busy:
                    self._free()
                return b""
            if n < 0 or self._exc is not None:
                self._fail(n)
            return b""
        chunks = [_unpack(pp[0], n)]
        while not self._closed:
            n = lib.nghttp2_session_mem_send(s, pp)
            if n <= 0:
                break
            chunks.append(_unpack(pp[0], n))
        self._busy = busy
        if self._closed:  # a callback (a refused stream's reset) closed the connection
            if not busy:
                self._free()
            return b""
        if n < 0 or self._exc is not None:
            self._fail(n)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def goaway(self, error_code: int = 0, last_stream_id: int | None = None) -> None:
        """Queue GOAWAY; streams up to last_stream_id (default: the last one the peer opened
        and we processed) may finish."""
        if self._dead:
            return
        if last_stream_id is None:
            last_stream_id = self._lib.nghttp2_session_get_last_proc_stream_id(self._s)
        self._goaway_sent = True
        self._check(self._lib.nghttp2_submit_goaway(
            self._s, 0, last_stream_id, error_code, ffi.NULL, 0))

    def ping(self) -> None:
        if self._closed:
            return
        self._check(self._lib.nghttp2_submit_ping(self._s, 0, ffi.NULL))

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def goaway_received(self) -> bool:
        """The peer sent GOAWAY: open no more streams on this connection."""
        return self._goaway_received

    @property
    def peer_max_concurrent_streams(self) -> int:
        if self._closed:
            return 0
        v: int = self._lib.nghttp2_session_get_remote_settings(
            self._s, _SETTINGS_MAX_CONCURRENT_STREAMS)
        return min(v, (1 << 31) - 1)

    # -- streams -----------------------------------------------------------------------------

    def new_stream_id(self) -> int:
        """The id the next send_headers of the client will open (call it right before)."""
        if self._closed:
            raise H2ProtocolError("session closed")
        sid: int = self._lib.nghttp2_session_get_next_stream_id(self._s)
        return sid

    def send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        """Request head (client: opens stream_id), response head, or a 1xx (server)."""
        if self._closed:
            if self._client:
                raise H2ProtocolError("session closed")
            return  # the stream is gone
        lib = self._lib
        nva, self._nva_keep = _nva(headers)
        prd = ffi.NULL if end_stream else self._prd
        if self._client:
            st = _Stream()
            st.end = end_stream
            sid = lib.nghttp2_submit_request(self._s, ffi.NULL, nva, len(headers), prd, ffi.NULL)
            if sid < 0:
                self._check(sid)
            if sid != stream_id:
                raise ValueError(f"stream {stream_id} is not the next one ({sid} was opened)")
            self._streams[sid] = st
            return
        st2 = self._streams.get(stream_id)
        if st2 is None:
            return  # closed meanwhile (the peer reset it): on_h2_reset told the caller
        if headers and headers[0][1][:1] == b"1" and headers[0][0] == b":status":
            self._check(lib.nghttp2_submit_headers(
                self._s, 0, stream_id, ffi.NULL, nva, len(headers), ffi.NULL))
            return
        st2.end = end_stream
        self._check(lib.nghttp2_submit_response(self._s, stream_id, nva, len(headers), prd))

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> int:
        """Queue what the peer's windows allow now; returns how many bytes were taken. The
        rest waits for on_h2_window_open. A stream that is gone takes everything (its reset
        was reported)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_reset:
            return len(data)
        if st.end:
            raise ValueError(f"stream {stream_id}: data after the end of the stream")
        lib = self._lib
        room = self._window(stream_id) - len(st.out)
        n = len(data)
        if n > room:
            n = room if room > 0 else 0
            self._blocked.add(stream_id)
            if n:
                st.out += data[:n]
        else:
            if n:
                st.out += data
            if end_stream:
                st.end = True
        if st.deferred and (n or st.end):
            st.deferred = False
            lib.nghttp2_session_resume_data(self._s, stream_id)
        return n

    def send_trailers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Trailers after the data queued so far; ends the stream."""
        st = self._streams.get(stream_id)
        if st is None or st.local_reset:
            return
        if st.end:
            raise ValueError(f"stream {stream_id}: trailers after the end of the stream")
        st.trailers = headers
        st.end = True
        if st.deferred:
            st.deferred = False
            self._lib.nghttp2_session_resume_data(self._s, stream_id)

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        st = self._streams.get(stream_id)
        if st is None or st.local_reset:
            return
        st.local_reset = True
        st.out.clear()
        self._blocked.discard(stream_id)
        self._check(self._lib.nghttp2_submit_rst_stream(self._s, 0, stream_id, error_code))

    def consume(self, stream_id: int, n: int) -> None:
        """n bytes delivered on stream_id left the sidecar: open the windows by as much."""
        st = self._streams.get(stream_id)
        if st is None:
            return  # closed: the engine gave its bytes back to the connection window
        st.unconsumed -= n
        self._lib.nghttp2_session_consume(self._s, stream_id, n)

    def send_window(self, stream_id: int) -> int:
        """Bytes send_data would take now (0 for a stream that is gone)."""
        if stream_id == 0:
            if self._closed:
                return 0
            w: int = self._lib.nghttp2_session_get_remote_window_size(self._s)
            return max(w, 0)
        st = self._streams.get(stream_id)
        if st is None:
            return 0
        return max(self._window(stream_id) - len(st.out), 0)

    # -- inside ------------------------------------------------------------------------------

    def _window(self, stream_id: int) -> int:
        lib = self._lib
        w: int = lib.nghttp2_session_get_stream_remote_window_size(self._s, stream_id)
        if w < 0:  # a request nghttp2 has not framed yet: the stream opens with the peer's
            s = self._s  # initial window
            w = min(lib.nghttp2_session_get_remote_settings(s, _SETTINGS_INITIAL_WINDOW_SIZE),
                    lib.nghttp2_session_get_remote_window_size(s))
        return w

    def _check(self, rv: int) -> None:
        if rv < 0:
            raise H2ProtocolError(ffi.string(self._lib.nghttp2_strerror(rv)).decode())

    def _fail(self, rv: int) -> None:
        """After a fatal nghttp2 error or an abuse: report, queue our GOAWAY, raise."""
        exc = self._exc
        if exc is not None and not self._abuse:
            self._exc = None
            self._dead = True
            raise exc
        kind = self._abuse
        if not kind:
            if rv == _ERR_TOO_MANY_CONTINUATIONS:
                kind = "continuation_flood"
            elif rv == _ERR_FLOODED:
                kind = self._last_control or "ping_flood"
            elif rv == _ERR_TOO_MANY_SETTINGS:
                kind = "settings_flood"
        self._dead = True
        last = self._lib.nghttp2_session_get_last_proc_stream_id(self._s)
        msg = ffi.string(self._lib.nghttp2_strerror(rv)).decode() if rv < 0 else kind
        if self._error_msg:  # nghttp2 said why (error callback): more than the code's name
            msg = f"{msg}: {self._error_msg}"
        if kind:
            self._tail = _goaway_frame(last, ENHANCE_YOUR_CALM)
            self._sink.on_h2_abuse(kind)
            raise H2ProtocolError(kind)
        self._tail = _goaway_frame(last, 0x1)  # PROTOCOL_ERROR
        raise H2ProtocolError(msg)

    def _flush_pending(self, end_stream: bool) -> None:
        sid = self._pending_sid
        data = self._pending
        self._pending_sid = 0
        self._pending = b""
        self._sink.on_h2_data(sid, data, end_stream)


# -- nghttp2 callbacks (module level: created once, shared by every session) ------------------
# Each finds its session through user_data. An exception (from the sink, or abuse) is kept on
# the session and turned into NGHTTP2_ERR_CALLBACK_FAILURE: never raise through C.


def _on_begin_headers(session: Any, frame: Any, ud: Any) -> int:
    self: H2Session = _from_handle(ud)
    self._hdr = []
    self._hdr_bytes = 0
    self._hdr_dropped = 0
    if frame.headers.cat == _HCAT_REQUEST:
        sid = frame.hd.stream_id
        if len(self._streams) >= self._max_concurrent:
            return _refuse(self, sid)
        self._streams[sid] = _Stream()
    return 0


def _refuse(self: H2Session, sid: int) -> int:
    """A stream beyond our SETTINGS_MAX_CONCURRENT_STREAMS: RST_STREAM(REFUSED_STREAM), a
    stream error (RFC 9113 5.1.2), counted as a reset. The RST_STREAM queued first is the one
    nghttp2 sends; it ignores the rest of the block (decoding it) and never calls on_header or
    on_frame_recv for it, so the sink never sees the stream."""
    self._reset_debt += 1
    if self._reset_debt > RAPID_RESET_DEBT:
        self._abuse = "rapid_reset"
        return _ERR_CALLBACK_FAILURE
    self._lib.nghttp2_submit_rst_stream(self._s, 0, sid, REFUSED_STREAM)
    return _ERR_TEMPORAL_CALLBACK_FAILURE


def _on_header(session: Any, frame: Any, name: Any, namelen: int, value: Any, valuelen: int,
               flags: int, ud: Any) -> int:
    self: H2Session = _from_handle(ud)
    hdr = self._hdr
    self._hdr_bytes += namelen + valuelen + _FIELD_OVERHEAD
    if self._hdr_bytes > self._max_header_bytes or len(hdr) >= self._max_headers:
        return _header_over(self, name, namelen, value, valuelen)
    hdr.append((_unpack(name, namelen), _unpack(value, valuelen)))
    return 0


def _header_over(self: H2Session, name: Any, namelen: int, value: Any, valuelen: int) -> int:
    """A field past the limits (module docstring): dropped, the block's stream refused at its
    end, unless the block or the connection's debt of oversized blocks is an HPACK bomb."""
    dropped = self._hdr_dropped + 1
    self._hdr_dropped = dropped
    if dropped == 1:
        self._oversized_debt += 1
    if (self._oversized_debt > OVERSIZED_HEADER_DEBT
            or self._hdr_bytes > HEADER_BOMB_FACTOR * self._max_header_bytes
            or len(self._hdr) + dropped > HEADER_BOMB_FACTOR * self._max_headers):
        self._abuse = "hpack_bomb"
        return _ERR_CALLBACK_FAILURE
    if namelen == 12 and _unpack(name, namelen) == b"content-type":
        self._hdr.append((b"content-type", _unpack(value, valuelen)))
    return 0


def _on_data_chunk(session: Any, flags: int, stream_id: int, data: Any, n: int, ud: Any) -> int:
    self: H2Session = _from_handle(ud)
    st = self._streams.get(stream_id)
    if st is None or st.local_reset:
        # not ours any more (reset by the caller): give the bytes back at once
        self._lib.nghttp2_session_consume_connection(session, n)
        return 0
    st.unconsumed += n
    try:
        if self._pending_sid:
            self._flush_pending(False)
        self._pending_sid = stream_id
        self._pending = _unpack(data, n)
    except BaseException as exc:  # noqa: BLE001 (re-raised by receive())
        self._exc = exc
        return _ERR_CALLBACK_FAILURE
    return 0


def _on_frame_recv(session: Any, frame: Any, ud: Any) -> int:
    self: H2Session = _from_handle(ud)
    hd = frame.hd
    t = hd.type
    try:
        if t == _DATA:
            if self._pending_sid == hd.stream_id:
                self._flush_pending(bool(hd.flags & _FLAG_END_STREAM))
            elif hd.flags & _FLAG_END_STREAM and hd.stream_id in self._streams:
                self._sink.on_h2_data(hd.stream_id, b"", True)
        elif t == _HEADERS:
            sid = hd.stream_id
            hdr = self._hdr
            self._hdr = []
            cat = frame.headers.cat
            end = bool(hd.flags & _FLAG_END_STREAM)
            trailers = False
            if cat != _HCAT_REQUEST:
                st = self._streams.get(sid)
                if st is None:
                    return 0
                if cat == _HCAT_RESPONSE or (self._client and not st.final):
                    if hdr and hdr[0][1][:1] != b"1":
                        st.final = True
                else:
                    trailers = True
            if self._hdr_dropped:  # the block went over the limits: a stream error
                self._hdr_dropped = 0
                self._sink.on_h2_too_large(sid, hdr, end, trailers)
                return 0
            if self._oversized_debt:
                self._oversized_debt -= 1
            if trailers:
                self._sink.on_h2_trailers(sid, hdr)
            else:
                self._sink.on_h2_headers(sid, hdr, end)
        elif t == _WINDOW_UPDATE:
            sid = hd.stream_id
            blocked = self._blocked
            if sid == 0:
                if blocked:
                    blocked.clear()
                    self._sink.on_h2_window_open(0)
            elif sid in blocked:
                blocked.discard(sid)
                self._sink.on_h2_window_open(sid)
        elif t == _RST_STREAM:
            sid = hd.stream_id
            st = self._streams.get(sid)
            if st is not None and not st.reported:
                st.reported = True
                if not self._client:
                    # Premature: before our answer was all queued. A reset after it (a client
                    # dropping the rest of its upload) counts as a completed stream.
                    if not st.end or st.out or st.trailers is not None:
                        self._reset_debt += 1
                        if self._reset_debt > RAPID_RESET_DEBT:
                            self._abuse = "rapid_reset"
                            return _ERR_CALLBACK_FAILURE
                    elif self._reset_debt:
                        self._reset_debt -= 1
                self._sink.on_h2_reset(sid, frame.rst_stream.error_code)
        elif t == _SETTINGS:
            if not hd.flags & _FLAG_ACK:
                self._last_control = "settings_flood"
                if self._blocked:
                    self._blocked.clear()
                    self._sink.on_h2_window_open(0)
                self._sink.on_h2_settings(self.peer_max_concurrent_streams)
        elif t == _PING:
            if hd.flags & _FLAG_ACK:
                self._sink.on_h2_ping_ack()
            else:
                self._last_control = "ping_flood"
        elif t == _GOAWAY:
            self._goaway_received = True
            self._sink.on_h2_goaway(frame.goaway.last_stream_id, frame.goaway.error_code)
    except BaseException as exc:  # noqa: BLE001 (re-raised by receive())
        self._exc = exc
        return _ERR_CALLBACK_FAILURE
    return 0


def _on_stream_close(session: Any, stream_id: int, error_code: int, ud: Any) -> int:
    self: H2Session = _from_handle(ud)
    st = self._streams.pop(stream_id, None)
    if st is None:
        return 0
    self._blocked.discard(stream_id)
    if st.unconsumed > 0:
        self._lib.nghttp2_session_consume_connection(session, st.unconsumed)
    if not st.reported and not st.local_reset and error_code != 0:
        try:
            self._sink.on_h2_reset(stream_id, error_code)
        except BaseException as exc:  # noqa: BLE001 (re-raised by receive())
            self._exc = exc
            return _ERR_CALLBACK_FAILURE
    elif not st.reported and not st.local_reset and self._reset_debt:
        self._reset_debt -= 1  # a completed stream pays one reset back
    return 0


def _on_frame_not_send(session: Any, frame: Any, code: int, ud: Any) -> int:
    # A request that could not start (GOAWAY arrived, or too many streams): never processed.
    self: H2Session = _from_handle(ud)
    if frame.hd.type != _HEADERS:
        return 0
    sid = frame.hd.stream_id
    st = self._streams.pop(sid, None)
    self._blocked.discard(sid)
    if st is not None and not st.local_reset:
        try:
            self._sink.on_h2_reset(sid, REFUSED_STREAM)
        except BaseException as exc:  # noqa: BLE001 (re-raised by receive/data_to_send)
            self._exc = exc
    return 0


def _on_error(session: Any, code: int, msg: Any, n: int, ud: Any) -> int:
    self: H2Session = _from_handle(ud)
    self._error_msg = _unpack(msg, n).decode("ascii", "replace")
    return 0


def _on_read(session: Any, stream_id: int, buf: Any, length: int, flags: Any, source: Any,
             ud: Any) -> int:
    self: H2Session = _from_handle(ud)
    st = self._streams.get(stream_id)
    if st is None:
        return _ERR_TEMPORAL_CALLBACK_FAILURE
    out = st.out
    n = len(out)
    if n > length:
        n = length
    if n:
        ffi.memmove(buf, out, n)
        if n == len(out):
            out.clear()
        else:
            del out[:n]
    if not out:
        if st.end:
            trailers = st.trailers
            if trailers is not None:
                flags[0] = _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
                nva, self._nva_keep = _nva(trailers)
                st.trailers = None
                rv = self._lib.nghttp2_submit_trailer(session, stream_id, nva, len(trailers))
                if rv < 0:
                    return _ERR_TEMPORAL_CALLBACK_FAILURE
            else:
                flags[0] = _DATA_FLAG_EOF
        elif not n:
            st.deferred = True
            return _ERR_DEFERRED
    return n


_CALLBACKS: Any = None
# The C trampolines of the functions above, made once and kept alive as long as the process.
_C_CALLBACKS: dict[str, Any] = {}


def _callbacks(lib: Any) -> Any:
    global _CALLBACKS
    if _CALLBACKS is None:
        c = _C_CALLBACKS
        cb_ = _nghttp2.c_callback
        c["begin_headers"] = cb_("begin_headers", "nghttp2_on_begin_headers_callback",
                                 _on_begin_headers)
        c["header"] = cb_("header", "nghttp2_on_header_callback", _on_header)
        c["data_chunk"] = cb_("data_chunk", "nghttp2_on_data_chunk_recv_callback", _on_data_chunk)
        c["frame_recv"] = cb_("frame_recv", "nghttp2_on_frame_recv_callback", _on_frame_recv)
        c["stream_close"] = cb_("stream_close", "nghttp2_on_stream_close_callback",
                                _on_stream_close)
        c["frame_not_send"] = cb_("frame_not_send", "nghttp2_on_frame_not_send_callback",
                                  _on_frame_not_send)
        c["error"] = cb_("error", "nghttp2_error_callback2", _on_error)
        c["read"] = cb_("read", "nghttp2_data_source_read_callback", _on_read)
        pp = ffi.new("nghttp2_session_callbacks **")
        if lib.nghttp2_session_callbacks_new(pp) != 0:
            raise MemoryError("nghttp2_session_callbacks_new")
        cb = pp[0]  # lives as long as the process: one for every session
        lib.nghttp2_session_callbacks_set_on_begin_headers_callback(cb, c["begin_headers"])
        lib.nghttp2_session_callbacks_set_on_header_callback(cb, c["header"])
        lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, c["data_chunk"])
        lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cb, c["frame_recv"])
        lib.nghttp2_session_callbacks_set_on_stream_close_callback(cb, c["stream_close"])
        lib.nghttp2_session_callbacks_set_on_frame_not_send_callback(cb, c["frame_not_send"])
        lib.nghttp2_session_callbacks_set_error_callback2(cb, c["error"])
        _CALLBACKS = cb
    return _CALLBACKS
