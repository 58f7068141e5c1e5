"""downstream/http2.py `request_head`: an HTTP/2 request's fields as the exchange's RequestHead
(what an HTTP/1.1 endpoint then receives), without sockets."""

from __future__ import annotations

import pytest

from sidecar.downstream.http2 import request_head
from sidecar.errors import ProtocolError

BASE = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"orders:9002"),
        (b":path", b"/svc/M?x=1")]


def test_pseudo_fields_become_method_target_authority() -> None:
    head, grpc, timeout = request_head([*BASE, (b"x-a", b"1")], end_stream=True)
    assert head.method == b"POST" and head.target == b"/svc/M?x=1"
    assert head.authority == b"orders:9002" and head.host == b"orders:9002"
    assert head.version == "2"  # the endpoint side keeps HTTP/2 for `protocol: auto`
    assert head.forward == [(b"x-a", b"1")]
    assert not head.absolute and head.keep_alive
    assert not grpc and timeout is None


def test_host_stands_in_for_a_missing_authority() -> None:
    head, _, _ = request_head([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                               (b"host", b"h:1")], end_stream=True)
    assert head.authority == b"h:1"
    assert head.forward == []


def test_framing_body_without_length_goes_chunked() -> None:
    head, _, _ = request_head(BASE, end_stream=False)
    assert head.chunked and head.content_length is None and head.has_body
    head, _, _ = request_head([*BASE, (b"content-length", b"12")], end_stream=False)
    assert not head.chunked and head.content_length == 12
    head, _, _ = request_head(BASE, end_stream=True)
    assert not head.chunked and not head.has_body


def test_control_fields_are_read_not_forwarded() -> None:
    head, _, _ = request_head([
        *BASE, (b"te", b"trailers"), (b"x-sidecar-timeout-ms", b"250"),
        (b"x-sidecar-retry-attempts", b"2"), (b"x-sidecar-deadline-ms", b"9"),
        (b"idempotency-key", b"k"), (b"content-length", b"0"),
    ], end_stream=True)
    assert head.timeout_ms == 250 and head.retry_attempts == 2 and head.idempotency_key
    assert head.forward == [(b"idempotency-key", b"k")]


def test_cookies_are_joined_for_an_http11_hop() -> None:
    head, _, _ = request_head([*BASE, (b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2")],
                              end_stream=True)
    assert head.forward == [(b"x", b"y"), (b"cookie", b"a=1; b=2")]


def test_grpc_detected_and_its_timeout_read_not_forwarded() -> None:
    head, grpc, timeout = request_head(
        [*BASE, (b"content-type", b"application/grpc+proto"), (b"grpc-timeout", b"250m")],
        end_stream=False)
    assert grpc and timeout == pytest.approx(0.25)
    assert head.forward == [(b"content-type", b"application/grpc+proto")]
    _, _, bad = request_head([*BASE, (b"grpc-timeout", b"1_0S")], end_stream=True)
    assert bad is None


@pytest.mark.parametrize("fields", [
    [(b":method", b"CONNECT"), (b":authority", b"h:443")],
    [*BASE, (b"content-length", b"+5")],
    [*BASE, (b"content-length", b"1" * 30)],
])
def test_refused(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(ProtocolError):
        request_head(fields, end_stream=True)
