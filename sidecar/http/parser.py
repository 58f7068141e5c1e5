"""Sans-IO HTTP/1.1 parsing: httptools (llhttp) fed bytes, our sink told what they meant.

Theory of operation. A parser is fed raw bytes and calls methods of a *sink* object in order:
`on_*_head(head)`, `on_*_body(data)` any number of times, `on_*_end(trailers)`; for CONNECT,
`Upgrade` requests and `101` responses, `on_upgrade(rest)` follows with the bytes after the
head, after which the parser takes no more input (the connection has become a byte tunnel).
Nothing here touches a socket, a clock or the event loop, so it can be fed whole, byte by byte,
or fuzzed. The one exception the caller sees is `ProtocolError` (or `HeadTooLarge`): anything
the parser cannot read unambiguously is refused, never guessed at, because a proxy that reads a
message differently from the next hop is how request smuggling happens.

llhttp already refuses Content-Length together with Transfer-Encoding, duplicate
Content-Length, obs-fold and bad chunk sizes. On top of it we enforce: the head-size limit
and the field-count limit (431), exactly one Host in HTTP/1.1 requests, only `http`
absolute-form targets, only HTTP/1.0 and 1.1, a Content-Length that fits a signed 64-bit
integer, and a Transfer-Encoding of exactly `chunked` (in both directions, like Envoy). The
last one must be ours: llhttp reports a head with `Transfer-Encoding: identity` (or `gzip`) to
us *before* it refuses the body, and it accepts `gzip, chunked`, whose gzip coding we would
silently drop when re-framing the body. Every header value that becomes a number is read by
`_digits` (ASCII digits only): Python's `int()` also takes `1_0`, `+5`, spaces and Unicode
digits, which the next hop would read differently or not at all.

Field names with underscores. A name whose `-` spelling is a field the proxy reads or strips
(`Transfer_Encoding`, `Content_Length`, `Host`, `Connection`, `X_Sidecar_Timeout_Ms`, ...) is
dropped, like nginx does with every underscore name: an origin that maps `_` to `-` (CGI,
WSGI, many frameworks) would otherwise see a second framing or routing field next to ours.
Every other underscore name (`api_key`) is forwarded unchanged, like Envoy: apps do send
them, and dropping them breaks those apps silently.

Upgrades that are not forwarded as upgrades. llhttp ends any request carrying `Upgrade` and
`Connection: upgrade` at its head and hands us the rest as tunnel bytes, *whatever its body
framing says*. A request the proxy does not forward as an upgrade (it carries a body,
it is HTTP/1.0, or it asks only for `h2c`, which is never forwarded) must be read on as an
ordinary request instead: its `upgrade` is None, llhttp's early end is swallowed, and parsing
resumes in a fresh llhttp parser, first fed a synthetic head with the same body framing (its
callbacks ignored) when a body follows, then the bytes after the head.

Head size. A complete head is measured exactly in the callbacks (target, names, values). An
unfinished one is bounded by the raw bytes fed while it was in progress, counted only from the
read *after* the one in which it began: that read may also hold the previous request's body,
and counting it would refuse a pipelined head that is well within the limit.
"""

from __future__ import annotations

from typing import Any, Final

import httptools
from mypy_extensions import mypyc_attr

from sidecar.errors import BadUpstreamResponse, HeadTooLarge, ProtocolError
from sidecar.http.headers import (
    HOP_BY_HOP,
    FieldKinds,
    Headers,
    connection_tokens,
    parse_keep_alive_timeout,
)

_HEAD_SLACK: Final = 1024  # bytes beyond max_header_bytes we let llhttp buffer before refusing
_MAX_LENGTH: Final = (1 << 63) - 1  # the largest Content-Length we accept (signed 64-bit)
_MAX_DIGITS: Final = 19  # len(str(_MAX_LENGTH)): longer digit strings are never in range
_MAX_RESPONSE_HEAD: Final = 1 << 20
_VERSIONS: Final = frozenset({"1.1", "1.0"})

