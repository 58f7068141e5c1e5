"""sidecar/http/h2engine.py in memory: a client session and a server session (both the real
engine over libnghttp2) exchanging bytes, and raw attackers built with the `h2` library or
frame by frame for the abuse cases of SPEC section 11."""

from __future__ import annotations

import ctypes
import gc
import os
import struct
import subprocess
import sys
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.http.h2engine import (
    ENHANCE_YOUR_CALM,
    OVERSIZED_HEADER_DEBT,
    RAPID_RESET_DEBT,
    REFUSED_STREAM,
    H2ProtocolError,
    H2Session,
    H2Sink,
)

REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/svc/M"),
       (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"),
       (b"te", b"trailers")]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Rec(H2Sink):
    """Records every callback as a tuple; consumes data at once unless told not to."""

    def __init__(self, auto_consume: bool = True) -> None:
        self.events: list[tuple[object, ...]] = []
        self.session: H2Session | None = None
        self.auto_consume = auto_consume
        self.data: dict[int, bytearray] = {}

    def on_h2_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                      end_stream: bool) -> None:
        self.events.append(("headers", stream_id, headers, end_stream))

    def on_h2_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.data.setdefault(stream_id, bytearray()).extend(data)
        if end_stream:
            self.events.append(("end", stream_id))
        if data and self.auto_consume:
            assert self.session is not None
            self.session.consume(stream_id, len(data))

    def on_h2_trailers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.events.append(("trailers", stream_id, headers))

    def on_h2_reset(self, stream_id: int, error_code: int) -> None:
        self.events.append(("reset", stream_id, error_code))

    def on_h2_window_open(self, stream_id: int) -> None:
        self.events.append(("window", stream_id))

    def on_h2_goaway(self, last_stream_id: int, error_code: int) -> None:
        self.events.append(("goaway", last_stream_id, error_code))

    def on_h2_ping_ack(self) -> None:
        self.events.append(("ping_ack",))

    def on_h2_settings(self, peer_max_concurrent_streams: int) -> None:
        self.events.append(("settings", peer_max_concurrent_streams))

    def on_h2_too_large(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                        end_stream: bool, trailers: bool) -> None:
        self.events.append(("too_large", stream_id, headers, end_stream, trailers))

    def on_h2_abuse(self, kind: str) -> None:
        self.events.append(("abuse", kind))

    def kinds(self, kind: str) -> list[tuple[object, ...]]:
        return [e for e in self.events if e[0] == kind]


def make(client: bool, sink: Rec | None = None, **kw: int) -> tuple[H2Session, Rec]:
    rec = sink or Rec()
    s = H2Session(rec, client, **kw)
    rec.session = s
    s.initiate()
    return s, rec


def pump(a: H2Session, b: H2Session) -> None:
    """Exchange bytes until both sides are quiet (bounded)."""
    for _ in range(100):
        x = a.data_to_send()
        if x:
            b.receive(x)
        y = b.data_to_send()
        if y:
            a.receive(y)
        if not x and not y:
            return
    raise AssertionError("no quiet after 100 rounds")


def pair(**kw: int) -> tuple[H2Session, Rec, H2Session, Rec]:
    c, cr = make(True, **kw)
    s, sr = make(False, **kw)
    pump(c, s)
    return c, cr, s, sr


def request(c: H2Session, body: bytes = b"x" * 100, end: bool = True) -> int:
    sid = c.new_stream_id()
    c.send_headers(sid, REQ, False)
    assert c.send_data(sid, body, end) == len(body)
    return sid


def test_unary_request_with_trailers() -> None:
    c, cr, s, sr = pair()
    assert ("settings", 1000) in cr.events and ("settings", 1000) in sr.events
    sid = request(c)
    pump(c, s)
    assert sr.events[-2] == ("headers", sid, REQ, False)
    assert sr.events[-1] == ("end", sid) and bytes(sr.data[sid]) == b"x" * 100
    s.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")], False)
    assert s.send_data(sid, b"y" * 100, False) == 100
    s.send_trailers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"")])
    pump(c, s)
    assert cr.kinds("headers") == [
        ("headers", sid, [(b":status", b"200"), (b"content-type", b"application/grpc")], False)]
    assert bytes(cr.data[sid]) == b"y" * 100
    assert cr.kinds("trailers") == [("trailers", sid, [(b"grpc-status", b"0"),
                                                       (b"grpc-message", b"")])]
    assert c.open_streams == 0 and s.open_streams == 0
    assert not cr.kinds("reset") and not sr.kinds("reset")
    assert "client open [Streams: 0 open]" in repr(c)


