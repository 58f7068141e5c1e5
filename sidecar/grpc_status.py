"""The gRPC status codes (grpc/doc/statuscodes.md): number <-> snake-case name, in one pure place.

The names are the `status` label of `sidecar_grpc_responses_total` and the values `retry.grpc_on`
takes (SPEC sections 4, 8 and 11). Numbers are what `grpc-status` carries on the wire.
"""

from __future__ import annotations

from typing import Final

# Index = the status number.
NAMES: Final[tuple[str, ...]] = (
    "ok",  # 0
    "cancelled",  # 1
    "unknown",  # 2
    "invalid_argument",  # 3
    "deadline_exceeded",  # 4
    "not_found",  # 5
    "already_exists",  # 6
    "permission_denied",  # 7
    "resource_exhausted",  # 8
    "failed_precondition",  # 9
    "aborted",  # 10
    "out_of_range",  # 11
    "unimplemented",  # 12
    "internal",  # 13
    "unavailable",  # 14
    "data_loss",  # 15
    "unauthenticated",  # 16
)

UNKNOWN: Final = 2  # what gRPC libraries make of a number outside the table

# name -> number, e.g. to read `retry.grpc_on`.
CODES: Final[dict[str, int]] = {name: code for code, name in enumerate(NAMES)}


def name(code: int) -> str:
    """The snake-case name of a status number; a number outside 0-16 is `unknown`."""
    return NAMES[code if 0 <= code < len(NAMES) else UNKNOWN]
