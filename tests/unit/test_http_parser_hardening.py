"""The parser's share of issue 18: what an adversarial probe found at the front door.

Upgrade requests that are not forwarded as upgrades (a body, HTTP/1.0, `h2c`) are read on as
ordinary requests, body and pipelined successors included, in any split of the bytes; numbers
in header values are ASCII digits only; Content-Length fits a signed 64-bit integer; the
number of fields is bounded; underscore lookalikes of the fields the proxy owns are dropped;
IPv6 absolute-form authorities keep their brackets; trailers carry no hop-by-hop field.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import ConfigError, parse_config
from sidecar.errors import BadUpstreamResponse, HeadTooLarge, ProtocolError
from sidecar.http.headers import parse_keep_alive_timeout
from sidecar.http.parser import RequestParser
from tests.unit.test_http_parser import (
    EXAMPLES,
    Recorder,
    bytewise,
    feed_request,
    feed_response,
)

GET = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
SPLITS = ([], [7], [60, 61, 62], list(range(5, 400, 9)))


def splits(data: bytes) -> list[list[int]]:
    return [*SPLITS, bytewise(data)]


def kinds(rec: Recorder) -> list[str]:
    return [e[0] for e in rec.events]


def test_upgrade_with_a_content_length_body_is_an_ordinary_request() -> None:
    body = b"b" * 63
    data = (b"POST /x HTTP/1.1\r\nHost: up\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
            b"Content-Length: 63\r\n\r\n" + body + GET)
    for cuts in splits(data):
        rec = feed_request(data, cuts)
        assert kinds(rec) == ["head", "body", "end", "head", "end"], cuts
        first = rec.heads[0]
        assert first.upgrade is None and first.content_length == 63
        assert rec.events[1] == ("body", body)
        assert rec.heads[1].target == b"/next"


def test_upgrade_with_a_chunked_body_keeps_body_and_trailers() -> None:
    data = (b"POST /x HTTP/1.1\r\nHost: up\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-T: t\r\n\r\n" + GET)
    for cuts in splits(data):
        rec = feed_request(data, cuts)
        assert rec.events[1:] == [
            ("body", b"abcde"), ("end", ((b"X-T", b"t"),)), *rec.events[3:]]
        assert kinds(rec) == ["head", "body", "end", "head", "end"]
        assert rec.heads[0].upgrade is None and rec.heads[0].chunked


def test_bad_chunk_after_a_demoted_upgrade_is_a_protocol_error() -> None:
    data = (b"POST /x HTTP/1.1\r\nHost: up\r\nConnection: upgrade\r\nUpgrade: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    with pytest.raises(ProtocolError):
        feed_request(data)


def test_demoted_upgrade_that_closes_ignores_what_follows() -> None:
    data = (b"POST /x HTTP/1.1\r\nHost: up\r\nConnection: upgrade, close\r\nUpgrade: x\r\n"
            b"Content-Length: 2\r\n\r\nok" + GET)
    for cuts in splits(data):
        rec = feed_request(data, cuts)
        assert kinds(rec) == ["head", "body", "end"]
        assert not rec.heads[0].keep_alive


def test_h2c_is_never_an_upgrade_and_other_protocols_survive_it() -> None:
    h2c = (b"GET /a HTTP/1.1\r\nHost: up\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
    for cuts in splits(h2c + GET):
        rec = feed_request(h2c + GET, cuts)
        assert kinds(rec) == ["head", "end", "head", "end"]
        assert rec.heads[0].upgrade is None
        assert not any(n.lower() == b"http2-settings" for n, _ in rec.heads[0].forward)
    both = b"GET /ws HTTP/1.1\r\nHost: up\r\nConnection: upgrade\r\nUpgrade: h2c, websocket\r\n\r\n"
    rec = feed_request(both + b"\x81\x00")
    assert rec.heads[0].upgrade == b"websocket" and rec.events[-1] == ("upgrade", b"\x81\x00")


def test_http10_upgrade_is_an_ordinary_request() -> None:
    data = (b"GET /a HTTP/1.0\r\nConnection: upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\n"
            b"GET /b HTTP/1.0\r\n\r\n")
    for cuts in splits(data):
        rec = feed_request(data, cuts)
        assert kinds(rec) == ["head", "end", "head", "end"]
        assert rec.heads[0].upgrade is None


def test_bodyless_http11_upgrade_still_hands_over_the_rest() -> None:
    data = (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 0\r\n\r\n\x81\x00")
    rec = feed_request(data)
    assert rec.heads[0].upgrade == b"websocket"
    assert rec.events[1:] == [("end", None), ("upgrade", b"\x81\x00")]


def test_thousands_of_demoted_upgrades_in_one_read() -> None:
    one = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
    rec = Recorder()
    RequestParser(rec).feed(one * 5000)  # a loop, not recursion: no RecursionError
    assert len(rec.heads) == 5000


@pytest.mark.parametrize("value", [b"1_0", b"+10", b"1 0", b"\xd9\xa3", b"\xb2", b"-1", b"0x10",
                                   b"", b"99999999999999999999"])
def test_numbers_in_header_values_are_ascii_digits_only(value: bytes) -> None:
    rec = feed_request(b"GET / HTTP/1.1\r\nHost: a\r\nx-sidecar-timeout-ms: " + value
                       + b"\r\nx-sidecar-retry-attempts: " + value + b"\r\n\r\n")
    assert rec.heads[0].timeout_ms is None and rec.heads[0].retry_attempts is None


def test_plain_numbers_still_read() -> None:
    rec = feed_request(b"GET / HTTP/1.1\r\nHost: a\r\nx-sidecar-timeout-ms:  250 \r\n"
                       b"x-sidecar-retry-attempts: 2\r\n\r\n")
    assert (rec.heads[0].timeout_ms, rec.heads[0].retry_attempts) == (250, 2)


def test_content_length_must_fit_a_signed_64_bit_integer() -> None:
    largest = (1 << 63) - 1
    rec = feed_request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\nx" % largest)
    assert rec.heads[0].content_length == largest
    for value in (1 << 63, (1 << 64) - 1):
        with pytest.raises(ProtocolError):
            feed_request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % value)
    with pytest.raises(BadUpstreamResponse):
        feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 63))


def test_max_headers_counts_fields() -> None:
    def head(n: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(
            b"X-%d: v\r\n" % i for i in range(n - 1)) + b"\r\n"

    assert len(feed_request(head(200)).heads[0].headers) == 200
    for cuts in ([], list(range(10, 3000, 10))):
        with pytest.raises(HeadTooLarge):
            feed_request(head(201), cuts)
    assert feed_request(head(201), max_headers=201).heads
    trailers = b"".join(b"T-%d: v\r\n" % i for i in range(11))
    with pytest.raises(HeadTooLarge):
        feed_request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n" + trailers + b"\r\n", max_headers=10)


def test_underscore_lookalikes_of_owned_fields_are_dropped_others_kept() -> None:
    rec = feed_request(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer_Encoding: chunked\r\n"
        b"content_length: 99\r\nProxy_Authorization: x\r\nX_Sidecar_Deadline_Ms: 5\r\n"
        b"Keep_Alive: 1\r\nhost-: x\r\napi_key: k\r\nX_Custom_Id: 7\r\n\r\nok")
    head = rec.heads[0]
    assert head.forward == [(b"host-", b"x"), (b"api_key", b"k"), (b"X_Custom_Id", b"7")]
    assert head.content_length == 2 and not head.chunked and head.keep_alive


def test_ipv6_absolute_form_keeps_brackets() -> None:
    rec = feed_request(b"GET http://[::1]:8080/a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                       b"GET http://[::1]/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert rec.heads[0].authority == b"[::1]:8080" and rec.heads[0].target == b"/a?b=1"
    assert rec.heads[1].authority == b"[::1]"


def test_trailers_never_carry_framing_or_hop_by_hop_fields() -> None:
    rec = feed_request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"0\r\nX-T: t\r\nConnection: close\r\nHost: b\r\nKeep-Alive: 1\r\n"
                       b"Transfer_Encoding: chunked\r\n\r\n")
    assert rec.events[-1] == ("end", ((b"X-T", b"t"),))
    rec = feed_request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"0\r\nUpgrade: x\r\n\r\n")
    assert rec.events[-1] == ("end", None)
    with pytest.raises(ProtocolError):  # llhttp's own rule, kept
        feed_request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\nContent-Length: 5\r\n\r\n")
    resp = feed_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"0\r\ngrpc-status: 0\r\nKeep-Alive: timeout=1\r\n\r\n")
    assert resp.events[-1] == ("end", ((b"grpc-status", b"0"),))


@pytest.mark.parametrize(("value", "seconds"), [
    (b"timeout=5", 5.0), (b"timeout=2.5, max=10", 2.5), (b'timeout="7"', 7.0),
    (b"timeout=1_0", None), (b"timeout=inf", None), (b"timeout=nan", None),
    (b"timeout=1e3", None), (b"timeout=\xb2", None), (b"timeout=+3", None),
])
def test_keep_alive_timeout_is_ascii_digits(value: bytes, seconds: float | None) -> None:
    assert parse_keep_alive_timeout(value) == seconds


# --- properties: demoted upgrades in any split -----------------------------------------------
@st.composite
def demoted_upgrades(draw: st.DrawFn) -> bytes:
    """Pipelined requests, some of them upgrades that are not forwarded as upgrades."""
    out = b""
    for i in range(draw(st.integers(1, 4))):
        body = draw(st.binary(max_size=40))
        version = draw(st.sampled_from([b"1.1", b"1.0"]))
        fields = b"Host: a\r\nConnection: upgrade\r\nUpgrade: %s\r\n" % draw(
            st.sampled_from([b"h2c", b"websocket", b"h2c, x"]))
        if version == b"1.0" or not body or draw(st.booleans()):
            fields += b"Content-Length: %d\r\n" % len(body)
            framed = body
        else:
            fields += b"Transfer-Encoding: chunked\r\n"
            framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        if version == b"1.0":
            fields += b"Connection: keep-alive\r\n"
        if version == b"1.1" and not body and b"h2c\r\n" not in fields:
            continue  # a real upgrade: the rest would be tunnel bytes
        out += b"POST /%d HTTP/%s\r\n%s\r\n%s" % (i, version, fields, framed)
    return out + GET


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(demoted_upgrades(), st.data())
def test_property_demoted_upgrades_read_the_same_in_any_split(
    wire: bytes, data: st.DataObject
) -> None:
    whole = feed_request(wire)
    assert whole.heads[-1].target == b"/next" and all(h.upgrade is None for h in whole.heads)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=8))
    assert feed_request(wire, cuts).events == whole.events


# --- the config key ----------------------------------------------------------------------------
def test_limits_max_headers_config_key() -> None:
    text = ("listeners:\n  - {name: e, address: '127.0.0.1:15001', protocol: http,\n"
            "     cluster: c, limits: {max_headers: %s}}\n"
            "clusters:\n  - {name: c, discovery: {type: static, endpoints: ['127.0.0.1:1']}}\n")
    assert parse_config(text % "50").listeners[0].limits.max_headers == 50
    assert parse_config(text.replace(", limits: {max_headers: %s}", "")
                        ).listeners[0].limits.max_headers == 200
    with pytest.raises(ConfigError, match="max_headers"):
        parse_config(text % "0")
