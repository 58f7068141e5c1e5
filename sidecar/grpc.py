"""gRPC on the wire, as pure functions both legs share (SPEC section 11).

- `is_grpc(content_type)`: `application/grpc`, `application/grpc+proto`, `+json`, ... (and
  `application/grpc;...` parameters).
- `parse_timeout(value)` / `format_timeout(seconds)`: the `grpc-timeout` field
  (PROTOCOL-HTTP2.md: 1 to 8 ASCII digits and a unit, H M S m u n).
- `error_status(code)`: the gRPC status of a sidecar error (`x-sidecar-error` code), the one
  table of SPEC section 11: upstream_timeout -> 4 deadline_exceeded, no_route -> 12
  unimplemented, host_not_allowed -> 7 permission_denied, bad_upstream_response and
  protocol_mismatch -> 13 internal, every other code -> 14 unavailable.
- `error_headers(exc)`: the Trailers-Only answer (HTTP 200, one HEADERS frame with END_STREAM)
  that carries such an error to a gRPC app: `grpc-status`, `grpc-message` (the detail,
  percent-encoded) and `x-sidecar-error`.

Status names (for metrics and `retry.grpc_on`) live in sidecar/grpc_status.py.
"""

from __future__ import annotations

import math
from typing import Final

from sidecar.errors import SidecarError

DEADLINE_EXCEEDED: Final = 4
PERMISSION_DENIED: Final = 7
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14

# x-sidecar-error code -> gRPC status; any code not here is UNAVAILABLE.
_ERROR_STATUS: Final[dict[str, int]] = {
    "upstream_timeout": DEADLINE_EXCEEDED,
    "no_route": UNIMPLEMENTED,
    "host_not_allowed": PERMISSION_DENIED,
    "bad_upstream_response": INTERNAL,
    "protocol_mismatch": INTERNAL,
}

_PREFIX: Final = b"application/grpc"

# grpc-timeout units -> seconds per unit.
_UNITS: Final[dict[int, float]] = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_MAX_DIGITS: Final = 8
_MAX_VALUE: Final = 10**_MAX_DIGITS - 1
# Finest unit first: the most precise one whose value still fits 8 digits.
_FORMAT_UNITS: Final[tuple[tuple[bytes, float], ...]] = (
    (b"n", 1e9), (b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600),
)


def is_grpc(content_type: bytes | None) -> bool:
    """Whether a request or response with this `content-type` is gRPC (case-insensitive on
    the media type, as gRPC libraries are)."""
    if content_type is None or len(content_type) < 16:
        return False
    if content_type[:16].lower() != _PREFIX:
        return False
    rest = content_type[16:17]
    return rest in (b"", b"+", b";")


def parse_timeout(value: bytes) -> float | None:
    """`grpc-timeout` in seconds; None when malformed (then it is ignored, as gRPC servers
    do). ASCII digits only: `int()` would also take `1_0`, `+5` and non-ASCII digits."""
    if len(value) < 2 or len(value) > _MAX_DIGITS + 1:
        return None
    per_unit = _UNITS.get(value[-1])
    digits = value[:-1]
    if per_unit is None or not digits.isdigit():  # bytes.isdigit() is ASCII-only
        return None
    return int(digits) * per_unit


def format_timeout(seconds: float) -> bytes:
    """`seconds` as a `grpc-timeout` value: the finest unit whose count fits 8 digits, rounded
    up to a whole count. Nothing left (or less) is `0n`: the peer reads it as expired."""
    if seconds <= 0 or math.isnan(seconds):
        return b"0n"
    for unit, per_second in _FORMAT_UNITS:
        n = math.ceil(seconds * per_second)
        if n <= _MAX_VALUE:
            return b"%d%b" % (n, unit)
    return b"%dH" % _MAX_VALUE


def error_status(code: str) -> int:
    """The gRPC status number for a sidecar error code (SPEC section 11)."""
    return _ERROR_STATUS.get(code, UNAVAILABLE)


def encode_message(text: str) -> bytes:
    """`grpc-message`: UTF-8, percent-encoded outside printable ASCII (and `%` itself)."""
    raw = text.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(
        bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw
    )


def error_headers(exc: SidecarError) -> list[tuple[bytes, bytes]]:
    """The Trailers-Only answer for a sidecar error to a gRPC request: one HEADERS frame,
    END_STREAM set. `content-type` is `application/grpc` (what the app asked for may carry a
    suffix; every gRPC client takes the plain one)."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % error_status(exc.code)),
        (b"grpc-message", encode_message(exc.detail or exc.code)),
        (b"x-sidecar-error", exc.code.encode("ascii", "replace")),
    ]