def test_trailers_only_and_many_streams() -> None:
    c, cr, s, sr = pair()
    sids = [request(c) for _ in range(50)]
    pump(c, s)
    assert s.open_streams == 50
    for sid in sids:  # Trailers-Only: one HEADERS with END_STREAM
        s.send_headers(sid, [(b":status", b"200"), (b"grpc-status", b"14")], True)
    pump(c, s)
    assert [e[1] for e in cr.kinds("headers")] == sids
    assert all(e[3] is True for e in cr.kinds("headers"))
    assert c.open_streams == 0 and s.open_streams == 0


def test_informational_then_final_response_then_trailers() -> None:
    c, cr, s, sr = pair()
    sid = request(c)
    pump(c, s)
    s.send_headers(sid, [(b":status", b"103"), (b"link", b"</a>")], False)
    s.send_headers(sid, [(b":status", b"200")], False)
    s.send_data(sid, b"ok", False)
    s.send_trailers(sid, [(b"x-t", b"1")])
    pump(c, s)
    assert [e[2][0] for e in cr.kinds("headers")] == [(b":status", b"103"), (b":status", b"200")]
    assert cr.kinds("trailers") == [("trailers", sid, [(b"x-t", b"1")])]


def test_request_trailers_and_no_body() -> None:
    c, cr, s, sr = pair()
    sid = c.new_stream_id()
    c.send_headers(sid, REQ, False)
    c.send_trailers(sid, [(b"x-end", b"yes")])
    pump(c, s)
    assert sr.kinds("trailers") == [("trailers", sid, [(b"x-end", b"yes")])]
    sid2 = c.new_stream_id()
    c.send_headers(sid2, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                          (b":authority", b"a")], True)
    pump(c, s)
    assert sr.events[-1] == ("headers", sid2, [(b":method", b"GET"), (b":scheme", b"http"),
                                               (b":path", b"/"), (b":authority", b"a")], True)


def test_new_stream_id_must_be_used_in_order() -> None:
    c, cr, s, sr = pair()
    sid = c.new_stream_id()
    with pytest.raises(ValueError):
        c.send_headers(sid + 2, REQ, True)


def test_flow_control_windows_open_only_as_the_consumer_reads() -> None:
    # 64 KiB stream windows: the server can queue one window; the client consuming opens more.
    c, cr, s, sr = pair(initial_window=65535)
    cr.auto_consume = False
    sid = request(c, b"", True)
    pump(c, s)
    s.send_headers(sid, [(b":status", b"200")], False)
    body = bytes(range(256)) * 1024  # 256 KiB
    assert s.send_window(sid) == 65535
    sent = s.send_data(sid, body, False)
    assert sent == 65535 and s.send_window(sid) == 0
    pump(c, s)
    assert len(cr.data[sid]) == 65535
    assert s.send_data(sid, body[sent:], False) == 0  # still nothing: nobody consumed
    pump(c, s)
    assert not sr.kinds("window")
    consumed = 0
    for _ in range(20):  # the consumer reads: each consume opens the window by as much
        got = len(cr.data[sid])
        c.consume(sid, got - consumed)
        consumed = got
        pump(c, s)
        if sr.kinds("window"):
            sr.events = [e for e in sr.events if e[0] != "window"]
            sent += s.send_data(sid, body[sent:], sent + s.send_window(sid) >= len(body))
            pump(c, s)
        if sent == len(body):
            break
    assert sent == len(body)
    assert bytes(cr.data[sid]) == body and ("end", sid) in cr.events


def test_unconsumed_bytes_of_a_closed_stream_return_to_the_connection_window() -> None:
    c, cr, s, sr = pair(initial_window=65535, connection_window=65535)
    cr.auto_consume = False
    sid = request(c, b"", True)
    pump(c, s)
    s.send_headers(sid, [(b":status", b"200")], False)
    assert s.send_data(sid, b"z" * 65535, True) == 65535
    pump(c, s)
    # Never consumed by the caller, but the stream is over: the engine gave the bytes back.
    assert ("end", sid) in cr.events and s.send_window(0) == 65535
    sid2 = request(c, b"", True)
    pump(c, s)
    s.send_headers(sid2, [(b":status", b"200")], False)
    assert s.send_data(sid2, b"z" * 1000, True) == 1000


