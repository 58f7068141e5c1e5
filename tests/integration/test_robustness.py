"""Issue 18, findings 3, 4 and 8: every request gets an answer, forward-proxy destinations are
bounded, and `protocol: tcp` listeners do not hit the pool's queue.

A real sidecar process (tests/harness.py) on 127.0.0.1, under both loops where cheap, in front
of a raw-socket origin that records every byte it receives (so "nothing was forwarded" is
checked, not assumed). Clients are raw sockets: what these tests send, real clients would not.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import LOOPS, Sidecar, http_get

TIMEOUT = 10.0


# --- the origin ----------------------------------------------------------------------------------
class _OriginConn(asyncio.Protocol):
    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.echo = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.origin.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.origin.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        origin = self.origin
        origin.received.append(data)
        assert self.transport is not None
        if self.echo or not self.buf and data.startswith(b"tcp:"):
            self.echo = True  # a raw TCP client: echo what it sends
            self.transport.write(data)
            return
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            origin.heads.append(head)
            if b" /hang " in head.split(b"\r\n", 1)[0]:
                origin.hung.append(self)  # answered on release(): a request in flight
                continue
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class Origin:
    """Raw-socket HTTP/1.1 origin on its own loop thread, on 127.0.0.1: records every byte
    and head; answers `200 ok` to each head except `GET /hang`; a client whose first bytes are
    `tcp:` gets its bytes echoed (a TCP tunnel's far end). Several ports (distinct
    forward-proxy destinations), one loop."""

    def __init__(self, ports: int = 1) -> None:
        self.received: list[bytes] = []
        self.heads: list[bytes] = []
        self.conns: set[_OriginConn] = set()
        self.hung: list[_OriginConn] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.servers: list[asyncio.AbstractServer] = []
        for _ in range(ports):
            self.servers.append(self._call(self.loop.create_server(
                lambda: _OriginConn(self), "127.0.0.1", 0, backlog=4096)))
        self.ports = [s.sockets[0].getsockname()[1] for s in self.servers]
        self.port = self.ports[0]

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    @property
    def bytes(self) -> bytes:
        return b"".join(self.received)

    def release(self) -> None:
        """Answer the requests held since they arrived (`GET /hang`)."""

        async def release() -> None:
            for conn in self.hung:
                if conn.transport is not None:
                    conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.hung.clear()

        self._call(release())

    def stop(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                server.close()
            for conn in list(self.conns):
                if conn.transport is not None:
                    conn.transport.abort()

        self._call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin(ports=6)
    yield o
    o.stop()


# --- clients -------------------------------------------------------------------------------------
def exchange(port: int, request: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send `request`, read until the sidecar closes or a whole response is in."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return read_response(s)


def read_response(s: socket.socket) -> bytes:
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(body) >= int(value):
                    return data
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    assert response, "the connection closed without an answer"
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def proxy_config(**forward: Any) -> dict[str, Any]:
    return {
        "listeners": [{
            "name": "egress", "protocol": "http",
            "forward_proxy": {"enabled": True, "allowed_hosts": ["*"], "connect": True,
                              **forward},
        }],
        "clusters": [],
    }


# --- finding 3: whatever goes wrong, the app gets an answer --------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_non_ascii_digit_port_gets_400_not_a_closed_connection(loop: str, origin: Origin) -> None:
    # '\xb2' (superscript two) passes str.isdigit(), and int() raised in split_authority: the
    # connection closed with no answer and a 2.7 KB traceback in the log per request.
    with Sidecar(proxy_config(), loop=loop) as sc:
        for _ in range(20):
            status, headers, body = parse(
                exchange(sc.port("egress"), b"GET / HTTP/1.1\r\nHost: up:\xb2\r\n\r\n"))
            assert status == 400
            assert headers["x-sidecar-error"] == "bad_request"
            assert headers.get("connection") == "close"
            assert json.loads(body)["error"] == "bad_request"
        # The sidecar still serves, and at most one traceback was logged for the twenty.
        status, _, body = parse(exchange(
            sc.port("egress"),
            b"GET http://127.0.0.1:%d/ok HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
            % (origin.port, origin.port)))
        assert (status, body) == (200, b"ok")
        assert sc.logs().count("Traceback") <= 1
    assert b"\xb2" not in origin.bytes


@pytest.mark.parametrize("loop", LOOPS)
def test_connect_to_a_host_with_userinfo_gets_400(loop: str, origin: Origin) -> None:
    # "up-a@127.0.0.1" matched the glob "*", then failed the DNS host check of the dynamic
    # cluster's config with a pydantic ValidationError: no answer, connection closed.
    with Sidecar(proxy_config(), loop=loop) as sc:
        target = b"up-a@127.0.0.1:%d" % origin.port
        status, headers, body = parse(exchange(
            sc.port("egress"), b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)))
        assert status == 400
        assert headers["x-sidecar-error"] == "bad_request"
        assert "not a valid host name" in json.loads(body)["detail"]
        assert "Traceback" not in sc.logs()
    assert origin.received == []


# --- finding 8: a burst on a TCP listener --------------------------------------------------------
BURST = 1500


async def _tunnel_burst(port: int, n: int) -> list[bool]:
    """`n` simultaneous connections, each sending a token and waiting for it to come back."""

    async def one(i: int) -> bool:
        token = b"tcp:%06d\n" % i
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        try:
            writer.write(token)
            got = await reader.readexactly(len(token))
            return got == token
        except (OSError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()

    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 90)


@pytest.mark.parametrize("loop", LOOPS)
def test_tcp_listener_burst_every_connection_gets_through(loop: str, origin: Origin) -> None:
    # 1,500 simultaneous connections to a `protocol: tcp` listener went through the pool's
    # queue (max_pending 1000, pending_timeout 1s): 423 were tunnelled, the rest closed without
    # data, and an HTTP request to the same cluster during the burst got 503 pool_timeout.
    config = {
        "listeners": [
            {"name": "tcp", "protocol": "tcp", "cluster": "up"},
            {"name": "http", "protocol": "http", "cluster": "up"},
        ],
        "clusters": [{"name": "up", "discovery": {
            "type": "static", "endpoints": [f"127.0.0.1:{origin.port}"]}}],
    }
    with Sidecar(config, loop=loop) as sc:
        http_answers: list[int] = []

        def http_during_burst() -> None:
            time.sleep(0.2)  # the burst is under way (a fixed offset, not a wait for a state)
            http_answers.append(http_get(sc.url("http", "/during"), timeout=TIMEOUT)[0])

        side = threading.Thread(target=http_during_burst)
        side.start()
        results = asyncio.run(_tunnel_burst(sc.port("tcp"), BURST))
        side.join(TIMEOUT)
        assert results.count(False) == 0, f"{results.count(False)} of {BURST} failed"
        assert http_answers == [200]
        assert sc.metric("sidecar_local_errors_total", cluster="up") == 0
    tokens = origin.bytes
    assert all(b"tcp:%06d\n" % i in tokens for i in range(BURST))


# --- finding 4: forward-proxy destinations are bounded -------------------------------------------
def _get(sc: Sidecar, port: int, path: str = "/ok") -> tuple[int, dict[str, str], bytes]:
    return parse(exchange(
        sc.port("egress"),
        b"GET http://127.0.0.1:%d%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
        % (port, path.encode(), port)))


def _dynamic(sc: Sidecar) -> set[str]:
    return {name for name in sc.clusters() if name.startswith("127.0.0.1:")}


def test_destinations_beyond_the_limit_evict_the_least_recently_used_idle_one(
    origin: Origin,
) -> None:
    with Sidecar(proxy_config(max_destinations=3)) as sc:
        for port in origin.ports[:3]:
            assert _get(sc, port)[0] == 200
        _get(sc, origin.ports[0])  # the first is now the most recently used; the second the least
        assert _get(sc, origin.ports[3])[0] == 200
        names = _dynamic(sc)
        assert names == {f"127.0.0.1:{p}" for p in (origin.ports[0], *origin.ports[2:4])}
        # The evicted destination's series went with it (3,000 destinations made /metrics 28 MB).
        assert f'cluster="127.0.0.1:{origin.ports[1]}"' not in sc.metrics()
        for port in origin.ports:
            assert _get(sc, port)[0] == 200
            assert len(_dynamic(sc)) <= 3
        assert sc.metric("sidecar_forward_proxy_destinations") == 3
        events = "sidecar_forward_proxy_destination_events_total"
        assert sc.metric(events, event="evicted") == sc.metric(events, event="created") - 3


def test_a_new_destination_when_all_are_busy_gets_503_too_many_destinations(
    origin: Origin,
) -> None:
    with Sidecar(proxy_config(max_destinations=2)) as sc:
        busy = []
        for port in origin.ports[:2]:
            s = socket.create_connection(("127.0.0.1", sc.port("egress")), timeout=TIMEOUT)
            s.sendall(b"GET http://127.0.0.1:%d/hang HTTP/1.1\r\nHost: x\r\n\r\n" % port)
            busy.append(s)
        deadline = time.monotonic() + TIMEOUT
        while sum(b" /hang " in h for h in origin.heads) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, headers, body = _get(sc, origin.ports[2])
        assert status == 503
        assert headers["x-sidecar-error"] == "too_many_destinations"
        assert json.loads(body)["error"] == "too_many_destinations"
        origin.release()  # both requests are answered: their destinations turn idle
        for s in busy:
            assert parse(read_response(s))[0] == 200
            s.close()
        assert _get(sc, origin.ports[2])[0] == 200
        assert len(_dynamic(sc)) == 2
        events = "sidecar_forward_proxy_destination_events_total"
        assert sc.metric(events, event="refused") == 1
        assert sc.metric(events, event="evicted") == 1


def test_a_name_that_does_not_resolve_is_remembered_not_retried_in_a_loop() -> None:
    with Sidecar(proxy_config()) as sc:
        answers = []
        for _ in range(20):
            answers.append(parse(exchange(
                sc.port("egress"),
                b"GET http://no-such-host.invalid/ HTTP/1.1\r\nHost: no-such-host.invalid\r\n\r\n",
            )))
        assert {a[0] for a in answers} == {502}
        assert {a[1]["x-sidecar-error"] for a in answers} == {"connect_failed"}
        assert "did not resolve" in json.loads(answers[-1][2])["detail"]
        # Given up at once: no cluster keeps resolving the name, and one log line, not one per
        # lookup.
        assert "no-such-host.invalid:80" not in sc.clusters()
        assert sc.logs().count("dns_resolve_failed") <= 1
        # One lookup for the twenty (they came within the 5 s the failure is remembered).
        events = "sidecar_forward_proxy_destination_events_total"
        assert sc.metric(events, event="created") == 1
        assert sc.metric(events, event="unresolvable") == 1


def test_established_tunnels_release_their_breaker_slot(origin: Origin) -> None:
    # A CONNECT tunnel kept its concurrency slot (circuit_breaker.max_concurrent_requests) for
    # good: after that many tunnels every request to the cluster got 503 circuit_open, and a
    # forward-proxy destination with a tunnel never looked idle (so it was never evicted).
    config = {
        "listeners": [{"name": "egress", "protocol": "http", "cluster": "up"}],
        "clusters": [{"name": "up",
                      "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{origin.port}"]},
                      "circuit_breaker": {"max_concurrent_requests": 2}}],
    }
    with Sidecar(config) as sc:
        for i in range(5):
            with socket.create_connection(("127.0.0.1", sc.port("egress")), timeout=TIMEOUT) as s:
                s.sendall(b"CONNECT up:443 HTTP/1.1\r\nHost: up:443\r\n\r\n")
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    assert chunk, head
                    head += chunk
                assert head.startswith(b"HTTP/1.1 200"), head
                s.sendall(b"tcp:%d\n" % i)
                got = b""
                while not got.endswith(b"\n"):
                    chunk = s.recv(4096)
                    assert chunk
                    got += chunk
                assert got == b"tcp:%d\n" % i
