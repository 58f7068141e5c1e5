"""One root for every failure the sidecar reports, split by phase, each carrying its SPEC code."""

from __future__ import annotations

import errno


class SidecarError(Exception):
    """Root. `code` is the `x-sidecar-error` value of SPEC section 5, `status` the HTTP status."""

    code = "internal"
    status = 500
    # True for failures that by their nature happen before any byte of the request leaves the
    # sidecar (connect refused or timed out, TLS handshake, the sidecar's own shortage of
    # sockets): the endpoint never saw the request, so a retry is safe whatever the method
    # (SPEC section 5). The exchange still checks that the try it ends wrote nothing. A new
    # failure class of that kind joins by setting this flag; nothing else changes.
    before_write = False
    # True for failures that say the endpoint never processed the request although bytes of
    # it may have left: an HTTP/2 stream refused (REFUSED_STREAM), or above the last-stream-id
    # of the endpoint's GOAWAY (RFC 9113 section 8.7). Retried anywhere whatever the method,
    # as `before_write` (SPEC section 11).
    never_processed = False

    def __init__(self, detail: str = "", cluster: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.cluster = cluster


# --- downstream: the app's request is at fault -------------------------------------------------
class ProtocolError(SidecarError):
    """Bytes from a peer that are not valid HTTP/1.1 (or are ambiguous): never forwarded."""

    code = "bad_request"
    status = 400


class HeadTooLarge(ProtocolError):
    code = "header_too_large"
    status = 431


class HeadTimeout(ProtocolError):
    code = "header_timeout"
    status = 408


# --- routing ---------------------------------------------------------------------------------
class NoRoute(SidecarError):
    code = "no_route"
    status = 404


class HostNotAllowed(SidecarError):
    code = "host_not_allowed"
    status = 403


# --- admission to a cluster --------------------------------------------------------------------
class CircuitOpen(SidecarError):
    code = "circuit_open"
    status = 503


class NoHealthyEndpoints(SidecarError):
    code = "no_healthy_endpoints"
    status = 503


class PoolTimeout(SidecarError):
    code = "pool_timeout"
    status = 503


class Draining(SidecarError):
    code = "draining"
    status = 503


class TooManyDestinations(SidecarError):
    """A new forward-proxy destination while `max_destinations` dynamic clusters are all busy."""

    code = "too_many_destinations"
    status = 503


# --- the sidecar itself --------------------------------------------------------------------------
class InternalError(SidecarError):
    """An unexpected exception inside the sidecar, after routing: the app still gets an answer
    (SPEC section 5). Before routing the same accident is the request's: 400 `bad_request`."""

    code = "internal"
    status = 502


# --- the sidecar's own shortage ----------------------------------------------------------------
# errno values that say the sidecar itself is short of something (descriptors, buffers, local
# ports), not that the upstream failed: seen at socket() or connect().
LOCAL_SHORTAGE_ERRNOS: frozenset[int] = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.EADDRNOTAVAIL}
)


class LocalResourcesExhausted(SidecarError):
    """The sidecar could not open an upstream socket for lack of its own resources. Not an
    `UpstreamError`: the endpoint never saw it, so it is a verdict on nobody (no breaker,
    ejection or health state). `before_write`: no byte of the request left the sidecar."""

    code = "local_resources_exhausted"
    status = 503
    before_write = True


def local_shortage(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it was raised from) is an OSError of LOCAL_SHORTAGE_ERRNOS."""
    seen = 0
    while exc is not None and seen < 8:  # bounded: a cause chain may loop
        if isinstance(exc, OSError) and exc.errno in LOCAL_SHORTAGE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


# --- the upstream leg ------------------------------------------------------------------------
class UpstreamError(SidecarError):
    """Something went wrong talking to the upstream (whether a retry could be invisible to the
    app is the exchange's to judge: it knows whether a response byte reached the app)."""

    status = 502


class ConnectFailed(UpstreamError):
    code = "connect_failed"
    before_write = True


class UpstreamReset(UpstreamError):
    code = "upstream_reset"


class BadUpstreamResponse(UpstreamError):
    code = "bad_upstream_response"


class UpstreamRefused(UpstreamReset):
    """An HTTP/2 stream the endpoint refused or never processed (REFUSED_STREAM, or above its
    GOAWAY's last-stream-id): safe to send again anywhere (`never_processed`)."""

    never_processed = True


class ProtocolMismatch(UpstreamError):
    """A gRPC request for a cluster pinned to `protocol: http1` (SPEC section 11): trailers
    cannot survive the trip."""

    code = "protocol_mismatch"
    status = 502


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"
    status = 504


LOCAL_ERROR_CODES: tuple[str, ...] = (
    "circuit_open",
    "no_healthy_endpoints",
    "pool_timeout",
    "connect_failed",
    "upstream_reset",
    "bad_upstream_response",
    "upstream_timeout",
    "draining",
    "too_many_destinations",
    "internal",
    "local_resources_exhausted",
    "protocol_mismatch",
    "no_route",
    "host_not_allowed",
    "bad_request",
    "header_too_large",
    "header_timeout",
)