def test_reset_both_ways() -> None:
    c, cr, s, sr = pair()
    sid = request(c, b"part", False)
    pump(c, s)
    c.reset(sid)
    pump(c, s)
    assert sr.kinds("reset") == [("reset", sid, 0x8)] and not cr.kinds("reset")
    sid2 = request(c, b"part", False)
    pump(c, s)
    s.reset(sid2, 0x7)
    pump(c, s)
    assert cr.kinds("reset") == [("reset", sid2, 0x7)]
    assert c.send_data(sid2, b"late", True) == 4  # gone: swallowed, the reset was reported
    assert c.open_streams == 0 and s.open_streams == 0


def test_goaway_refuses_streams_above_last_stream_id() -> None:
    c, cr, s, sr = pair()
    first = request(c, b"", False)
    pump(c, s)
    second = request(c, b"", False)  # queued at the client, not yet sent when GOAWAY lands
    s.goaway(0)
    c.receive(s.data_to_send())
    c.data_to_send()
    assert c.goaway_received and ("goaway", first, 0) in cr.events
    assert ("reset", second, 0x7) in cr.events  # never processed: safe to retry elsewhere
    pump(c, s)
    c.send_data(first, b"done", True)
    pump(c, s)
    s.send_headers(first, [(b":status", b"200")], True)
    pump(c, s)
    assert ("headers", first, [(b":status", b"200")], True) in cr.events


def test_ping_ack() -> None:
    c, cr, s, sr = pair()
    c.ping()
    pump(c, s)
    assert cr.kinds("ping_ack") == [("ping_ack",)]


def test_sink_exception_propagates_from_receive() -> None:
    class Boom(Rec):
        def on_h2_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                          end_stream: bool) -> None:
            raise RuntimeError("sink bug")

    c, _ = make(True)
    s, _ = make(False, Boom())
    pump(c, s)
    request(c)
    with pytest.raises(RuntimeError, match="sink bug"):
        s.receive(c.data_to_send())


def test_byte_at_a_time_gives_the_same_events() -> None:
    c, cr = make(True)
    request(c, b"abc" * 50, True)
    wire = c.data_to_send()
    s1, r1 = make(False)
    s1.receive(wire)
    s2, r2 = make(False)
    for i in range(len(wire)):
        s2.receive(wire[i:i + 1])
    assert r1.events == r2.events and r1.data == r2.data


def test_garbage_is_a_protocol_error_with_goaway() -> None:
    s, sr = make(False)
    s.data_to_send()
    with pytest.raises(H2ProtocolError):
        s.receive(PREFACE + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\x00" * 4)
    out = s.data_to_send()
    assert out[3:4] == b"\x07"  # GOAWAY


# -- abuse (SPEC section 11) --------------------------------------------------------------------


def attacker() -> h2.connection.H2Connection:
    a = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                            header_encoding=None))
    a.initiate_connection()
    return a


def goaway_code(out: bytes) -> int:
    a = attacker()
    a.data_to_send()
    events = a.receive_data(out)
    ended = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert ended, events
    return int(ended[0].error_code)


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(
        ">I", sid) + payload


def frames(out: bytes) -> list[tuple[int, int, int, bytes]]:
    """The frames in out: (type, flags, stream id, payload)."""
    got = []
    i = 0
    while i + 9 <= len(out):
        n = int.from_bytes(out[i:i + 3], "big")
        got.append((out[i + 3], out[i + 4], int.from_bytes(out[i + 5:i + 9], "big"),
                    out[i + 9:i + 9 + n]))
        i += 9 + n
    return got


def test_rapid_reset_is_cut_off_with_enhance_your_calm() -> None:
    s, sr = make(False)
    s.data_to_send()
    a = attacker()
    wire = a.data_to_send()
    for sid in range(1, 2 * 400, 2):
        a.send_headers(sid, REQ)
        a.reset_stream(sid)
    wire += a.data_to_send()
    with pytest.raises(H2ProtocolError, match="rapid_reset"):
        s.receive(wire)
    assert sr.kinds("abuse") == [("abuse", "rapid_reset")]
    assert goaway_code(s.data_to_send()) == ENHANCE_YOUR_CALM


def test_cancelling_some_calls_is_not_rapid_reset() -> None:
    c, cr, s, sr = pair()
    for i in range(600):  # one call in three cancelled, the rest answered
        sid = request(c, b"q", False)
        pump(c, s)
        if i % 3 == 0:
            c.reset(sid)
        else:
            c.send_data(sid, b"", True)
            pump(c, s)
            s.send_headers(sid, [(b":status", b"200")], True)
        pump(c, s)
    assert not sr.kinds("abuse") and s.open_streams == 0


