"""Issue 19 end to end: what a failed try really was decides whether it goes again and who pays.

A real sidecar process (both loops) in front of small raw HTTP/1.1 origins on 127.0.0.1 that
record every request they receive (method, path, body, and whether it came on a connection
they had already served: a reused one):

- a try that failed before any byte left the sidecar (connection refused: a port nothing
  listens on) goes again whatever the method, so keyless POSTs (small, chunked, and larger
  than `retry.max_body_bytes`) all land, once, on the healthy endpoints;
- an endpoint that drops a request 300 ms into it (the origin resets its connection, as a
  killed process would) is a `reset`: budgeted (`sidecar_retries_total{reason="reset"}`; with
  no budget it is not retried), counted as the endpoint's failure (outlier ejection), and not
  retried on the same endpoint as if it had been a keep-alive race;
- the keep-alive race (a reused connection closed the moment the request lands) is still
  retried for free, on a fresh connection, with no budget at all.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.harness import LOOPS, Sidecar, free_port

TIMEOUT = 10.0
BIG = 1024 * 1024  # over retry.max_body_bytes (64 KiB) and over any single read (256 KiB)
_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")
_CHUNKED = re.compile(rb"(?im)^transfer-encoding:\s*chunked")


@dataclass
class Seen:
    method: bytes
    path: bytes
    body: bytes
    reused: bool  # arrived on a connection this origin had already answered on


class _Conn(asyncio.Protocol):
    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.buf = b""
        self.served = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self._one():
            pass

    def _one(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, rest = self.buf[:end], self.buf[end + 4:]
        if _CHUNKED.search(head):
            body, used = _dechunk(rest)
            if used < 0:
                return False
        else:
            m = _LENGTH.search(head)
            used = int(m.group(1)) if m else 0
            if len(rest) < used:
                return False
            body = rest[:used]
        self.buf = rest[used:]
        method, path = head.split(b" ", 2)[:2]
        self.origin.seen.append(Seen(method, path, body, self.served > 0))
        self.respond(path)
        self.served += 1
        return True

    def respond(self, path: bytes) -> None:
        t = self.transport
        assert t is not None
        loop = asyncio.get_running_loop()
        if path == b"/race" and self.served:
            t.close()  # the keep-alive race: closed as the request lands, never answered
        elif path == b"/slow-kill" and self.origin.kills:
            loop.call_later(0.3, self.reset)  # dropped 300 ms into the request
        elif path.startswith(b"/slow"):
            loop.call_later(0.3, self.answer)
        else:
            self.answer()

    def answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            body = self.origin.name.encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))

    def reset(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            sock = t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.abort()


def _dechunk(data: bytes) -> tuple[bytes, int]:
    """(body, bytes used) of a complete chunked body without trailers, or (b"", -1)."""
    body, pos = b"", 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return b"", -1
        size = int(data[pos:eol].split(b";")[0], 16)
        start = eol + 2
        if size == 0:
            return (body, start + 2) if len(data) >= start + 2 else (b"", -1)
        if len(data) < start + size + 2:
            return b"", -1
        body += data[start:start + size]
        pos = start + size + 2


class Origin:
    def __init__(self, name: str, kills: bool = False) -> None:
        self.name = name
        self.kills = kills  # /slow-kill resets the connection (else answers after 300 ms)
        self.seen: list[Seen] = []
        self.port = 0

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    def paths(self, path: bytes) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


class Origins:
    """Every origin on one event loop in one thread."""

    def __init__(self, origins: list[Origin]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.AbstractServer] = []
        for origin in origins:
            server = self._run(self.loop.create_server(lambda o=origin: _Conn(o),
                                                       "127.0.0.1", 0))
            origin.port = server.sockets[0].getsockname()[1]
            self.servers.append(server)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def stop(self) -> None:
        async def close() -> None:
            for server in self.servers:
                server.close()

        self._run(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@dataclass
class World:
    sidecar: Sidecar
    origins: dict[str, Origin]
    dead: str

    def url(self, listener: str, path: str) -> str:
        return self.sidecar.url(listener, path)

    def metric(self, name: str, cluster: str, **labels: str) -> float:
        return self.sidecar.metric(name, cluster=cluster, **labels)


@pytest.fixture(scope="module", params=LOOPS)
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    origins = {n: Origin(n, kills=n in ("K", "R")) for n in ("A", "B", "K", "H", "R")}
    servers = Origins(list(origins.values()))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused

    def cluster(name: str, endpoints: list[str], **extra: Any) -> dict[str, Any]:
        return {"name": name, "discovery": {"type": "static", "endpoints": endpoints},
                "load_balancer": "round_robin", "pool": {"min_idle": 0},
                "health_check": {"type": "none"}, **extra}

    config = {
        "listeners": [{"name": n, "protocol": "http", "cluster": n}
                      for n in ("refused", "killed", "nobudget")],
        "clusters": [
            # The dead endpoint stays in rotation: every round tries it.
            cluster("refused", [dead, origins["A"].key, origins["B"].key],
                    outlier_detection={"consecutive_failures": 1000}),
            cluster("killed", [origins["K"].key, origins["H"].key],
                    outlier_detection={"consecutive_failures": 1, "max_ejection_percent": 50,
                                       "base_ejection_time": "30s"}),
            cluster("nobudget", [origins["R"].key],
                    retry={"budget": {"ratio": 0, "min_per_second": 0}}),
        ],
        "drain": {"grace": "2s", "accept_period": "0s", "linger": "0s"},
    }
    try:
        sidecar = Sidecar(config, loop=request.param)
    except BaseException:
        servers.stop()
        raise
    try:
        yield World(sidecar, origins, dead)
    finally:
        sidecar.stop()
        servers.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as c:
        yield c


# --- failed before any byte left: any method --------------------------------------------------
def test_keyless_posts_avoid_an_endpoint_that_refuses_connections(
    world: World, client: httpx.Client
) -> None:
    a, b = world.origins["A"], world.origins["B"]

    def landed() -> list[bytes]:
        return sorted(s.body for s in a.seen + b.seen if s.method == b"POST")

    def refused_retries() -> float:
        return world.metric("sidecar_retries_total", "refused", reason="connect-failure")

    before = refused_retries()
    sent = [b"order=%d" % i for i in range(9)]
    for body in sent:
        r = client.post(world.url("refused", "/orders"), content=body)
        assert r.status_code == 200, (r.status_code, r.headers, r.text)
    assert landed() == sorted(sent)  # each exactly once, none lost
    assert refused_retries() > before  # some did go to the dead endpoint first

    # At once, from many app connections.
    concurrent = [b"burst=%d" % i for i in range(24)]

    def post(body: bytes) -> int:
        with httpx.Client(trust_env=False, timeout=TIMEOUT) as c:
            return c.post(world.url("refused", "/orders"), content=body).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(post, concurrent)) == [200] * len(concurrent)
    assert landed() == sorted(sent + concurrent)

    # Bodies that cannot be replayed once sent (chunked, and over max_body_bytes): nothing
    # of them was sent to the dead endpoint, so they go again, whole.
    before = refused_retries()
    big = [bytes([65 + i]) * BIG for i in range(3)]
    chunked = [b"chunk-%d-" % i + b"x" * 5000 for i in range(3)]
    for body in big:
        r = client.post(world.url("refused", "/upload"), content=body)
        assert r.status_code == 200, (r.status_code, r.text)
    for body in chunked:
        r = client.post(world.url("refused", "/upload"),
                        content=iter([body[:100], body[100:]]))
        assert r.status_code == 200, (r.status_code, r.text)
    uploads = sorted(s.body for s in a.paths(b"/upload") + b.paths(b"/upload"))
    assert uploads == sorted(big + chunked)
    assert refused_retries() > before


# --- failed mid-request: a reset, the endpoint's failure ----------------------------------------
def test_an_endpoint_dropping_a_request_midway_is_a_reset(
    world: World, client: httpx.Client
) -> None:
    k, h = world.origins["K"], world.origins["H"]
    for _ in range(4):  # both endpoints get a pooled connection, reused from now on
        assert client.get(world.url("killed", "/ok")).status_code == 200
    for _ in range(2):  # round robin: one of the two goes to K first
        r = client.get(world.url("killed", "/slow-kill"))
        assert r.status_code == 200 and r.text == "H", (r.status_code, r.text)
        if k.paths(b"/slow-kill"):
            break
    (dropped,) = k.paths(b"/slow-kill")  # tried once on K: not again as a "stale" connection
    assert dropped.reused  # on a reused connection: what used to be miscounted as stale
    assert world.metric("sidecar_retries_total", "killed", reason="reset") == 1
    assert world.metric("sidecar_retries_total", "killed", reason="stale") == 0
    # Counted as the endpoint's failure: with consecutive_failures 1, it is ejected.
    assert world.metric("sidecar_outlier_ejections_total", "killed") == 1
    eps = {ep["address"]: ep for ep in world.sidecar.clusters()["killed"]["endpoints"]}
    assert eps[k.key]["ejected"] and not eps[h.key]["ejected"]


def test_a_reset_is_budgeted_and_the_keepalive_race_is_free(
    world: World, client: httpx.Client
) -> None:
    """The cluster has no retry budget at all."""
    r_origin = world.origins["R"]
    assert client.get(world.url("nobudget", "/ok")).status_code == 200

    # The keep-alive race: the reused connection closes as the request lands. Free.
    r = client.get(world.url("nobudget", "/race"))
    assert r.status_code == 200, (r.status_code, r.text)
    assert [s.reused for s in r_origin.paths(b"/race")] == [True, False]
    assert world.metric("sidecar_retries_total", "nobudget", reason="stale") == 1
    assert world.metric("sidecar_retry_budget_exhausted_total", "nobudget") == 0

    # Dropped 300 ms in on a reused connection: a reset, which needs the budget there is not.
    assert client.get(world.url("nobudget", "/ok")).status_code == 200
    r = client.get(world.url("nobudget", "/slow-kill"))
    assert r.status_code == 502 and r.headers["x-sidecar-error"] == "upstream_reset"
    (dropped,) = r_origin.paths(b"/slow-kill")
    assert dropped.reused
    assert world.metric("sidecar_retry_budget_exhausted_total", "nobudget") == 1
    assert world.metric("sidecar_retries_total", "nobudget", reason="stale") == 1