# Fields the proxy reads itself, by kind; all but expect/idempotency-key are dropped from what
# it forwards (hop-by-hop per RFC 9110 7.6.1, framing it re-emits, and its own control
# fields). Kind 0 (any other name): forwarded unchanged.
_DROP: Final = 1
_HOST: Final = 2
_CONTENT_LENGTH: Final = 3
_TRANSFER_ENCODING: Final = 4
_CONNECTION: Final = 5
_UPGRADE: Final = 6
_EXPECT: Final = 7
_IDEMPOTENCY_KEY: Final = 8
_TIMEOUT_MS: Final = 9
_RETRY_ATTEMPTS: Final = 10
_KEEP_ALIVE: Final = 11
_HOP: Final = {name: _DROP for name in HOP_BY_HOP} | {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
}
_REQUEST_KINDS: Final = FieldKinds(_HOP | {
    b"upgrade": _UPGRADE,
    b"host": _HOST,
    b"expect": _EXPECT,
    b"idempotency-key": _IDEMPOTENCY_KEY,
    b"x-sidecar-timeout-ms": _TIMEOUT_MS,
    b"x-sidecar-retry-attempts": _RETRY_ATTEMPTS,
    b"x-sidecar-deadline-ms": _DROP,
    # Connection-specific (RFC 7540 3.2.1): only meaningful with `Upgrade: h2c`, never forwarded.
    b"http2-settings": _DROP,
}, lookalike=_DROP)
_RESPONSE_KINDS: Final = FieldKinds(_HOP | {b"keep-alive": _KEEP_ALIVE})
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()


def _digits(value: bytes) -> int:
    """A field value that must be a non-negative decimal number: ASCII digits only (optional
    whitespace around them), at most a signed 64-bit value. -1 for anything else. Not `int()`
    alone: it also accepts `1_0`, `+5`, inner spaces and non-ASCII digits (bytes.isdigit() is
    ASCII-only)."""
    if not value.isdigit():  # llhttp hands values over trimmed: strip only when needed
        value = value.strip(b" \t")
        if not value.isdigit():
            return -1
    if len(value) > _MAX_DIGITS:
        return -1
    number = int(value)
    return number if number <= _MAX_LENGTH else -1


def _number_or_none(value: bytes) -> int | None:
    number = _digits(value)
    return number if number >= 0 else None


def _without_h2c(value: bytes) -> bytes:
    """The Upgrade value without `h2c` (never forwarded: the sidecar speaks HTTP/2 to the app
    itself); empty when nothing else was asked for."""
    if b"h2c" not in value.lower():
        return value.strip()
    kept = [t.strip() for t in value.split(b",")
            if t.strip() and t.split(b"/")[0].strip().lower() != b"h2c"]
    return b", ".join(kept)


def _end_to_end_trailers(trailers: Headers, kinds: FieldKinds) -> Headers | None:
    """Trailer fields to forward: the ones a proxy reads or strips in a head (framing,
    hop-by-hop, Host, our own) never travel in trailers either (RFC 9110 6.5.1)."""
    kept = [field for field in trailers if not kinds[field[0]]]
    return kept or None


def _only_chunked(value: bytes) -> bool:
    """True when a Transfer-Encoding value is exactly the `chunked` coding."""
    return value.strip().lower() == b"chunked"


def _drop_named(forward: Headers, connection: frozenset[bytes]) -> Headers:
    """Drop the fields the Connection header named (beyond the usual options)."""
    if not connection or connection <= _CONNECTION_OPTIONS:
        return forward
    named = connection - _CONNECTION_OPTIONS
    return [(n, v) for n, v in forward if n.lower() not in named]