def test_resets_after_the_answer_are_not_rapid_reset() -> None:
    # A client that drops the rest of its upload once the answer arrived: 400 such resets.
    c, cr, s, sr = pair()
    for _ in range(400):
        sid = request(c, b"upload", False)
        pump(c, s)
        s.send_headers(sid, [(b":status", b"200")], True)
        pump(c, s)
        c.reset(sid)
        pump(c, s)
    assert not sr.kinds("abuse") and s.open_streams == 0


def test_continuation_flood() -> None:
    s, sr = make(False)
    s.data_to_send()
    a = attacker()
    wire = a.data_to_send()
    # HEADERS without END_HEADERS, then CONTINUATION frames each carrying one literal field.
    block = b"\x82\x86\x84\x41\x01a"  # :method GET, :scheme http, :path /, :authority a
    wire += frame(1, 0x1, 1, block)
    field = b"\x40\x03x-a\x01b"  # literal with incremental indexing
    wire += b"".join(frame(9, 0, 1, field) for _ in range(50))
    with pytest.raises(H2ProtocolError):
        s.receive(wire)
    assert sr.kinds("abuse") == [("abuse", "continuation_flood")]
    assert goaway_code(s.data_to_send()) == ENHANCE_YOUR_CALM


def bomb(refs: int) -> bytes:
    """A request header block of one 4000-byte field into the dynamic table, then referenced
    `refs` times by a one-byte index: 32 bytes on the wire per 128 KiB decoded."""
    big = b"v" * 4000
    literal = b"\x40\x03x-a\x7f" + _hpack_int(len(big) - 127) + big
    return b"\x82\x86\x84\x41\x01a" + literal + bytes([0x80 | 62]) * refs


def test_hpack_bomb_decoded_size_is_bounded() -> None:
    s, sr = make(False, max_header_bytes=65536)
    s.data_to_send()
    a = attacker()
    wire = a.data_to_send()
    wire += frame(1, 0x5, 1, bomb(70))  # 280 KiB decoded: over 4 times the limit
    with pytest.raises(H2ProtocolError):
        s.receive(wire)
    assert sr.kinds("abuse") == [("abuse", "hpack_bomb")]
    assert goaway_code(s.data_to_send()) == ENHANCE_YOUR_CALM


def _hpack_int(n: int) -> bytes:
    out = bytearray()
    while n >= 128:
        out.append((n % 128) | 0x80)
        n //= 128
    out.append(n)
    return bytes(out)


def test_too_many_header_fields_is_bounded() -> None:
    s, sr = make(False, max_headers=100)
    s.data_to_send()
    a = attacker()
    wire = a.data_to_send()
    block = b"\x82\x86\x84\x41\x01a" + b"\x40\x03x-a\x01b" + bytes([0x80 | 62]) * 400
    wire += frame(1, 0x5, 1, block)  # 405 fields: over 4 times the limit
    with pytest.raises(H2ProtocolError):
        s.receive(wire)
    assert sr.kinds("abuse") == [("abuse", "hpack_bomb")]


