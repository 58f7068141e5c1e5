"""Exception -> the synthetic response of SPEC section 5, in one table (the errors carry codes)."""

from __future__ import annotations

import json

from sidecar.errors import SidecarError
from sidecar.http.writer import reason_for


def error_body(exc: SidecarError) -> bytes:
    return json.dumps(
        {"error": exc.code, "cluster": exc.cluster or None, "detail": exc.detail},
        separators=(",", ":"),
    ).encode()


def error_response(exc: SidecarError, *, close: bool, head_only: bool = False) -> bytes:
    """The whole response (head and body) the sidecar sends for `exc`."""
    body = error_body(exc)
    status = exc.status
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason_for(status)),
        b"content-type: application/json",
        b"x-sidecar-error: " + exc.code.encode(),
        b"content-length: %d" % len(body),
    ]
    if close:
        lines.append(b"connection: close")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return head if head_only else head + body