class RequestHead:
    """A request head as received, with the facts the proxy needs pulled out once.

    No `__slots__` and no `__init__`: the defaults are class attributes and the parser sets
    only what differs, which makes one head per request cheaper to build than with slots."""

    method: bytes = b""
    target: bytes = b""  # origin-form target to send upstream (absolute-form rewritten)
    version: str = "1.1"
    headers: Headers  # as received (always set by the parser)
    keep_alive: bool = True
    upgrade: bytes | None = None  # the Upgrade value when the app asked to upgrade, else None
    content_length: int | None = None
    chunked: bool = False
    authority: bytes = b""  # host[:port] from the absolute-form target, CONNECT target, or Host
    absolute: bool = False  # True when the app used absolute-form (forward-proxy style)
    connection: frozenset[bytes] = _NO_TOKENS  # lowercased tokens of the Connection field
    host: bytes | None = None  # the Host value (None if absent)
    # End-to-end fields to send upstream (no hop-by-hop, no Host, no x-sidecar-*); always set.
    forward: Headers
    timeout_ms: int | None = None  # x-sidecar-timeout-ms
    retry_attempts: int | None = None  # x-sidecar-retry-attempts
    idempotency_key: bool = False  # the app marked the request safe to retry

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def __repr__(self) -> str:
        return f"<RequestHead {self.method.decode()} {self.target.decode('latin-1')}>"


class ResponseHead:
    """A response head as received (class-attribute defaults, as RequestHead)."""

    status: int = 0
    reason: bytes = b""
    # No `version`: the proxy never reads it (llhttp frames 1.0 and 1.1 alike and answers
    # should_keep_alive), and httptools builds it as a new str per response.
    headers: Headers  # always set by the parser
    keep_alive: bool = True
    content_length: int | None = None
    chunked: bool = False
    bodyless: bool = False  # no body by the rules: HEAD request, 1xx, 204, 304
    keep_alive_timeout: float | None = None
    connection: frozenset[bytes] = _NO_TOKENS
    forward: Headers  # end-to-end fields to send to the app; always set by the parser
    # The grpc-status of a gRPC Trailers-Only answer (HTTP/2: one HEADERS frame that ends the
    # stream), which the retry policy reads (`retry.grpc_on`); -1 for every other answer.
    grpc_status: int = -1

    @property
    def close_delimited(self) -> bool:
        """The body runs until the upstream closes (no length, not chunked)."""
        return not (self.bodyless or self.chunked or self.content_length is not None)

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status}>"