def test_a_header_block_over_the_limits_refuses_its_stream_only() -> None:
    # 2.5 times max_header_bytes decoded: the one stream's error, the connection goes on.
    s, sr = make(False, max_header_bytes=65536)
    s.data_to_send()
    a = attacker()
    s.receive(a.data_to_send() + frame(1, 0x5, 1, bomb(40)))
    assert not sr.kinds("abuse") and not sr.kinds("headers")
    [(_, sid, fields, end, trailers)] = sr.kinds("too_large")
    assert (sid, end, trailers) == (1, True, False)
    assert fields[:4] == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                          (b":authority", b"a")]
    assert len(fields) == 20  # what fits the limit (16 of the 41 x-a): the rest was not kept
    s.send_headers(1, [(b":status", b"431")], True)
    # The dynamic table stayed in step: the next block refers to the entry the big one made.
    sent = [f[0] for f in frames(s.data_to_send())]
    assert 1 in sent and 7 not in sent  # our 431, no GOAWAY
    # (Its own :authority literal is entry 62 now, the big field 63.)
    s.receive(frame(1, 0x5, 3, b"\x82\x86\x84\x41\x01a" + bytes([0x80 | 63])))
    assert sr.kinds("headers") == [("headers", 3, [
        (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a"),
        (b"x-a", b"v" * 4000)], True)]


def test_too_many_fields_refuses_the_stream_and_keeps_its_content_type() -> None:
    c, cr, s, sr = pair(max_headers=20)
    sid = c.new_stream_id()
    many = [(b"x-%d" % i, b"v") for i in range(30)]
    c.send_headers(sid, REQ[:4] + many + [(b"content-type", b"application/grpc")], True)
    pump(c, s)
    [(_, got, fields, end, trailers)] = sr.kinds("too_large")
    assert (got, end, trailers) == (sid, True, False)
    assert len(fields) == 21 and fields[-1] == (b"content-type", b"application/grpc")
    s.send_headers(sid, [(b":status", b"431")], True)
    pump(c, s)
    assert ("headers", sid, [(b":status", b"431")], True) in cr.events
    assert not sr.kinds("abuse") and not cr.kinds("abuse")


def test_oversized_request_trailers_and_response_blocks_are_stream_errors() -> None:
    c, cr, s, sr = pair(max_header_bytes=4096)
    big = [(b"x-%d" % i, b"v" * 1000) for i in range(5)]
    sid = request(c, b"body", False)
    c.send_trailers(sid, big)
    pump(c, s)
    assert [e[1:] for e in sr.kinds("too_large")] == [(sid, big[:3], True, True)]
    s.send_headers(sid, [(b":status", b"200")] + big, False)  # a response head over them
    pump(c, s)
    assert [e[1:] for e in cr.kinds("too_large")] == [
        (sid, [(b":status", b"200")] + big[:3], False, False)]
    assert not sr.kinds("abuse") and not cr.kinds("abuse")


def test_repeated_oversized_blocks_are_an_hpack_bomb_unless_paid_back() -> None:
    s, sr = make(False, max_header_bytes=65536)
    s.data_to_send()
    a = attacker()
    s.receive(a.data_to_send())
    small = b"\x82\x86\x84\x41\x01a"
    sid = 1
    for _ in range(3 * OVERSIZED_HEADER_DEBT):  # each oversized block paid back by a good one
        s.receive(frame(1, 0x5, sid, bomb(20)) + frame(1, 0x5, sid + 2, small))
        s.send_headers(sid, [(b":status", b"431")], True)
        s.send_headers(sid + 2, [(b":status", b"200")], True)
        s.data_to_send()
        sid += 4
    assert len(sr.kinds("too_large")) == 3 * OVERSIZED_HEADER_DEBT and not sr.kinds("abuse")
    with pytest.raises(H2ProtocolError, match="hpack_bomb"):
        for _ in range(OVERSIZED_HEADER_DEBT + 1):  # never paid back
            s.receive(frame(1, 0x5, sid, bomb(20)))
            s.send_headers(sid, [(b":status", b"431")], True)
            sid += 2
    assert sr.kinds("abuse") == [("abuse", "hpack_bomb")]
    assert goaway_code(s.data_to_send()) == ENHANCE_YOUR_CALM


def test_one_field_over_64_kib_on_the_wire_is_a_compression_error_whatever_the_limits() -> None:
    # nghttp2's decoder refuses a field whose encoded length is over NGHTTP2_HD_MAX_NV (64 KiB):
    # a connection error. (70000 `~`: 13 bits each once Huffman coded, so sent as they are.)
    c, cr, s, sr = pair(max_header_bytes=1 << 20)
    c.send_headers(c.new_stream_id(), REQ + [(b"x-big", b"~" * 70000)], True)
    with pytest.raises(H2ProtocolError):
        s.receive(c.data_to_send())
    assert goaway_code(s.data_to_send()) == 0x9  # COMPRESSION_ERROR
    assert not sr.kinds("too_large") and not sr.kinds("abuse")
    # The same length of `v` is ~44 KiB on the wire: just a big field.
    c, cr, s, sr = pair(max_header_bytes=1 << 20)
    c.send_headers(c.new_stream_id(), REQ + [(b"x-big", b"v" * 70000)], True)
    s.receive(c.data_to_send())
    assert sr.kinds("headers")[0][2][-1] == (b"x-big", b"v" * 70000)


def test_a_big_but_allowed_header_block_passes() -> None:
    c, cr, s, sr = pair()
    sid = c.new_stream_id()
    c.send_headers(sid, REQ + [(b"x-big", b"v" * 40000)], True)  # spans CONTINUATION frames
    pump(c, s)
    assert sr.kinds("headers")[0][2][-1] == (b"x-big", b"v" * 40000)
    assert not sr.kinds("abuse")


@pytest.mark.parametrize(("ftype", "kind"), [(6, "ping_flood"), (4, "settings_flood")])
def test_ping_and_settings_floods(ftype: int, kind: str) -> None:
    s, sr = make(False)
    s.data_to_send()
    a = attacker()
    wire = a.data_to_send()
    one = frame(6, 0, 0, b"12345678") if ftype == 6 else frame(4, 0, 0, b"")
    # A peer that sends PINGs (SETTINGS) and never reads our ACKs: the ACKs owed pile up.
    with pytest.raises(H2ProtocolError, match=kind):
        s.receive(wire + one * 5000)
    assert sr.kinds("abuse") == [("abuse", kind)]
    assert goaway_code(s.data_to_send()) == ENHANCE_YOUR_CALM


def test_settings_frame_with_too_many_entries() -> None:
    s, sr = make(False)
    s.data_to_send()
    a = attacker()
    wire = a.data_to_send() + frame(4, 0, 0, struct.pack(">HI", 3, 100) * 200)
    with pytest.raises(H2ProtocolError):
        s.receive(wire)
    assert sr.kinds("abuse") == [("abuse", "settings_flood")]


def test_pings_read_at_a_normal_pace_are_answered() -> None:
    s, sr = make(False)
    s.data_to_send()
    a = attacker()
    s.receive(a.data_to_send())
    for _ in range(300):  # a peer that reads each answer: never a flood
        s.receive(frame(6, 0, 0, b"12345678") * 3)
        assert s.data_to_send()
    assert not sr.kinds("abuse")


# -- SETTINGS_MAX_CONCURRENT_STREAMS ---------------------------------------------------------


def test_streams_beyond_our_limit_are_refused_after_the_ack_too() -> None:
    c, cr, s, sr = pair(max_concurrent_streams=2)
    assert ("settings", 2) in cr.events  # the peer is told ours, not nghttp2's backstop
    a = attacker()  # a peer that ignores the limit, its SETTINGS acknowledged first
    s2, sr2 = make(False, max_concurrent_streams=2)
    s2.receive(a.data_to_send())
    a.receive_data(s2.data_to_send())
    assert a.remote_settings.max_concurrent_streams == 2
    enc = a.encoder
    wire = a.data_to_send()
    for sid in (1, 3, 5, 7):
        wire += frame(1, 0x5, sid, enc.encode(REQ))
    s2.receive(wire)
    assert [e[1] for e in sr2.kinds("headers")] == [1, 3]  # 5 and 7 never reach the sink
    out = frames(s2.data_to_send())
    # One RST_STREAM each (not nghttp2's INTERNAL_ERROR after ours), and no GOAWAY.
    assert [(t, sid, p) for t, _, sid, p in out if t in (3, 7)] == [
        (3, 5, REFUSED_STREAM.to_bytes(4, "big")), (3, 7, REFUSED_STREAM.to_bytes(4, "big"))]
    # One ends: room for one more.
    s2.send_headers(1, [(b":status", b"200")], True)
    s2.data_to_send()
    s2.receive(frame(1, 0x5, 9, enc.encode(REQ)) + frame(1, 0x5, 11, enc.encode(REQ)))
    assert [e[1] for e in sr2.kinds("headers")] == [1, 3, 9]
    assert not sr2.kinds("abuse")


def test_a_peer_that_keeps_opening_streams_beyond_the_limit_is_cut_off() -> None:
    s, sr = make(False, max_concurrent_streams=2)
    a = attacker()
    s.receive(a.data_to_send())
    a.receive_data(s.data_to_send())
    wire = a.data_to_send()  # our SETTINGS acknowledged
    # 2 served, then more refusals than the rapid-reset debt: cut off as rapid_reset (our
    # GOAWAY ENHANCE_YOUR_CALM), before nghttp2's backstop (PROTOCOL_ERROR) is reached.
    for sid in range(1, 2 * (RAPID_RESET_DEBT + 3) + 2, 2):
        wire += frame(1, 0x5, sid, a.encoder.encode(REQ))
    with pytest.raises(H2ProtocolError, match="rapid_reset"):
        s.receive(wire)
    assert sr.kinds("abuse") == [("abuse", "rapid_reset")]
    assert goaway_code(s.data_to_send()) == ENHANCE_YOUR_CALM


def test_drain_race_a_stream_sent_after_goaway_is_refused_not_processed() -> None:
    c, cr, s, sr = pair()
    old = request(c, b"", False)
    pump(c, s)
    late = request(c)  # on the wire while the server's GOAWAY is on its way
    wire_late = c.data_to_send()
    s.goaway(0)  # last stream id: the last one processed (old)
    goaway = s.data_to_send()
    s.receive(wire_late)
    assert [e for e in sr.kinds("headers") if e[1] == late] == []  # never reaches the caller
    c.receive(goaway)
    assert ("goaway", old, 0) in cr.events and ("reset", late, 0x7) in cr.events
    c.send_data(old, b"", True)
    pump(c, s)
    s.send_headers(old, [(b":status", b"200")], True)  # the old one finishes
    pump(c, s)
    assert ("headers", old, [(b":status", b"200")], True) in cr.events


# -- close: the connection is gone -------------------------------------------------------------


def _sessions() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is H2Session)


