"""Where a gRPC answer's body stands in its length-prefixed messages (H2AppStream
`_track_messages`): an error after the answer began ends it with trailers only at a message
boundary, else the stream is cut (tests/integration/test_h2_review.py drives it end to end)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from sidecar._build import compiled
from sidecar.downstream.http2 import H2AppStream


def message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


# A stream without a connection: `_track_messages` reads nothing else. Compiled, __init__
# refuses the None stand-in, so this runs in the pure pass (scripts/check runs tests/unit in
# both); test_h2_review.py drives the same code compiled, end to end.
pytestmark = pytest.mark.skipif(
    compiled(), reason="by design: a stream without a connection exists only interpreted; "
    "the pure pass runs it"
)


def fresh() -> H2AppStream:
    return H2AppStream(cast(Any, None), 1)


def at_boundary(st: H2AppStream) -> bool:
    return not st.msg_left and not st.msg_prefix


def test_every_split_of_whole_messages_ends_at_a_boundary_and_nowhere_inside() -> None:
    body = message(b"abc") + message(b"") + message(b"x" * 300)
    ends = {5 + 3, 5 + 3 + 5, len(body)}  # where a message ends
    for cut in range(1, len(body)):
        st = fresh()
        st._track_messages(body[:cut])
        assert at_boundary(st) == (cut in ends), cut
        st._track_messages(body[cut:])
        assert at_boundary(st)


def test_byte_at_a_time() -> None:
    st = fresh()
    body = message(b"hello") * 3
    seen = []
    for i in range(len(body)):
        st._track_messages(body[i:i + 1])
        seen.append(at_boundary(st))
    assert [i + 1 for i, b in enumerate(seen) if b] == [10, 20, 30]
