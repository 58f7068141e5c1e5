"""The sidecar's own shortage is nobody's fault (SPEC section 5, issue 13 bug 1).

A real sidecar process whose RLIMIT_NOFILE is lowered to 256 (with `prlimit(2)` on its PID, after
it started) is driven out of descriptors by 400 app connections held open. Requests on app
connections opened before that need new upstream sockets (the upstreams answer
`Connection: close`), cannot get one, and must be answered 503 `local_resources_exhausted`
(not 502 `connect_failed`, nor `circuit_open` or `no_healthy_endpoints` later on). Then the
descriptors are released, and the very next requests must succeed: the breaker, outlier
detection and health checks (every 100 ms: tcp on one loop, http through aiohttp on the other)
never counted the shortage against the upstreams. Both event loops; everything on 127.0.0.1;
every wait bounded.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from tests.harness import LOOPS, Sidecar, ThreadedServer

LIMIT = 256  # the sidecar's RLIMIT_NOFILE during the test
HOLDERS = 400  # app connections held open to exhaust it
REQUESTERS = 4  # app connections opened before the shortage, to send requests on
SHORT_REQUESTS = 24  # more than the breaker's minimum_requests, outlier's consecutive_failures
TIMEOUT = 10.0  # no socket operation waits longer
WAIT = 15.0  # no poll waits longer


def origin() -> web.Application:
    """An upstream that closes after every response: each request needs a new socket."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"Connection": "close"})

    async def healthz(request: web.Request) -> web.Response:  # a new socket per check too
        return web.Response(text="ok", headers={"Connection": "close"})

    app = web.Application()
    app.router.add_get("/", handle)
    app.router.add_get("/healthz", healthz)
    return app


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(cond: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {WAIT}s: {what}")


def get(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One GET on a keep-alive app connection: (status, headers, body)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: up\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed after {buf!r}"
        buf += data
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        data = sock.recv(65536)
        assert data, "connection closed mid-body"
        body += data
    return status, headers, body


@contextlib.contextmanager
def connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        yield socks
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize(("loop", "check"), list(zip(LOOPS, ("tcp", "http"), strict=True)))
def test_emfile_is_local_resources_exhausted_and_trips_nothing(loop: str, check: str) -> None:
    with ThreadedServer(origin()) as a, ThreadedServer(origin()) as b:
        config = {
            "listeners": [{
                "name": "app", "protocol": "http", "cluster": "up",
                # The held connections send nothing: they must outlive the test's short phase.
                "limits": {"header_timeout": "60s"},
            }],
            "clusters": [{
                "name": "up",
                "discovery": {"type": "static",
                              "endpoints": [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]},
                "load_balancer": "round_robin",
                "pool": {"min_idle": 0},
                "circuit_breaker": {"failure_rate_threshold": 0.5, "minimum_requests": 5,
                                    "window": "30s", "open_duration": "30s"},
                "outlier_detection": {"consecutive_failures": 2, "base_ejection_time": "30s",
                                      "max_ejection_percent": 100},
                "health_check": {"type": check, "interval": "100ms", "timeout": "100ms",
                                 "healthy_threshold": 1, "unhealthy_threshold": 1},
            }],
        }
        with Sidecar(config, loop=loop) as sc:
            port = sc.port("app")
            with connections(port, REQUESTERS) as requesters:
                for s in requesters:  # each is accepted and served before the shortage
                    assert get(s)[0] == 200
                _, hard = resource.prlimit(sc.pid, resource.RLIMIT_NOFILE)
                resource.prlimit(sc.pid, resource.RLIMIT_NOFILE, (LIMIT, hard))

                with connections(port, HOLDERS):
                    # The sidecar accepts until it has no descriptor left, then sheds the rest.
                    wait_until(lambda: open_fds(sc.pid) >= LIMIT - 1,
                               "the sidecar out of descriptors")
                    answers = [get(requesters[i % REQUESTERS]) for i in range(SHORT_REQUESTS)]
                    for status, headers, body in answers:
                        assert (status, headers.get("x-sidecar-error")) == (
                            503, "local_resources_exhausted"), (status, headers, body)
                        assert b'"error":"local_resources_exhausted"' in body
                        assert b'"cluster":"up"' in body
                    short_fds = open_fds(sc.pid)
                    time.sleep(0.5)  # health checks run (and fail to get a socket) meanwhile
                released = time.monotonic()

                # The holders are closed: as soon as the sidecar has closed its ends, service
                # is back at once (no circuit_open for open_duration, nobody ejected/unhealthy).
                wait_until(lambda: open_fds(sc.pid) < LIMIT - HOLDERS // 4,
                           "the sidecar's descriptors freed")
                for i in range(20):
                    status, headers, body = get(requesters[i % REQUESTERS])
                    assert status == 200 and body == b"ok", (i, status, headers, body)
                    if i == 0:
                        recovered = time.monotonic() - released
                print(f"\n[{loop}/{check}] descriptors at the shortage: {short_fds}; first 200 "
                      f"{recovered * 1000:.0f} ms after the holders closed")

            assert sc.metric("sidecar_downstream_connections_shed_total") > 0  # it was short
            assert sc.metric("sidecar_local_errors_total", cluster="up",
                             code="local_resources_exhausted") == SHORT_REQUESTS
            assert sc.metric("sidecar_local_errors_total", cluster="up",
                             code="connect_failed") == 0
            assert sc.metric("sidecar_circuit_breaker_transitions_total", cluster="up") == 0
            assert sc.metric("sidecar_circuit_breaker_state", cluster="up") == 0
            assert sc.metric("sidecar_outlier_ejections_total", cluster="up") == 0
            assert sc.metric("sidecar_health_checks_total", cluster="up", result="failure") == 0
            cluster = sc.clusters()["up"]
            assert cluster["breaker"] == "closed"
            assert all(ep["healthy"] and not ep["ejected"] for ep in cluster["endpoints"])