def test_close_is_idempotent_and_every_method_after_it_is_safe() -> None:
    c, cr, s, sr = pair()
    sid = request(c, end=False)  # a stream open on both sides
    pump(c, s)
    heard = (list(cr.events), list(sr.events))
    for session in (c, s):
        session.close()
        session.close()
        assert "closed" in repr(session)
        with pytest.raises(H2ProtocolError, match="session closed"):
            session.receive(PREFACE)
        assert session.data_to_send() == b""
        with pytest.raises(H2ProtocolError):
            session.initiate()
        assert session.send_data(sid, b"abc", False) == 3  # a stream that is gone takes all
        session.send_trailers(sid, [(b"x", b"y")])
        session.reset(sid)
        session.consume(sid, 10)
        session.goaway()
        session.ping()
        assert session.send_window(0) == 0 and session.send_window(sid) == 0
        assert session.open_streams == 0
        assert session.peer_max_concurrent_streams == 0
        assert not session.goaway_received
        assert session.data_to_send() == b""
    with pytest.raises(H2ProtocolError):
        c.new_stream_id()
    with pytest.raises(H2ProtocolError):
        c.send_headers(sid + 2, REQ, True)
    s.send_headers(sid, [(b":status", b"200")], True)  # its stream is gone: nothing
    assert s.data_to_send() == b""
    assert (cr.events, sr.events) == heard  # no sink was called after close


