"""Pipelined requests the sidecar refuses itself must not freeze it (a fuzz finding, issue 13).

Found by the protocol fuzz target (tests/fuzz): a request in flight, then two pipelined
requests that are refused before reaching an upstream (here 404 `no_route`; any synchronous
refusal does: bad port, host not allowed, circuit open). When the first answer ends,
`DownstreamProtocol._run_queue` begins the next request, whose refusal ends it at once and runs
the queue again from inside the loop; the refused request's own `end` event, still queued, is
then handed to `on_request_end`, which re-queues it behind whatever is left because the queue is
not empty. Two such `end` events chase each other around the queue for ever: the event loop is
stuck and every connection of the pod loses its egress. With a body after the refused request
instead, the stray `end` reaches the *next* request early (its body is then cut short
upstream, or a second last-chunk is written onto a pooled connection). And each refusal runs
the queue from inside the one before: a few hundred pipelined refusals exceed Python's
recursion limit (600 here; one 64 KiB read holds about 1,800); compiled, the same depth is
C stack (not measured).

Fixed: `_run_queue` does not re-enter itself, and a refused request's queued body and end
are dropped rather than handed back to `on_request_*`. Real parts: the sidecar process, an
nginx upstream, a raw socket client.
"""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from tests.harness import LOOPS, Sidecar, nginx

NGINX_CONF = 'server { listen 127.0.0.1:{port}; location / { return 200 "ok"; } }'
GOOD = b"GET /a HTTP/1.1\r\nHost: up\r\n\r\n"
REFUSED = b"GET /b HTTP/1.1\r\nHost: nowhere\r\n\r\n"  # no route: 404 from the sidecar itself
BOUND = 3.0


def _statuses(port: int, data: bytes, want: int) -> list[bytes]:
    """Send `data` at once; the status codes of the responses read within BOUND seconds."""
    got = b""
    deadline = time.monotonic() + BOUND
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        sock.sendall(data)
        while got.count(b"HTTP/1.1 ") < want and time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            got += chunk
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", got)


@pytest.mark.parametrize("loop, refused", [*((loop, 2) for loop in LOOPS), ("uvloop", 600)],
                         ids=[*(f"{loop}-2" for loop in LOOPS), "uvloop-600"])
def test_pipelined_refusals_after_a_request_in_flight(loop: str, refused: int) -> None:
    with nginx(NGINX_CONF) as upstream:
        config = {
            "listeners": [{"name": "egress",
                           "routes": [{"match": {"host": "up"}, "cluster": "up"}]}],
            "clusters": [{"name": "up", "discovery": {
                "type": "static", "endpoints": [f"127.0.0.1:{upstream}"]}}],
        }
        with Sidecar(config, loop=loop) as sc:
            port = sc.port("egress")
            statuses = _statuses(port, GOOD + REFUSED * refused, 1 + refused)
            # Whatever happened on that connection, another one must still be served.
            after = _statuses(port, GOOD, 1)
            if not after:
                sc.signal(signal.SIGKILL)  # the loop is stuck: SIGTERM would wait 10 s for it
            assert statuses == [b"200"] + [b"404"] * refused
            assert after == [b"200"]
