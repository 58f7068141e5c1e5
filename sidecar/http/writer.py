"""Serialising heads and chunks. Framing is chosen here, once, from what the body will be."""

from __future__ import annotations

from typing import Final

from sidecar.http.headers import Headers

CHUNK_END: Final = b"0\r\n\r\n"
CRLF: Final = b"\r\n"

_REASONS: Final = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 204: b"No Content",
    400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 408: b"Request Timeout",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}


def reason_for(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


_FIELD: Final = b": ".join  # (name, value) -> b"name: value", at C speed through map()
_LINES: Final = b"\r\n".join


def request_head(method: bytes, target: bytes, headers: Headers, extra: Headers) -> bytes:
    """`headers` are already end-to-end only; `extra` carries framing, Host and our own fields.
    One join over C-level maps: this runs for every request, so no Python loop per field."""
    return _LINES(
        [b"%b %b HTTP/1.1" % (method, target), *map(_FIELD, headers), *map(_FIELD, extra), b"",
         b""]
    )


def response_head(status: int, reason: bytes, headers: Headers, extra: Headers) -> bytes:
    return _LINES(
        [b"HTTP/1.1 %d %b" % (status, reason or reason_for(status)), *map(_FIELD, headers),
         *map(_FIELD, extra), b"", b""]
    )


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body. The copy is cheaper than a second write call for the
    small chunks that dominate; large chunks go through `chunk_parts` instead."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def chunk_parts(data: bytes) -> list[bytes]:
    return [b"%x\r\n" % len(data), data, CRLF]


def last_chunk(trailers: Headers | None) -> bytes:
    if not trailers:
        return CHUNK_END
    return _LINES([b"0", *map(_FIELD, trailers), b"", b""])
