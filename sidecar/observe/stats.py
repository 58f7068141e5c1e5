"""Hot-path counters as plain Python numbers; `observe.metrics` turns them into Prometheus series.

Why not prometheus-client objects on the data path: each `inc()`/`observe()` there takes a lock
and resolves label children; at tens of thousands of requests per second per core that is a
visible share of the CPU. Here a request costs a few integer additions, and the exporter reads
these objects only when scraped. Gauges (connections, pending, breaker state, endpoint health)
are not kept at all: they are read from the live objects at scrape time through `gauges`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from sidecar.grpc_status import NAMES as GRPC_NAMES
from sidecar.grpc_status import UNKNOWN as GRPC_UNKNOWN

CODE_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")

# Why an upstream connection closed (label `reason` of connections_closed_total).
CLOSE_REASONS = (
    "idle_timeout",  # unused longer than pool.idle_timeout
    "max_lifetime",  # reached its (jittered) max_lifetime
    "remote_closed",  # the upstream closed it (EOF/RST), while idle or in use
    "error",  # an I/O or protocol error while in use
    "not_reusable",  # response said Connection: close, or the exchange ended unclean
    "timeout",  # a request on it timed out; never reused
    "pool_full",  # returned when max_idle idle connections were already kept
    "rotated",  # rotated so that new endpoints get their share
    "drain",  # closed gracefully during a drain or a reload
    "endpoint_removed",  # its endpoint left discovery or turned terminating
    "tunnel",  # left the pool for an Upgrade/CONNECT tunnel, and that ended
)

# What happened to forward-proxy destinations (label `event`): created; removed because idle
# 10 minutes, evicted at max_destinations, or unresolvable; a new one refused (all busy).
FORWARD_EVENTS = ("created", "expired", "evicted", "unresolvable", "refused")

# The HTTP/2 attacks of SPEC section 11 the app side bounds (label `kind` of
# sidecar_http2_abuse_total): rapid reset (CVE-2023-44487), CONTINUATION flood, HPACK bomb,
# SETTINGS flood, PING flood, zero-window stall.
HTTP2_ABUSE_KINDS: Final = (
    "rapid_reset",
    "continuation_flood",
    "hpack_bomb",
    "settings_flood",
    "ping_flood",
    "zero_window_stall",
)

RETRY_REASONS = ("connect-failure", "reset", "stale", "timeout", "502", "503", "504", "5xx", "grpc")
HEALTH_RESULTS = ("success", "failure")

DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
FAST_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
)

_GRPC_UNKNOWN: Final[int] = GRPC_UNKNOWN

# Final: compiled, a static rather than a globals-dict lookup per observation.
_bisect_left: Final = bisect.bisect_left


class Histogram:
    """Bucket counts (not cumulative) plus sum and count; `observe` is a bisect and two adds."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[_bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> Histogram:
        copy = Histogram(self.buckets)
        copy.counts = list(self.counts)
        copy.sum = self.sum
        copy.count = self.count
        return copy

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, cumulative count)] in Prometheus order, ending with +Inf."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


@dataclass(slots=True)
class EndpointGauge:
    address: str  # "ip:port"
    healthy: bool  # takes new requests: serving, health-checked ok, not ejected
    # One of ENDPOINT_STATES: why it takes requests or not.
    state: str = "serving"


ENDPOINT_STATES = ("serving", "unhealthy", "ejected", "terminating")


@dataclass(slots=True)
class ClusterGauges:
    """Read from the live cluster at scrape time."""

    active: int = 0
    idle: int = 0
    pending: int = 0
    breaker_state: int = 0  # 0 closed, 1 open, 2 half-open
    streams: int = 0  # open HTTP/2 streams to the cluster's endpoints
    endpoints: list[EndpointGauge] = field(default_factory=list)


