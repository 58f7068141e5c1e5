"""A CONNECT request that declares a body is refused (found by the fuzz differential).

RFC 9110 9.3.6: a CONNECT request has no content. llhttp ends a CONNECT at its head whatever
Content-Length or Transfer-Encoding say, so the sidecar used to tunnel the declared body as if
it were the tunnel's first bytes, while h11 (and any server that honours the framing) reads it
as a body and whatever follows as the next request. Two readings of one byte stream: refused,
like every other ambiguity the parser meets. `Content-Length: 0` declares no body and passes.
"""

from __future__ import annotations

import pytest

from sidecar.errors import ProtocolError
from sidecar.http.parser import RequestParser, RequestSink
from tests.fuzz.driver import Mode, feed_parser, run_protocol

HEAD = b"CONNECT up:443 HTTP/1.1\r\nHost: up:443\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: up\r\n\r\n"


@pytest.mark.parametrize("framing, body", [
    (b"Content-Length: 5\r\n", b"hello"),
    (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
], ids=["content-length", "chunked"])
def test_connect_with_a_body_is_refused_before_a_head_is_reported(framing: bytes,
                                                                    body: bytes) -> None:
    data = HEAD + framing + b"\r\n" + body + NEXT
    events, error = feed_parser(data, [])
    assert (events, error) == ([], "ProtocolError")
    with pytest.raises(ProtocolError):
        RequestParser(_Sink()).feed(data)
    for mode in Mode.all():  # the whole protocol: 400, nothing forwarded, nothing tunnelled
        world = run_protocol(data, mode)
        assert not any(o.raw or o.requests for o in world.origins)


def test_connect_with_content_length_zero_still_tunnels() -> None:
    data = HEAD + b"Content-Length: 0\r\n\r\n" + b"\x16\x03\x01tls"
    events, error = feed_parser(data, [])
    assert error == "" and events[-1] == ("upgrade", b"\x16\x03\x01tls")
    world = run_protocol(data, Mode())
    assert [o.raw for o in world.origins if o.raw] == [b"\x16\x03\x01tls"]


class _Sink(RequestSink):
    def on_request_head(self, head: object) -> None:
        raise AssertionError("no head may be reported")

    def on_request_body(self, data: bytes) -> None:
        raise AssertionError

    def on_request_end(self, trailers: object) -> None:
        raise AssertionError

    def on_upgrade(self, rest: bytes) -> None:
        raise AssertionError
