"""Per-cluster policies: active health checks, outlier detection, circuit breaker, retries."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, Self

from pydantic import BeforeValidator, Field, field_validator, model_validator

from sidecar import grpc_status
from sidecar.config.base import _default_when_absent, _Model
from sidecar.config.errors import _raise_problems
from sidecar.config.units import Duration, Size, parse_duration


class HealthCheckConfig(_Model):
    type: Literal["http", "tcp", "none"] = Field(
        default="none",
        description=(
            "Active health checks: `http` (GET `path`, healthy on 2xx), `tcp` (a connect "
            "succeeds) or `none` (outlier detection still applies)."
        ),
    )
    path: str = Field(
        default="/healthz",
        description="Path requested by `http` checks (must start with /).",
    )
    interval: Duration = Field(
        default=5.0,
        gt=0,
        description="Time between two checks of an endpoint.",
    )
    timeout: Duration = Field(
        default=1.0,
        gt=0,
        description=(
            "A check without an answer within this fails. Default: 1s, or interval when shorter; "
            "never longer than interval."
        ),
    )
    healthy_threshold: int = Field(
        default=2,
        ge=1,
        description="Consecutive passed checks that make an unhealthy endpoint healthy again.",
    )
    unhealthy_threshold: int = Field(
        default=3,
        ge=1,
        description=(
            "Consecutive failed checks that make an endpoint unhealthy (it gets no requests)."
        ),
    )

    @field_validator("path")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path {value!r} must start with /")
        return value

    # `timeout` may exceed `interval` (as in Envoy): a check still running delays that
    # endpoint's next one, checks of one endpoint never overlap (policy/health.py).


class OutlierConfig(_Model):
    consecutive_failures: int = Field(
        default=5,
        ge=1,
        description=(
            "Consecutive failed requests (connect failures, resets, timeouts, 5xx) that eject an "
            "endpoint."
        ),
    )
    base_ejection_time: Duration = Field(
        default=30.0,
        gt=0,
        description=(
            "Length of a first ejection; an endpoint ejected again stays out base_ejection_time "
            "times the number of its ejections, up to max_ejection_time."
        ),
    )
    max_ejection_time: Duration = Field(
        default=300.0,
        gt=0,
        description="Longest ejection. Default: 5m, or base_ejection_time when longer.",
    )
    max_ejection_percent: int = Field(
        default=50,
        ge=0,
        le=100,
        description="At most this percentage of a cluster's endpoints is ejected at once.",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        return _default_when_absent(
            data, "max_ejection_time", lambda d: max(300.0, parse_duration(d["base_ejection_time"]))
        )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.max_ejection_time < self.base_ejection_time:
            message = "must not be shorter than base_ejection_time"
            _raise_problems([(("max_ejection_time",), message)])
        return self


class CircuitBreakerConfig(_Model):
    failure_rate_threshold: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "The breaker opens when this share of the requests in the rolling window failed "
            "(connect failures, resets, timeouts, 5xx)."
        ),
    )
    minimum_requests: int = Field(
        default=20,
        ge=1,
        description="Requests the window must hold before the failure rate counts.",
    )
    window: Duration = Field(
        default=10.0,
        gt=0,
        description="Length of the rolling window the failure rate is measured over.",
    )
    open_duration: Duration = Field(
        default=30.0,
        gt=0,
        description=(
            "How long an open breaker refuses requests (503 circuit_open) before it lets trial "
            "requests through (half-open)."
        ),
    )
    half_open_max_requests: int = Field(
        default=5,
        ge=1,
        description=(
            "Trial requests let through while half-open; their outcome closes or reopens the "
            "breaker."
        ),
    )
    max_concurrent_requests: int = Field(
        default=1000,
        ge=1,
        description="Requests in flight to the cluster at once; one more gets 503 circuit_open.",
    )


_RETRY_WORDS = ("connect-failure", "reset", "timeout", "5xx")


def _retry_condition(value: object) -> str:
    # `on: [503]` (a YAML integer) is as clear as `on: ["503"]`: accept both.
    text = "" if isinstance(value, bool) else str(value).lower()
    if text in _RETRY_WORDS or re.fullmatch(r"5\d\d", text):
        return text
    raise ValueError(
        f"unknown retry condition {value!r}: use connect-failure, reset, timeout, 5xx "
        'or a 5xx status like "503"'
    )


# gRPC status codes by their snake_case name (one table: sidecar/grpc_status.py); `ok` cannot
# fail a try, so it is not a retry condition.
GRPC_STATUS_CODES: Final[Mapping[str, int]] = {
    name: code for name, code in grpc_status.CODES.items() if code
}
_GRPC_NAMES: Final = {code: name for name, code in GRPC_STATUS_CODES.items()}


def _grpc_status(value: object) -> str:
    """A `retry.grpc_on` entry: a status name (`unavailable`; `UNAVAILABLE` as gRPC's docs write
    it is the same) or its number (14), kept as the snake_case name."""
    if isinstance(value, int) and not isinstance(value, bool) and value in _GRPC_NAMES:
        return _GRPC_NAMES[value]
    if value in (0, "0") or (isinstance(value, str) and value.strip().lower() == "ok"):
        raise ValueError(f"{value!r} is gRPC's success status (ok): there is nothing to retry")
    if isinstance(value, str):
        text = value.strip().lower().replace("-", "_")
        if text in GRPC_STATUS_CODES:
            return text
        close = difflib.get_close_matches(text, list(GRPC_STATUS_CODES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    else:
        hint = ""
    raise ValueError(
        f"unknown gRPC status {value!r}{hint}: use a name such as unavailable, "
        "resource_exhausted or aborted (gRPC's status names in snake case), or its number"
    )


GrpcStatus = Annotated[str, BeforeValidator(_grpc_status)]


class BackoffConfig(_Model):
    base: Duration = Field(
        default=0.025,
        gt=0,
        description=(
            "Wait before the first retry; it doubles with each further retry, with full jitter."
        ),
    )
    max: Duration = Field(
        default=1.0,
        gt=0,
        description="Longest wait between tries. Default: 1s, or base when longer.",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        return _default_when_absent(data, "max", lambda d: max(1.0, parse_duration(d["base"])))

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.max < self.base:
            _raise_problems([(("max",), "must not be shorter than base")])
        return self


class BudgetConfig(_Model):
    ratio: float = Field(
        default=0.2,
        ge=0,
        description=(
            "Retries allowed as a share of requests (0.2: one retry per five requests), on top of "
            "min_per_second. A retry beyond the budget is skipped and counted."
        ),
    )
    min_per_second: float = Field(
        default=10,
        ge=0,
        description=(
            "Retries allowed per second whatever the ratio, so a quiet cluster can still retry."
        ),
    )


class RetryConfig(_Model):
    attempts: int = Field(
        default=3,
        ge=1,
        description=(
            "Total tries, the first included: 1 means no retry. A request may ask for 1 to 10 "
            "with x-sidecar-retry-attempts."
        ),
    )
    on: list[Annotated[str, BeforeValidator(_retry_condition)]] = Field(
        default_factory=lambda: ["connect-failure", "reset", "502", "503", "504"],
        description=(
            "Failures that are retried: connect-failure, reset, timeout, 5xx (any 5xx answer) or "
            'one status such as "503". Retry-After is honoured.'
        ),
    )
    idempotent_only: bool = Field(
        default=True,
        description=(
            "Retry only idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and requests "
            "carrying Idempotency-Key. A try that failed before any byte was sent is retried "
            "whatever the method."
        ),
    )
    per_try_timeout: Duration = Field(
        default=2.0,
        gt=0,
        description=(
            "Deadline of one try; a try that passes it fails as a timeout (and may be retried)."
        ),
    )
    backoff: BackoffConfig = Field(
        default_factory=BackoffConfig,
        description="Wait between tries: exponential, full jitter.",
    )
    budget: BudgetConfig = Field(
        default_factory=BudgetConfig,
        description=(
            "Retries allowed across all requests of the cluster, so retries cannot multiply an "
            "outage."
        ),
    )
    max_body_bytes: Size = Field(
        default=64 * 1024,
        description=(
            "Request bodies up to this size are kept for replay; larger ones are not retried once "
            "sent."
        ),
    )
    grpc_on: list[GrpcStatus] = Field(
        default_factory=lambda: ["unavailable"],
        description=(
            "gRPC statuses that are retried (names in snake case, e.g. unavailable, "
            "resource_exhausted; or their numbers), only from a Trailers-Only answer (no message "
            "reached the app), within attempts and the budget. Other statuses, and any status "
            "after a response message, go to the app as they are. `[]`: never retry on a gRPC "
            "status."
        ),
    )