class ClusterStats:
    """Counters of one cluster. The data path adds to them; nothing here allocates per request
    except the first time a listener is seen."""

    __slots__ = (
        "name",
        "by_listener",
        "request_duration",
        "connections_opened",
        "connections_closed",
        "connect_duration",
        "pool_wait",
        "tls_handshakes",
        "breaker_transitions",
        "retries",
        "retry_budget_exhausted",
        "outlier_ejections",
        "health_checks",
        "local_errors",
        "grpc_responses",
        "gauges",
    )

    def __init__(self, name: str) -> None:
        from sidecar.errors import LOCAL_ERROR_CODES

        self.name = name
        # listener -> request counts by code class (CODE_CLASSES order): per request one dict
        # lookup and a list slot, no key tuple to build and hash. `requests` is the view
        # exporters read.
        self.by_listener: dict[str, list[int]] = {}
        self.request_duration = Histogram(DURATION_BUCKETS)
        self.connections_opened = 0
        self.connections_closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self.connect_duration = Histogram(FAST_BUCKETS)
        self.pool_wait = Histogram(FAST_BUCKETS)
        self.tls_handshakes: dict[bool, int] = {True: 0, False: 0}
        self.breaker_transitions: dict[str, int] = dict.fromkeys(("closed", "open", "half_open"), 0)
        self.retries: dict[str, int] = dict.fromkeys(RETRY_REASONS, 0)
        self.retry_budget_exhausted = 0
        self.outlier_ejections = 0
        self.health_checks: dict[str, int] = dict.fromkeys(HEALTH_RESULTS, 0)
        self.local_errors: dict[str, int] = dict.fromkeys(LOCAL_ERROR_CODES, 0)
        # gRPC answers by grpc-status, indexed by the status number (grpc_status.NAMES order).
        self.grpc_responses: list[int] = [0] * len(GRPC_NAMES)
        # Set by the cluster: returns its live gauges. None until the cluster exists.
        self.gauges: Callable[[], ClusterGauges] | None = None

    @property
    def requests(self) -> dict[tuple[str, str], int]:
        """(listener, code class) -> requests."""
        return {
            (listener, cc): n
            for listener, counts in self.by_listener.items()
            for cc, n in zip(CODE_CLASSES, counts, strict=True)
        }

    def snapshot(self) -> ClusterStats:
        """A copy, gauges read now: what a scrape renders off the event loop (see
        `observe.metrics.Scraper`), while the data path goes on changing the original."""
        copy = ClusterStats(self.name)
        copy.by_listener = {k: list(v) for k, v in self.by_listener.items()}
        copy.request_duration = self.request_duration.snapshot()
        copy.connections_opened = self.connections_opened
        copy.connections_closed = dict(self.connections_closed)
        copy.connect_duration = self.connect_duration.snapshot()
        copy.pool_wait = self.pool_wait.snapshot()
        copy.tls_handshakes = dict(self.tls_handshakes)
        copy.breaker_transitions = dict(self.breaker_transitions)
        copy.retries = dict(self.retries)
        copy.retry_budget_exhausted = self.retry_budget_exhausted
        copy.outlier_ejections = self.outlier_ejections
        copy.health_checks = dict(self.health_checks)
        copy.local_errors = dict(self.local_errors)
        copy.grpc_responses = list(self.grpc_responses)
        gauges = self.gauges
        if gauges is not None:
            copy.gauges = _Fixed(gauges()).get
        return copy

    def expect_listener(self, listener: str) -> None:
        """Create the zero series for a listener that routes here, so they exist from start."""
        self.by_listener.setdefault(listener, [0] * len(CODE_CLASSES))

    def request_done(self, listener: str, status: int, seconds: float) -> None:
        counts = self.by_listener.get(listener)
        if counts is None:
            counts = self.by_listener[listener] = [0] * len(CODE_CLASSES)
        cls = status // 100  # 1xx..5xx; anything below or above is counted with its end
        counts[0 if cls <= 1 else 4 if cls >= 5 else cls - 1] += 1
        self.request_duration.observe(seconds)

    def closed(self, reason: str) -> None:
        self.connections_closed[reason] = self.connections_closed.get(reason, 0) + 1

    def local_error(self, code: str) -> None:
        self.local_errors[code] = self.local_errors.get(code, 0) + 1

    def retried(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1

    def grpc_response(self, code: int) -> None:
        """One gRPC answer given to the app, by its `grpc-status` number (a number outside
        0-16 counts as `unknown`)."""
        responses = self.grpc_responses
        responses[code if 0 <= code < len(responses) else _GRPC_UNKNOWN] += 1


class _Fixed:
    """Gauges read once, handed back on every call (a snapshot's `gauges`)."""

    __slots__ = ("value",)

    def __init__(self, value: ClusterGauges) -> None:
        self.value = value

    def get(self) -> ClusterGauges:
        return self.value


class ListenerStats:
    """Per listener: live app connections and requests in flight (gauges kept as counts)."""

    __slots__ = (
        "name",
        "downstream_connections",
        "inflight",
        "shed_connections",
        "internal_errors",
        "http2_abuse",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.downstream_connections = 0
        self.inflight = 0
        self.shed_connections = 0  # accepted-then-closed because of EMFILE or max_connections
        self.internal_errors = 0  # unexpected exceptions caught at a seam and answered
        # HTTP/2 attacks bounded on this listener's app connections, by HTTP2_ABUSE_KINDS.
        self.http2_abuse: dict[str, int] = dict.fromkeys(HTTP2_ABUSE_KINDS, 0)

    def abuse(self, kind: str) -> None:
        """One HTTP/2 attack of `kind` (HTTP2_ABUSE_KINDS) met on an app connection."""
        self.http2_abuse[kind] = self.http2_abuse.get(kind, 0) + 1

    def snapshot(self) -> ListenerStats:
        copy = ListenerStats(self.name)
        copy.downstream_connections = self.downstream_connections
        copy.inflight = self.inflight
        copy.shed_connections = self.shed_connections
        copy.internal_errors = self.internal_errors
        copy.http2_abuse = dict(self.http2_abuse)
        return copy


class ProcessStats:
    __slots__ = (
        "drain_state",
        "drain_aborted",
        "event_loop_lag",
        "config_reloads",
        "forward_destinations",
        "forward_events",
    )

    def __init__(self) -> None:
        self.drain_state = 0  # 0 serving, 1 draining, 2 drained
        self.drain_aborted = 0
        self.event_loop_lag = Histogram(FAST_BUCKETS)
        self.config_reloads: dict[str, int] = {"success": 0, "rejected": 0}
        self.forward_destinations = 0  # dynamic clusters now
        self.forward_events: dict[str, int] = dict.fromkeys(FORWARD_EVENTS, 0)

    def snapshot(self) -> ProcessStats:
        copy = ProcessStats()
        copy.drain_state = self.drain_state
        copy.drain_aborted = self.drain_aborted
        copy.event_loop_lag = self.event_loop_lag.snapshot()
        copy.config_reloads = dict(self.config_reloads)
        copy.forward_destinations = self.forward_destinations
        copy.forward_events = dict(self.forward_events)
        return copy


class Stats:
    """The root every exporter reads: clusters and listeners by name, plus process-wide."""

    __slots__ = ("clusters", "listeners", "process")

    def __init__(self) -> None:
        self.clusters: dict[str, ClusterStats] = {}
        self.listeners: dict[str, ListenerStats] = {}
        self.process = ProcessStats()

    def snapshot(self) -> Stats:
        """Every number as it is now, for rendering elsewhere (a thread): a few copies per
        cluster, about 10 µs each, where rendering takes about 2 ms per cluster."""
        copy = Stats()
        copy.clusters = {name: c.snapshot() for name, c in self.clusters.items()}
        copy.listeners = {name: li.snapshot() for name, li in self.listeners.items()}
        copy.process = self.process.snapshot()
        return copy

    def cluster(self, name: str) -> ClusterStats:
        stats = self.clusters.get(name)
        if stats is None:
            stats = self.clusters[name] = ClusterStats(name)
        return stats

    def listener(self, name: str) -> ListenerStats:
        stats = self.listeners.get(name)
        if stats is None:
            stats = self.listeners[name] = ListenerStats(name)
        return stats