def test_close_frees_the_sessions_without_the_cyclic_collector() -> None:
    """Each session refers to itself (nghttp2's user data) and to its sink, which refers back:
    after close() reference counting alone frees both, nghttp2's memory with them."""
    gc.collect()
    gc.disable()
    try:
        base = _sessions()
        c, cr, s, sr = pair()
        sid = request(c)
        pump(c, s)
        s.send_headers(sid, [(b":status", b"200")], True)
        pump(c, s)
        assert _sessions() == base + 2
        c.close()
        s.close()
        del c, cr, s, sr
        assert _sessions() == base
    finally:
        gc.enable()


def test_close_from_inside_a_callback_frees_once_nghttp2_returned() -> None:
    class Closer(Rec):
        def on_h2_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                          end_stream: bool) -> None:
            super().on_h2_headers(stream_id, headers, end_stream)
            assert self.session is not None
            self.session.close()  # its connection gives up while nghttp2 is reading

    c, _ = make(True)
    s, sr = make(False, Closer())
    request(c)
    request(c)  # a second stream in the same read: nghttp2 goes on, no sink hears it
    with pytest.raises(H2ProtocolError, match="session closed"):
        s.receive(c.data_to_send())
    assert len(sr.kinds("headers")) == 1 and not sr.data
    assert "server closed [Streams: 0 open]" in repr(s)
    assert s.data_to_send() == b""


def test_close_from_inside_a_callback_of_the_framing() -> None:
    """A request refused by the peer's GOAWAY is reported while nghttp2 frames (inside
    receive); the sink closes its connection then: nothing reaches the freed session."""

    class CloseOnReset(Rec):
        def on_h2_reset(self, stream_id: int, error_code: int) -> None:
            super().on_h2_reset(stream_id, error_code)
            assert self.session is not None
            self.session.close()

    c, cr = make(True, CloseOnReset())
    s, _ = make(False)
    pump(c, s)
    request(c, b"", False)
    pump(c, s)
    second = request(c, b"", False)  # queued at the client when GOAWAY lands
    s.goaway(0)
    with pytest.raises(H2ProtocolError, match="session closed"):
        c.receive(s.data_to_send())
    assert ("reset", second, 0x7) in cr.events
    assert "client closed" in repr(c) and c.data_to_send() == b""