# The sinks are base classes, not `typing.Protocol`s: compiled, a call through a base class
# is a direct C call (a vtable slot), while a call through a protocol is a method lookup by
# name. A parser calls its sink four to ten times per message. Interpreted subclasses (test
# recorders) are allowed.
@mypyc_attr(allow_interpreted_subclasses=True)
class RequestSink:
    """What a `RequestParser` reports, in order (see the top of this module)."""

    __slots__ = ()

    def on_request_head(self, head: RequestHead) -> None:
        raise NotImplementedError

    def on_request_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_request_end(self, trailers: Headers | None) -> None:
        raise NotImplementedError

    def on_upgrade(self, rest: bytes) -> None:
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class ResponseSink:
    """What a `ResponseParser` reports, in order."""

    __slots__ = ()

    def on_response_head(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_response_end(self, trailers: Headers | None) -> None:
        raise NotImplementedError

    def on_upgrade(self, rest: bytes) -> None:
        raise NotImplementedError


class _StopParsing(Exception):
    """Raised inside a callback to stop llhttp after a bodyless response to HEAD."""


def _unwrap(exc: httptools.HttpParserError, error: type[Exception]) -> Exception:
    """A callback's own exception travels as the parser error's context: give it back."""
    inner = exc.__context__
    if isinstance(inner, (ProtocolError, BadUpstreamResponse)):
        return inner
    if isinstance(exc, httptools.HttpParserCallbackError) and isinstance(inner, Exception):
        # The sink raised something of its own: let it propagate unchanged.
        return inner
    return error(str(exc) or type(exc).__name__)


def _fields_size(headers: Headers) -> int:
    """A head's size as the limits count it: each field's name and value plus 4 (": ", CRLF)."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


class RequestParser:
    """Parses the app's requests. `feed()` may call the sink for several pipelined requests."""

    __slots__ = (
        "_sink",
        "_parser",
        "_max_head",
        "_max_fields",
        "_read_len",
        "_raw_head",
        "in_head",  # part of a request head has arrived, not all of it
        "_url",
        "_headers",
        "_head",
        "upgraded",
        "finished",
        "_demoted",
        "_resuming",
    )

    def __init__(
        self, sink: RequestSink, max_header_bytes: int = 65536, max_headers: int = 200
    ) -> None:
        self._sink = sink
        self._parser = httptools.HttpRequestParser(self)
        self._max_head = max_header_bytes
        self._max_fields = max_headers
        self._read_len = 0  # length of the read being parsed
        self._raw_head = -1  # raw bytes of the unfinished head; -1: it began in this read
        self.in_head = False
        self._url = b""
        # The fields of the head being parsed; after it, of the trailers (usually none).
        self._headers: Headers = []
        self._head: RequestHead | None = None
        self.upgraded = False
        # A request without keep-alive (Connection: close, HTTP/1.0) ended: its connection
        # closes after the response, and what the app sent after it is ignored (RFC 9112 9.6),
        # not an error that would turn the answer to the request before it into a 400.
        self.finished = False
        # llhttp took the head just parsed for an upgrade, and we do not (see the top): its
        # early end is ours to undo. `_resuming`: the synthetic head is being parsed.
        self._demoted = False
        self._resuming = False

    def feed(self, data: bytes) -> None:
        if self.upgraded:
            raise ProtocolError("data after upgrade fed to the parser")
        if self.finished:
            return
        while True:  # once, unless a demoted upgrade hands the rest of the read back
            self._read_len = len(data)
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                rest = data[exc.args[0] :]
                if self._demoted:
                    resumed = self._resume(rest)
                    if resumed is None:
                        return
                    data = resumed
                    continue  # a loop, not recursion: a read may hold thousands of them
                self.upgraded = True
                self._sink.on_upgrade(rest)
                return
            except httptools.HttpParserError as exc:
                if self._finished_during_feed():
                    return  # llhttp refuses bytes after a closing request; we ignore them
                raise _unwrap(exc, ProtocolError) from None
            break
        if self.in_head:
            # llhttp buffers an unfinished header line itself; bound what it may hold.
            if self._raw_head < 0:
                self._raw_head = 0  # began in this read: count from the next one (see top)
                if len(data) > self._max_head and (
                    len(self._url) + _fields_size(self._headers) > self._max_head
                ):
                    raise HeadTooLarge("request head larger than max_header_bytes")
            else:
                self._raw_head += len(data)
                if self._raw_head > self._max_head + _HEAD_SLACK:
                    raise HeadTooLarge("request head larger than max_header_bytes")
        elif self._headers and _fields_size(self._headers) > self._max_head:
            raise HeadTooLarge("request trailers larger than max_header_bytes")

    def _resume(self, rest: bytes) -> bytes | None:
        """llhttp stopped at a head we read as an ordinary request: go on in a new parser.
        Returns the bytes to feed it (a synthetic head first when a body follows), or None
        when nothing more is to be read (the request closes the connection)."""
        self._demoted = False
        if self.finished:
            return None  # the request closes the connection, or the sink closed it meanwhile
        head = self._head
        self._parser = httptools.HttpRequestParser(self)
        if head is None or not head.has_body:
            return rest  # its end was reported with its head; what follows is the next request
        self._resuming = True
        close = b"" if head.keep_alive else b"Connection: close\r\n"
        if head.chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            framing = b"Content-Length: %d\r\n" % (head.content_length or 0)
        return b"POST / HTTP/1.1\r\n" + framing + close + b"\r\n" + rest

    def _finished_during_feed(self) -> bool:
        # A method, not `self.finished` inline: feed() tested it on entry, so mypy (and mypyc,
        # which compiles by mypy's types) would hold it False, though a callback set it since.
        return self.finished

    # --- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head = True
        self._raw_head = -1
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Head fields and trailer fields alike: sizes are checked once the section is whole
        # (a section spread over reads is bounded in feed()). The hot path: keep it this short.
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        headers = self._headers
        self._headers = []  # for trailers
        if self._resuming:
            self._resuming = False  # our synthetic head (see _resume): its body is the real one
            return
        url = self._url
        if (self._raw_head >= 0 or self._read_len > self._max_head) and (
            len(url) + _fields_size(headers) > self._max_head
        ):
            # Only a head spread over reads, or in a read larger than the limit, can be over it.
            raise HeadTooLarge("request head larger than max_header_bytes")
        if len(headers) > self._max_fields:
            raise HeadTooLarge("more header fields than max_headers")
        parser = self._parser
        head = RequestHead()
        head.method = method = parser.get_method()
        head.version = version = parser.get_http_version()
        head.headers = headers
        head.keep_alive = parser.should_keep_alive()
        host: bytes | None = None
        host_count = 0
        connection = _NO_TOKENS
        forward: Headers = []
        kinds = _REQUEST_KINDS
        for field in headers:
            kind = kinds[field[0]]
            if not kind:
                forward.append(field)
                continue
            value = field[1]
            if kind == _HOST:
                host_count += 1
                host = value
            elif kind == _CONNECTION:
                connection = connection | connection_tokens(value)
            elif kind == _CONTENT_LENGTH:
                length = _digits(value)
                if length < 0:
                    raise ProtocolError("Content-Length is not a 64-bit decimal number")
                head.content_length = length
            elif kind == _TRANSFER_ENCODING:
                if head.chunked or not _only_chunked(value):
                    raise ProtocolError("Transfer-Encoding other than a single chunked")
                head.chunked = True
            elif kind == _UPGRADE:
                upgrade = head.upgrade
                head.upgrade = value if upgrade is None else upgrade + b", " + value
            elif kind == _EXPECT:
                forward.append(field)  # a kind of its own only to keep it out of trailers
            elif kind == _IDEMPOTENCY_KEY:
                head.idempotency_key = True
                forward.append(field)
            elif kind == _TIMEOUT_MS:
                head.timeout_ms = _number_or_none(value)
            elif kind == _RETRY_ATTEMPTS:
                head.retry_attempts = _number_or_none(value)
            # else: hop-by-hop, or a field of ours the app must not forge: dropped
        head.host = host
        head.connection = connection
        head.forward = _drop_named(forward, connection) if connection else forward
        if host_count > 1:
            raise ProtocolError("more than one Host header")
        if version != "1.1":
            if version not in _VERSIONS:
                raise ProtocolError(f"HTTP/{version} is not HTTP/1.x")
            if head.chunked:
                # RFC 9112 6.1: framing of an HTTP/1.0 message with Transfer-Encoding is faulty.
                raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        if head.upgrade is not None:  # llhttp upgrades only with an Upgrade field (or CONNECT)
            self._upgrade_or_not(head, method, version, connection)
        if method == b"CONNECT":
            if head.chunked or head.content_length:
                # RFC 9110 9.3.6: no content. llhttp tunnels what follows the head whatever
                # the framing says; a server honouring it would read a body, then a request.
                raise ProtocolError("CONNECT request with a body")
            head.authority = url
            head.target = url
        elif url[:1] == b"/" or url == b"*":
            if host is None and version == "1.1":
                raise ProtocolError("HTTP/1.1 request without Host")
            head.target = url
            head.authority = host or b""
        else:
            try:
                # Any: httptools' stub says `port: int`, but it is None when the URL has none
                # (and mypyc, which trusts annotations, would raise on that None).
                parsed: Any = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise ProtocolError("invalid request target") from None
            if parsed.schema != b"http" or not parsed.host:
                raise ProtocolError("absolute-form target must be http://host[:port]/...")
            head.absolute = True
            host_part: bytes = parsed.host
            if b":" in host_part:
                host_part = b"[" + host_part + b"]"  # an IPv6 literal keeps its brackets
            head.authority = host_part if parsed.port is None else b"%s:%d" % (
                host_part,
                parsed.port,
            )
            path = parsed.path or b"/"
            head.target = path + b"?" + parsed.query if parsed.query else path
        self._head = head
        self._sink.on_request_head(head)

    def _upgrade_or_not(
        self, head: RequestHead, method: bytes, version: str, connection: frozenset[bytes]
    ) -> None:
        """Decide whether the request is forwarded as an upgrade (SPEC section 5): only an
        HTTP/1.1 request without a body that asks, with `Connection: upgrade`, for something
        other than h2c. When llhttp took it for one and we do not, note it (`_demoted`)."""
        upgrade = head.upgrade
        if upgrade is not None:
            upgrade = _without_h2c(upgrade)
            if (not upgrade or b"upgrade" not in connection or version != "1.1"
                    or head.has_body or method == b"CONNECT"):
                upgrade = None
        head.upgrade = upgrade
        if upgrade is None and method != b"CONNECT" and self._parser.should_upgrade():
            self._demoted = True

    def on_body(self, body: bytes) -> None:
        self._sink.on_request_body(body)

    def on_message_complete(self) -> None:
        head = self._head
        if self._demoted and head is not None and head.has_body:
            return  # llhttp skipped the body of a demoted upgrade: the end comes after it
        if head is not None and not head.keep_alive:
            self.finished = True
        trailers: Headers | None = self._headers
        if trailers:
            self._headers = []
            if _fields_size(trailers) > self._max_head:
                raise HeadTooLarge("request trailers larger than max_header_bytes")
            if len(trailers) > self._max_fields:
                raise HeadTooLarge("more trailer fields than max_headers")
            trailers = _end_to_end_trailers(trailers, _REQUEST_KINDS)
        else:
            trailers = None
        self._sink.on_request_end(trailers)


class ResponseParser:
    """Parses one upstream connection's responses. Call `expect(method)` before each request
    is sent (a response to HEAD has no body whatever its headers say), and `eof()` when the
    upstream closes: it ends a close-delimited body or reports the response incomplete."""

    __slots__ = (
        "_sink",
        "_parser",
        "_method_head",
        "_headers",
        "_reason",
        "_in_head",
        "_head",
        "_informational",
        "_done",
        "_raw_head",
        "_read_len",
        "_heads_fed",
        "_tail",
        "upgraded",
    )

    def __init__(self, sink: ResponseSink) -> None:
        self._sink = sink
        self._parser: Any = httptools.HttpResponseParser(self)
        self._method_head = False
        self._headers: Headers = []  # of the head being parsed; after it, of the trailers
        self._reason = b""
        self._in_head = False
        self._head: ResponseHead | None = None
        self._informational = False
        self._done = True  # no response in progress
        self._raw_head = -1  # as in RequestParser
        self._read_len = 0
        # Only while answering HEAD: heads completed in this feed(), and the last bytes of the
        # previous read (a head's blank line may straddle two reads), to find where it ended.
        self._heads_fed = 0
        self._tail = b""
        self.upgraded = False

    @property
    def in_progress(self) -> bool:
        """A response has begun and not ended."""
        return not self._done

    @property
    def started(self) -> bool:
        """Any byte of the current response has been parsed."""
        return self._in_head or self._head is not None

    def expect(self, method: bytes) -> None:
        if self._method_head:
            # The previous parser stopped mid-stream after a HEAD response: start afresh.
            self._parser = httptools.HttpResponseParser(self)
        self._method_head = method == b"HEAD"
        if self._headers:
            self._headers = []  # left by a response cut short
        self._head = None
        self._done = False
        self._tail = b""

    def feed(self, data: bytes) -> None:
        head_request = self._method_head
        tail = b""
        if head_request:
            self._heads_fed = 0
            tail = self._tail if self._in_head else b""
            self._tail = data[-3:]
        self._read_len = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            self._sink.on_upgrade(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            inner = exc.__context__
            if isinstance(inner, _StopParsing):
                if head_request and self._after_heads(tail + data, self._heads_fed).strip():
                    raise BadUpstreamResponse("bytes after a response to HEAD") from None
                return
            raise _unwrap(exc, BadUpstreamResponse) from None
        if self._in_head:
            if self._raw_head < 0:
                self._raw_head = 0
                if len(data) > _MAX_RESPONSE_HEAD and (
                    _fields_size(self._headers) > _MAX_RESPONSE_HEAD
                ):
                    raise BadUpstreamResponse("response head larger than 1 MiB")
            else:
                self._raw_head += len(data)
                if self._raw_head > _MAX_RESPONSE_HEAD:
                    raise BadUpstreamResponse("response head larger than 1 MiB")
        elif self._headers and _fields_size(self._headers) > _MAX_RESPONSE_HEAD:
            raise BadUpstreamResponse("response trailers larger than 1 MiB")

    @staticmethod
    def _after_heads(data: bytes, heads: int) -> bytes:
        """The bytes after the `heads`-th blank line of `data` (interim 1xx heads may precede
        the final head of a HEAD response in the same read)."""
        end = -4
        for _ in range(heads):
            end = data.find(b"\r\n\r\n", end + 4)
            if end < 0:
                return b""
        return data[end + 4 :]

    def eof(self) -> None:
        """The upstream closed its side."""
        head = self._head
        if head is not None and not self._done and head.close_delimited:
            self._done = True
            self._sink.on_response_end(None)
            return
        if not self._done:
            raise BadUpstreamResponse("upstream closed before the response was complete")

    # --- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._done:
            # Refused at its first byte: a response nobody asked for must not wait in the
            # parser to be read as the answer to the next request (response splitting).
            raise BadUpstreamResponse("bytes from the upstream with no request outstanding")
        self._in_head = True
        self._raw_head = -1
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Head and trailer fields alike (on_headers_complete starts a new list). A head whole
        # in one read is bounded by the read (256 KiB with uvloop); one spread over reads, by
        # the count in feed().
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads_fed += 1
        if self._done:
            raise BadUpstreamResponse("response without a request")
        parser = self._parser
        head = ResponseHead()
        status: int = parser.get_status_code()  # typed: compared below, natively once known int
        head.status = status
        head.reason = self._reason
        head.headers = headers = self._headers
        self._headers = []  # for trailers
        if (self._raw_head >= 0 or self._read_len > _MAX_RESPONSE_HEAD) and (
            _fields_size(headers) > _MAX_RESPONSE_HEAD
        ):
            raise BadUpstreamResponse("response head larger than 1 MiB")
        head.keep_alive = parser.should_keep_alive()
        connection = _NO_TOKENS
        forward: Headers = []
        kinds = _RESPONSE_KINDS
        for field in headers:
            kind = kinds[field[0]]
            if not kind:
                forward.append(field)
            elif kind == _CONTENT_LENGTH:
                length = _digits(field[1])
                if length < 0:
                    raise BadUpstreamResponse("Content-Length is not a 64-bit decimal number")
                head.content_length = length
            elif kind == _CONNECTION:
                connection = connection | connection_tokens(field[1])
            elif kind == _TRANSFER_ENCODING:
                if head.chunked or not _only_chunked(field[1]):
                    # We re-frame bodies: an extra coding (gzip) would be dropped silently.
                    raise BadUpstreamResponse("Transfer-Encoding other than a single chunked")
                head.chunked = True
            elif kind == _KEEP_ALIVE:
                head.keep_alive_timeout = parse_keep_alive_timeout(field[1])
        head.connection = connection
        head.forward = _drop_named(forward, connection) if connection else forward
        self._informational = 100 <= status < 200 and status != 101
        head.bodyless = self._method_head or status < 200 or status in (204, 304)
        if not (head.bodyless or head.chunked or head.content_length is not None):
            head.keep_alive = False  # close-delimited (head.close_delimited, spelled out)
        self._head = head
        self._sink.on_response_head(head)
        if self._method_head and not self._informational:
            self._done = True
            self._sink.on_response_end(None)
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        self._sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            # 100 Continue and friends: a head with no end; the real response follows.
            self._informational = False
            self._head = None
            return
        self._done = True
        trailers: Headers | None = self._headers
        if trailers:
            self._headers = []
            trailers = _end_to_end_trailers(trailers, _RESPONSE_KINDS)
        else:
            trailers = None
        self._sink.on_response_end(trailers)
