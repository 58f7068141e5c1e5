"""sidecar/grpc.py: the gRPC wire rules both legs share (SPEC section 11). Pure functions."""

from __future__ import annotations

import pytest

from sidecar import grpc
from sidecar.errors import (
    BadUpstreamResponse,
    CircuitOpen,
    ConnectFailed,
    Draining,
    HostNotAllowed,
    NoRoute,
    PoolTimeout,
    UpstreamReset,
    UpstreamTimeout,
)


@pytest.mark.parametrize(("value", "expected"), [
    (b"application/grpc", True),
    (b"application/grpc+proto", True),
    (b"application/grpc+json", True),
    (b"Application/GRPC", True),
    (b"application/grpc;charset=utf-8", True),
    (b"application/grpc-web", False),
    (b"application/grpcx", False),
    (b"application/json", False),
    (b"", False),
    (None, False),
])
def test_is_grpc(value: bytes | None, expected: bool) -> None:
    assert grpc.is_grpc(value) is expected


@pytest.mark.parametrize(("value", "seconds"), [
    (b"1S", 1.0),
    (b"250m", 0.25),
    (b"3M", 180.0),
    (b"2H", 7200.0),
    (b"1500u", 0.0015),
    (b"99999999n", 0.099999999),
    (b"0m", 0.0),
])
def test_parse_timeout(value: bytes, seconds: float) -> None:
    got = grpc.parse_timeout(value)
    assert got == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    b"", b"S", b"1", b"1s", b"1x", b"123456789S", b"1_0S", b"+5S", b"-1S", b" 1S",
    "\u0661S".encode(),
])
def test_parse_timeout_refuses(value: bytes) -> None:
    assert grpc.parse_timeout(value) is None


@pytest.mark.parametrize("seconds", [0.000001, 0.0015, 0.25, 1.0, 59.9, 3600.0, 86400.0 * 30])
def test_format_timeout_round_trips_within_a_unit(seconds: float) -> None:
    value = grpc.format_timeout(seconds)
    assert len(value) <= 9
    back = grpc.parse_timeout(value)
    assert back is not None
    assert seconds <= back <= seconds * 1.0001 + 1e-9  # rounded up, never shorter


def test_format_timeout_nothing_left_is_zero() -> None:
    assert grpc.format_timeout(0.0) == b"0n"
    assert grpc.format_timeout(-3.0) == b"0n"
    assert grpc.format_timeout(float("nan")) == b"0n"
    assert grpc.format_timeout(1e12) == b"99999999H"


@pytest.mark.parametrize(("exc", "status"), [
    (UpstreamTimeout("t"), 4),
    (NoRoute("n"), 12),
    (HostNotAllowed("h"), 7),
    (BadUpstreamResponse("b"), 13),
    (ConnectFailed("c"), 14),
    (UpstreamReset("r"), 14),
    (CircuitOpen("o"), 14),
    (PoolTimeout("p"), 14),
    (Draining("d"), 14),
])
def test_error_status_mapping(exc: Exception, status: int) -> None:
    assert grpc.error_status(exc.code) == status  # type: ignore[attr-defined]


def test_protocol_mismatch_is_internal() -> None:
    assert grpc.error_status("protocol_mismatch") == 13
    assert grpc.error_status("local_resources_exhausted") == 14


def test_error_headers_trailers_only() -> None:
    headers = grpc.error_headers(UpstreamTimeout("request timeout after 1.000s 100%"))
    assert headers[0] == (b":status", b"200")
    fields = dict(headers)
    assert fields[b"content-type"] == b"application/grpc"
    assert fields[b"grpc-status"] == b"4"
    assert fields[b"grpc-message"] == b"request timeout after 1.000s 100%25"
    assert fields[b"x-sidecar-error"] == b"upstream_timeout"


def test_encode_message_percent_encodes_non_ascii() -> None:
    assert grpc.encode_message("caf\u00e9\n") == b"caf%C3%A9%0A"
    assert grpc.encode_message("plain text") == b"plain text"
