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


def _fields(parts: list[bytes], headers: Headers) -> None:
    # Four appends per field and one join at the end: compiled, this is about 40 % cheaper
    # than joining each field through map() first (measured on an nginx response head).
    for name, value in headers:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")


def request_head(method: bytes, target: bytes, headers: Headers, extra: Headers) -> bytes:
    """`headers` are already end-to-end only; `extra` carries framing, Host and our own fields.
    This runs for every request: one list, one join, no call per field."""
    parts = [b"%b %b HTTP/1.1\r\n" % (method, target)]
    _fields(parts, headers)
    _fields(parts, extra)
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head(status: int, reason: bytes, headers: Headers, extra: Headers) -> bytes:
    parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason or reason_for(status))]
    _fields(parts, headers)
    _fields(parts, extra)
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body. The copy is cheaper than a second write call for the
    small chunks that dominate; large chunks go through `chunk_parts` instead."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def chunk_parts(data: bytes) -> list[bytes]:
    return [b"%x\r\n" % len(data), data, CRLF]


def last_chunk(trailers: Headers | None) -> bytes:
    if not trailers:
        return CHUNK_END
    parts = [b"0\r\n"]
    _fields(parts, trailers)
    parts.append(b"\r\n")
    return b"".join(parts)