class _Lean(H2Sink):
    """Consumes what it is given and keeps nothing: no sink memory grows with the streams."""

    def __init__(self) -> None:
        self.session: H2Session | None = None

    def on_h2_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if data:
            assert self.session is not None
            self.session.consume(stream_id, len(data))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _c_heap() -> int:
    """Bytes glibc's malloc has handed out: nghttp2's memory among them (Python's small
    objects live in pymalloc's own arenas, outside this)."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def test_closed_streams_leave_nothing_in_nghttp2() -> None:
    """nghttp2 would keep up to SETTINGS_MAX_CONCURRENT_STREAMS closed streams per connection
    (for RFC 7540 priorities, ~320 bytes each): a connection that has carried 1000 streams
    held ~320 KiB more than a new one. Streams one after the other: C memory stays flat."""
    sessions = []
    for client in (True, False):
        sink = _Lean()
        session = H2Session(sink, client)
        sink.session = session
        session.initiate()
        sessions.append(session)
    c, s = sessions
    pump(c, s)

    def one() -> None:
        sid = c.new_stream_id()
        c.send_headers(sid, REQ, True)
        pump(c, s)
        s.send_headers(sid, [(b":status", b"200")], True)
        pump(c, s)

    for _ in range(200):
        one()
    before = _c_heap()
    for _ in range(1000):
        one()
    grown = _c_heap() - before
    assert c.open_streams == 0 and s.open_streams == 0
    assert grown < 64 * 1024, f"{grown} bytes more after 1000 closed streams"


def test_a_missing_libnghttp2_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.http import _nghttp2

    monkeypatch.setattr(_nghttp2, "SONAME", "libnghttp2-nonexistent.so.99")
    monkeypatch.setattr(_nghttp2, "_lib", None)
    with pytest.raises(OSError, match="apt-get install libnghttp2-14"):
        H2Session(H2Sink(), False)


# -- the two builds of the binding (sidecar/http/_nghttp2.py) -----------------------------------


def test_the_binding_is_the_one_the_build_promised() -> None:
    from sidecar.http import _nghttp2

    if os.environ.get("SIDECAR_PURE") == "1" or os.environ.get("SIDECAR_EXPECT_COMPILED") == "0":
        assert _nghttp2.MODE == "abi"  # the sources only: libnghttp2.so.14 loaded at run time
    elif os.environ.get("SIDECAR_EXPECT_COMPILED") == "1":
        # scripts/check installs libnghttp2-dev: a build that silently fell back to ABI mode
        # would make every HTTP/2 figure wrong
        assert _nghttp2.MODE == "api"


ROUND_TRIP = """
from tests.unit.test_h2engine import pair, request, pump
from sidecar.http import _nghttp2
c, cr, s, sr = pair()
sid = request(c)
pump(c, s)
s.send_headers(sid, [(b":status", b"200")], False)
s.send_data(sid, b"ok", False)
s.send_trailers(sid, [(b"grpc-status", b"0")])
pump(c, s)
assert cr.kinds("trailers") == [("trailers", sid, [(b"grpc-status", b"0")])], cr.events
print(_nghttp2.MODE)
"""


def test_the_abi_fallback_runs_where_the_compiled_binding_is_absent() -> None:
    # SIDECAR_PURE=1 hides every compiled module of the tree, the binding included: what a
    # machine without a compiler or libnghttp2-dev runs. Whatever this run's build is.
    env = {**os.environ, "SIDECAR_PURE": "1"}
    out = subprocess.run([sys.executable, "-c", ROUND_TRIP], env=env, capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "abi"


def _client_wire() -> bytes:
    c, _ = make(True)
    for i in range(3):
        sid = c.new_stream_id()
        c.send_headers(sid, REQ + [(b"x-i", b"%d" % i), (b"x-big", b"v" * 300 * i)], False)
        c.send_data(sid, b"d" * (1000 * i + 1), False)
        c.send_trailers(sid, [(b"x-end", b"%d" % i)])
    return c.data_to_send()


_WIRE = _client_wire()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=60))
def test_any_split_of_the_input_gives_the_same_events(cuts: list[int]) -> None:
    whole, rw = make(False)
    whole.receive(_WIRE)
    split, rs = make(False)
    i = 0
    for n in cuts:
        if i >= len(_WIRE):
            break
        split.receive(_WIRE[i:i + n])
        i += n
    if i < len(_WIRE):
        split.receive(_WIRE[i:])
    assert rs.events == rw.events and rs.data == rw.data
