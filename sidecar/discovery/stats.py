"""Plain counters a resolver keeps about itself; the metrics exporter reads them at scrape time."""

from __future__ import annotations

# Why a discovery attempt failed (a bounded label set: every kind exists from start at 0).
ERROR_KINDS = (
    "resolve",  # DNS: getaddrinfo failed (NXDOMAIN, SERVFAIL, no answer)
    "config",  # Kubernetes: no usable in-cluster or kubeconfig credentials
    "unauthorized",  # 401 from the API server (token expired or rotated away)
    "forbidden",  # 403 from the API server (RBAC)
    "api",  # any other API status (404, 429, 5xx)
    "connection",  # the API server is unreachable, or a stream broke
    "timeout",  # a request or a silent stream ran past its deadline
    "bad_response",  # the answer was not what the protocol promises
    "unexpected",  # a bug of ours or of a library: logged with its traceback
)


class DiscoveryStats:
    """Counters of one resolver. Endpoint counts are not kept here: the cluster owns the set."""

    __slots__ = ("updates", "errors", "watch_restarts", "relists", "last_success")

    def __init__(self) -> None:
        self.updates = 0  # deltas emitted
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.watch_restarts = 0  # watches opened again after the first one of a list
        self.relists = 0  # lists after the first one (410 Expired, or recovery from an error)
        # Wall-clock seconds (time.time()) of the last answer known to be current, for a
        # Prometheus "seconds since last success" expression; None until the first one.
        self.last_success: float | None = None

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
