"""Exception -> the synthetic response of SPEC section 5, in one table (the errors carry codes).

Also the one place unexpected exceptions are turned into such an error: `internal_error` logs
the traceback (at most once per interval per site, so a request that trips a bug cannot flood
the logs) and says what the app gets: 400 if nothing was routed yet (the accident is about what
the app sent), else 502 `internal`.
"""

from __future__ import annotations

import json
import logging
from typing import Final

from sidecar.errors import InternalError, ProtocolError, SidecarError
from sidecar.http.writer import reason_for
from sidecar.log import Throttled

INTERNAL_LOG: Final = Throttled(logging.getLogger("sidecar.internal"), interval=10.0)


def internal_error(exc: BaseException, site: str, routed: bool) -> SidecarError:
    """An exception nobody expected, caught at a seam (`site`): log it (throttled) and return
    the error to answer with."""
    INTERNAL_LOG.log(site, logging.ERROR, "internal error", exc, error=type(exc).__name__)
    if routed:
        return InternalError(f"internal error ({site}): {type(exc).__name__}")
    return ProtocolError(f"request could not be handled ({type(exc).__name__})")


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
