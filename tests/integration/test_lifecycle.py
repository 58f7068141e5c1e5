"""SPEC section 6 against a real sidecar process: start-up readiness, the drain (SIGTERM,
`sidecar drain`, `POST /drain`), SO_LINGER aborts at `grace`, and config hot reload.

Everything runs on 127.0.0.1: real aiohttp upstreams in threads, real app clients
(http.client, raw sockets, requests.Session), the real CLI as a subprocess. Every wait is
bounded; processes are stopped by PID (the harness does it). The drain figures each test
measures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from aiohttp import web

from tests.harness import LOOPS, Sidecar, SilentListener, ThreadedServer, free_port, http_get

BOUND = 15.0  # no single wait in this file is longer


def wait_for(predicate: Callable[[], bool], within: float = BOUND, what: str = "") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")


def logs_of(sc: Sidecar) -> str:
    """The sidecar's log, also after `stop()` (which closes the harness's handle)."""
    return sc.log_path.read_text(errors="replace")


def figures(test: str, **values: Any) -> None:
    print(f"\nDRAIN FIGURES {test}: {json.dumps(values, sort_keys=True)}")


# --- a real upstream ------------------------------------------------------------------------------


class Upstream:
    """An aiohttp server in a thread: `GET /any?d=SECONDS` sleeps, then answers 200. It counts
    what it sees: requests in flight, peers (the sidecar's ephemeral ports), `Connection: close`
    headers (the sidecar must never add one to the app's requests during a drain)."""

    def __init__(self, name: str = "up") -> None:
        self.name = name
        self.active = 0
        self.served = 0
        self.peer_ports: list[int] = []
        self.connection_close = 0
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = ThreadedServer(app)
        self.port = self.server.port

    async def _handle(self, request: web.Request) -> web.Response:
        delay = float(request.query.get("d", "0"))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer is not None:
            self.peer_ports.append(int(peer[1]))
        if request.headers.get("Connection", "").lower() == "close":
            self.connection_close += 1
        self.active += 1
        try:
            await asyncio.sleep(delay)
        finally:
            self.active -= 1
        self.served += 1
        return web.Response(text=f"{self.name} {request.path_qs}")

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> Upstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cluster(name: str, port: int, min_idle: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{port}"]},
        "health_check": {"type": "none"},
        "pool": {"min_idle": min_idle},
        "retry": {"attempts": 1, "per_try_timeout": "60s"},
        "timeouts": {"request": "60s"},
    }


def config(port: int, min_idle: int = 0, **drain: Any) -> dict[str, Any]:
    """One HTTP listener `egress` fixed to one cluster `up` at 127.0.0.1:port."""
    return {
        "listeners": [{"name": "egress", "protocol": "http", "cluster": "up"}],
        "clusters": [cluster("up", port, min_idle)],
        "drain": drain,
    }


# --- app-side clients -----------------------------------------------------------------------------


def fetch(
    port: int, path: str, host: str = "up", timeout: float = BOUND
) -> tuple[int, dict[str, str], bytes]:
    """One request on a new app connection, closed afterwards (like a short-lived client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class RawConn:
    """A keep-alive app connection on a plain socket, so that a test knows it is the same TCP
    connection before and after an event (http.client would silently reconnect)."""

    def __init__(self, port: int, timeout: float = BOUND) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.local_port = self.sock.getsockname()[1]
        self._buf = b""

    def send(self, path: str, host: str = "up") -> None:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the sidecar")
            self._buf += chunk
        head, self._buf = self._buf.split(marker, 1)
        return head

    def response(self) -> tuple[int, dict[str, str], bytes]:
        head = self._read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(self._buf) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            self._buf += chunk
        body, self._buf = self._buf[:length], self._buf[length:]
        return status, headers, body

    def get(self, path: str, host: str = "up") -> tuple[int, dict[str, str], bytes]:
        self.send(path, host)
        return self.response()

    def close(self) -> None:
        self.sock.close()


def readyz(base: str) -> int:
    try:
        return http_get(f"{base}/readyz", timeout=2.0)[0]
    except OSError:
        return -1


def drain_status(sc: Sidecar) -> dict[str, Any]:
    status, body = http_get(f"{sc.admin}/drain", timeout=2.0)
    assert status == 200, body
    return dict(json.loads(body))


def time_wait_pairs() -> set[frozenset[int]]:
    """The port pairs of every loopback TCP connection in TIME-WAIT, from `ss` (either end:
    `ss` lists the half that is in TIME-WAIT, whichever side it is)."""
    out = subprocess.run(
        ["ss", "-tanH", "state", "time-wait"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    pairs = set()
    for line in out.splitlines():
        local, peer = line.split()[2:4]
        if local.startswith("127.0.0.1:") and peer.startswith("127.0.0.1:"):
            pairs.add(frozenset(int(a.rsplit(":", 1)[1]) for a in (local, peer)))
    return pairs


@contextlib.contextmanager
def executor(workers: int) -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- start ----------------------------------------------------------------------------------------


# Holds prewarmed pool connections, which send nothing (tests/harness.py).
CountingListener = SilentListener


@pytest.mark.parametrize("loop", LOOPS)
def test_ready_only_once_min_idle_connections_are_prewarmed(loop: str) -> None:
    port = free_port()  # nothing listens there yet: the pool cannot prewarm
    sc = Sidecar(config(port, min_idle=2), loop=loop, wait_ready=False)
    listener: CountingListener | None = None
    try:
        wait_for(lambda: readyz(sc.admin) != -1, what="admin port up")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # listeners bound, but the pool is cold: not ready
            assert readyz(sc.admin) == 503
            assert readyz(sc.status) == 503
            time.sleep(0.05)
        status, body = http_get(f"{sc.status}/readyz")
        assert json.loads(body)["reason"] == "starting"
        listener = CountingListener(port)
        t0 = time.monotonic()
        wait_for(lambda: readyz(sc.status) == 200, within=4.0, what="ready after prewarm")
        ready_after = time.monotonic() - t0
        # At the first 200, both prewarmed connections exist on both ends.
        (ep,) = sc.clusters()["up"]["endpoints"]
        assert ep["idle"] == 2, ep
        assert len(listener.accepted) >= 2
        assert readyz(sc.admin) == 200
        figures(
            "readiness",
            ready_after_upstream_s=round(ready_after, 3),
            upstream_accepted=len(listener.accepted),
        )
    finally:
        sc.stop()
        if listener is not None:
            listener.close()


@pytest.mark.slow
def test_ready_anyway_after_the_bounded_prewarm_wait() -> None:
    port = free_port()  # never listens
    sc = Sidecar(config(port, min_idle=2), wait_ready=False)
    try:
        t0 = time.monotonic()
        wait_for(lambda: readyz(sc.status) == 200, within=10.0, what="ready anyway")
        assert 4.0 <= time.monotonic() - t0 <= 8.0
        assert "ready without full prewarm" in logs_of(sc)
    finally:
        sc.stop()


@pytest.mark.parametrize("linger", ["500ms", "2s"])
def test_idle_upstream_connections_close_gracefully_at_drain(linger: str) -> None:
    """Idle pooled connections are closed at the start of a drain with a FIN (SO_LINGER on,
    `linger` seconds), never a RST; a sub-second linger must not turn into SO_LINGER 0."""
    port = free_port()
    listener = CountingListener(port)
    try:
        sc = Sidecar(config(port, min_idle=2, linger=linger, accept_period="200ms"))
        try:
            assert sc.clusters()["up"]["endpoints"][0]["idle"] == 2
            status, _ = http_get(f"{sc.admin}/drain?exit=false", method="POST")
            assert status == 200
            ends = []
            for conn in listener.accepted[:2]:
                conn.settimeout(5)
                try:
                    ends.append(conn.recv(10))
                except ConnectionResetError:
                    ends.append("RST")
            assert ends == [b"", b""], ends
            assert sc.clusters()["up"]["endpoints"][0]["idle"] == 0
        finally:
            sc.stop()
    finally:
        listener.close()


def test_sigterm_while_starting_exits_0() -> None:
    port = free_port()  # never listens: the sidecar stays "starting" for the prewarm wait
    sc = Sidecar(config(port, min_idle=2, grace="5s", accept_period="200ms"), wait_ready=False)
    try:
        wait_for(lambda: readyz(sc.admin) == 503, what="admin up, not ready")
        t0 = time.monotonic()
        sc.signal(signal.SIGTERM)
        rc = sc.wait(BOUND)
        exit_s = time.monotonic() - t0
    finally:
        sc.stop()
    assert rc == 0 and exit_s < 3.0, (rc, exit_s)


# --- drain on SIGTERM -----------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_sigterm_drains_20_in_flight_requests(loop: str) -> None:
    grace = 10.0
    with Upstream() as up, executor(22) as pool:
        sc = Sidecar(config(up.port, grace="10s", accept_period="1500ms"), loop=loop)
        try:
            port = sc.port("egress")
            assert readyz(sc.status) == 200
            futures = [pool.submit(fetch, port, f"/slow?d=1&i={i}") for i in range(20)]
            wait_for(lambda: up.active == 20, what="20 requests in flight upstream")
            t0 = time.monotonic()
            sc.signal(signal.SIGTERM)
            wait_for(lambda: readyz(sc.status) == 503, within=2.0, what="status readyz 503")
            assert readyz(sc.admin) == 503
            st = drain_status(sc)
            assert st["state"] == "draining" and st["inflight"] == 20, st
            assert up.active == 20  # still in flight: readiness turned 503 during the drain
            # A request from the app inside accept_period is served.
            late = pool.submit(fetch, port, "/slow?d=0.2&late=1")
            results = [f.result(BOUND) for f in futures]
            late_result = late.result(BOUND)
            rc = sc.wait(grace + 5)
            exit_s = time.monotonic() - t0
        finally:
            sc.stop()
    assert [r[0] for r in results] == [200] * 20, results
    assert late_result[0] == 200, late_result
    assert all(r[1].get("connection", "").lower() != "close" for r in [*results, late_result])
    assert rc == 0, logs_of(sc)
    assert exit_s < grace, exit_s
    assert up.connection_close == 0
    figures(
        f"sigterm[{loop}]",
        in_flight=20,
        failures=0,
        late_served=1,
        exit_after_sigterm_s=round(exit_s, 3),
        grace_s=grace,
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_after_accept_period_new_requests_get_503_draining(loop: str) -> None:
    with Upstream() as up, executor(8) as pool:
        sc = Sidecar(
            config(up.port, grace="10s", accept_period="1s", exit_on_zero_connections=False),
            loop=loop,
        )
        try:
            port = sc.port("egress")
            futures = [pool.submit(fetch, port, f"/slow?d=3&i={i}") for i in range(5)]
            wait_for(lambda: up.active == 5, what="5 in flight")
            t0 = time.monotonic()
            sc.signal(signal.SIGTERM)
            wait_for(lambda: drain_status(sc)["state"] == "draining", within=2.0)
            inside = fetch(port, "/fast")
            assert time.monotonic() - t0 < 1.0
            time.sleep(max(0.0, t0 + 1.5 - time.monotonic()))
            refused = fetch(port, "/fast")
            results = [f.result(BOUND) for f in futures]
            rc = sc.wait(BOUND)
            exit_s = time.monotonic() - t0
        finally:
            sc.stop()
    assert inside[0] == 200, inside
    status, headers, body = refused
    assert status == 503, refused
    assert headers["x-sidecar-error"] == "draining"
    assert json.loads(body)["error"] == "draining"
    assert [r[0] for r in results] == [200] * 5
    assert rc == 0
    figures(
        f"accept_period[{loop}]",
        in_flight=5,
        failures=0,
        refused_after_accept_period=1,
        exit_after_sigterm_s=round(exit_s, 3),
    )


# --- drain through the preStop hook ---------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_sidecar_drain_cli_drains_and_returns_0(loop: str) -> None:
    with Upstream() as up, executor(22) as pool:
        sc = Sidecar(config(up.port, grace="10s", accept_period="1s"), loop=loop)
        try:
            port = sc.port("egress")
            futures = [pool.submit(fetch, port, f"/slow?d=1&i={i}") for i in range(20)]
            wait_for(lambda: up.active == 20, what="20 in flight")
            t0 = time.monotonic()
            cli = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "drain", "--admin", sc.admin, "--timeout", "10"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_for(lambda: readyz(sc.status) == 503, within=3.0, what="readyz 503")
                late = pool.submit(fetch, port, "/slow?d=0.1&late=1")
                out, err = cli.communicate(timeout=BOUND)
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.wait(5)
            cli_s = time.monotonic() - t0
            results = [f.result(BOUND) for f in futures]
            rc = sc.wait(BOUND)
            exit_s = time.monotonic() - t0
        finally:
            sc.stop()
    assert cli.returncode == 0, (out, err)
    progress = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert progress and progress[0]["state"] == "draining", out
    assert any(p["inflight"] > 0 for p in progress), out
    assert [r[0] for r in results] == [200] * 20
    assert late.result(1)[0] == 200
    assert rc == 0
    assert up.connection_close == 0
    figures(
        f"cli[{loop}]",
        in_flight=20,
        failures=0,
        cli_returned_s=round(cli_s, 3),
        exit_s=round(exit_s, 3),
        progress_lines=len(progress),
    )


def test_sidecar_drain_cli_times_out_with_1() -> None:
    with Upstream() as up, executor(2) as pool:
        sc = Sidecar(config(up.port, grace="10s", accept_period="200ms"))
        try:
            future = pool.submit(fetch, sc.port("egress"), "/slow?d=4")
            wait_for(lambda: up.active == 1, what="1 in flight")
            cli = subprocess.run(
                [sys.executable, "-m", "sidecar", "drain", "--admin", sc.admin, "--timeout", "1"],
                capture_output=True,
                text=True,
                timeout=BOUND,
            )
            assert future.result(BOUND)[0] == 200
            assert sc.wait(BOUND) == 0
        finally:
            sc.stop()
    assert cli.returncode == 1, cli
    assert "not drained within 1s" in cli.stderr
    unreachable = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "drain",
            "--admin",
            f"http://127.0.0.1:{free_port()}",
            "--timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=BOUND,
    )
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_sidecar_drain_cli_waits_for_a_sidecar_whose_grace_ends_just_after_its_timeout() -> None:
    """The chart's preStop gives `--timeout` T-5 s and `grace: auto` gives the sidecar T-5 s
    from a moment later: the hook must not fail while the sidecar is about to finish."""
    with Upstream() as up, executor(2) as pool:
        sc = Sidecar(config(up.port, grace="2s", accept_period="200ms"))
        try:
            future = pool.submit(fetch, sc.port("egress"), "/slow?d=30")
            wait_for(lambda: up.active == 1, what="1 in flight")
            t0 = time.monotonic()
            cli = subprocess.run(
                [sys.executable, "-m", "sidecar", "drain", "--admin", sc.admin, "--timeout", "1.5"],
                capture_output=True,
                text=True,
                timeout=BOUND,
            )
            cli_s = time.monotonic() - t0
            with contextlib.suppress(Exception):
                future.result(BOUND)  # aborted at grace
            assert sc.wait(BOUND) == 0
        finally:
            sc.stop()
    assert cli.returncode == 0, cli
    assert 1.5 <= cli_s <= 5.0, cli_s


def test_sidecar_drain_cli_ends_an_exit_false_drain() -> None:
    with Upstream() as up:
        sc = Sidecar(config(up.port, grace="5s", accept_period="200ms"))
        try:
            status, body = http_get(f"{sc.admin}/drain?exit=false&wait=true", method="POST")
            assert status == 200 and json.loads(body)["state"] == "drained"
            time.sleep(0.5)
            assert sc.proc.poll() is None
            cli = subprocess.run(
                [sys.executable, "-m", "sidecar", "drain", "--admin", sc.admin, "--timeout", "5"],
                capture_output=True,
                text=True,
                timeout=BOUND,
            )
            rc = sc.wait(5)
        finally:
            sc.stop()
    assert cli.returncode == 0, cli
    assert rc == 0


# --- grace: aborts with SO_LINGER 0 ---------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_requests_busy_at_grace_are_aborted_with_rst(loop: str) -> None:
    busy = 3
    with Upstream() as up:
        sc = Sidecar(config(up.port, grace="2s", accept_period="500ms", linger="1s"), loop=loop)
        conns: list[RawConn] = []
        try:
            port = sc.port("egress")
            assert sc.metric("sidecar_drain_aborted_connections_total") == 0
            for i in range(busy):
                conn = RawConn(port)
                conn.send(f"/slow?d=30&i={i}")
                conns.append(conn)
            wait_for(lambda: up.active == busy, what="requests in flight")
            upstream_ports = set(up.peer_ports)
            t0 = time.monotonic()
            status, body = http_get(f"{sc.admin}/drain?exit=false", method="POST")
            assert status == 200 and json.loads(body)["state"] == "draining", body
            wait_for(lambda: drain_status(sc)["state"] == "drained", within=5.0)
            drained_s = time.monotonic() - t0
            resets = 0
            for conn in conns:
                conn.sock.settimeout(5)
                try:
                    data = conn.sock.recv(100)
                except ConnectionResetError:
                    resets += 1
                else:
                    assert data == b"", data  # never a response: the upstream never answered
            aborted = sc.metric("sidecar_drain_aborted_connections_total")
            st = drain_status(sc)
            time.sleep(0.2)
            aborted_pairs = {frozenset((c.local_port, port)) for c in conns}
            aborted_pairs |= {frozenset((p, up.port)) for p in upstream_ports}
            lingering = time_wait_pairs() & aborted_pairs
            logs = logs_of(sc)
            assert sc.proc.poll() is None  # exit=false: still up
            sc.signal(signal.SIGTERM)  # a signal after an exit=false drain ends the process
            rc = sc.wait(5)
        finally:
            for conn in conns:
                conn.close()
            sc.stop()
    assert 1.8 <= drained_s <= 5.0, drained_s
    assert resets == busy, "the app's connections are reset (RST), not closed"
    # Each busy socket is counted: the app's connection and the upstream one, per request.
    assert aborted == 2 * busy, aborted
    assert st["aborted"] == 2 * busy and st["inflight"] == 0, st
    assert logs.count("aborting app connection at grace") == busy
    assert not lingering, f"TIME_WAIT left on aborted sockets' ports {lingering}"
    assert rc == 0
    figures(
        f"grace_abort[{loop}]",
        in_flight=busy,
        aborted_sockets=int(aborted),
        drained_at_s=round(drained_s, 3),
        time_wait_left=len(lingering),
    )


def test_sigterm_exits_0_at_grace_with_work_still_running() -> None:
    with Upstream() as up, executor(3) as pool:
        sc = Sidecar(config(up.port, grace="2s", accept_period="500ms"))
        try:
            futures = [pool.submit(fetch, sc.port("egress"), "/slow?d=30") for _ in range(2)]
            wait_for(lambda: up.active == 2, what="2 in flight")
            t0 = time.monotonic()
            sc.signal(signal.SIGTERM)
            rc = sc.wait(BOUND)
            exit_s = time.monotonic() - t0
            errors = []
            for f in futures:
                with contextlib.suppress(Exception):
                    f.result(BOUND)
                errors.append(f.exception(0))
        finally:
            sc.stop()
    assert rc == 0
    assert 1.8 <= exit_s <= 6.0, exit_s
    assert all(isinstance(e, (ConnectionError, http.client.HTTPException)) for e in errors)
    assert "drain grace passed" in logs_of(sc)
    figures("grace_sigterm", in_flight=2, exit_after_sigterm_s=round(exit_s, 3))


@pytest.mark.parametrize("loop", LOOPS)
def test_second_sigterm_aborts_at_once(loop: str) -> None:
    with Upstream() as up:
        sc = Sidecar(config(up.port, grace="20s", accept_period="1s"), loop=loop)
        conns: list[RawConn] = []
        try:
            for _ in range(2):
                conn = RawConn(sc.port("egress"))
                conn.send("/slow?d=30")
                conns.append(conn)
            wait_for(lambda: up.active == 2, what="2 in flight")
            sc.signal(signal.SIGTERM)
            wait_for(lambda: drain_status(sc)["state"] == "draining", within=2.0)
            t0 = time.monotonic()
            sc.signal(signal.SIGTERM)
            rc = sc.wait(BOUND)
            exit_s = time.monotonic() - t0
            resets = 0
            for conn in conns:
                conn.sock.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert conn.sock.recv(100) == b""
                    continue
                resets += 1
        finally:
            for conn in conns:
                conn.close()
            sc.stop()
    assert rc == 0
    assert exit_s < 3.0, exit_s
    assert resets == 2
    assert "second signal" in logs_of(sc)
    figures(f"second_sigterm[{loop}]", in_flight=2, exit_after_second_signal_s=round(exit_s, 3))


class EchoServer:
    """A raw TCP echo upstream (threads), for `protocol: tcp` listeners."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.peer_ports: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peer_ports.append(peer[1])
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.sock.close()


def tcp_config(port: int, **drain: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "redis", "protocol": "tcp", "cluster": "up"}],
        "clusters": [cluster("up", port)],
        "drain": drain,
    }


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("loop", LOOPS)
def test_tcp_tunnels_keep_working_through_a_drain_and_are_reset_at_grace(loop: str) -> None:
    server = EchoServer()
    try:
        sc = Sidecar(tcp_config(server.port, grace="2s", accept_period="300ms"), loop=loop)
        try:
            app = socket.create_connection(("127.0.0.1", sc.port("redis")), timeout=5)
            assert echo(app, b"PING\r\n") == b"PING\r\n"
            t0 = time.monotonic()
            status, _ = http_get(f"{sc.admin}/drain?exit=false", method="POST")
            assert status == 200
            time.sleep(1.0)  # past accept_period: an established tunnel keeps working
            assert drain_status(sc)["state"] == "draining"
            assert echo(app, b"GET k\r\n") == b"GET k\r\n"
            wait_for(lambda: drain_status(sc)["state"] == "drained", within=5.0)
            drained_s = time.monotonic() - t0
            try:
                app.recv(10)
                reset = False  # EOF or data: not a reset
            except ConnectionResetError:
                reset = True
            aborted = sc.metric("sidecar_drain_aborted_connections_total")
            pairs = {frozenset((app.getsockname()[1], sc.port("redis")))}
            pairs |= {frozenset((p, server.port)) for p in server.peer_ports}
            time.sleep(0.2)
            lingering = time_wait_pairs() & pairs
            app.close()
        finally:
            sc.stop()
    finally:
        server.close()
    assert reset, "the tunnel's app end is reset at grace"
    assert aborted == 2, aborted  # the app's socket and the upstream socket
    assert 1.8 <= drained_s <= 5.0, drained_s
    assert not lingering, lingering
    figures(
        f"tcp_grace[{loop}]",
        tunnels=1,
        aborted_sockets=int(aborted),
        drained_at_s=round(drained_s, 3),
        time_wait_left=len(lingering),
    )


def test_tcp_tunnel_closed_by_the_app_lets_the_sidecar_exit_early() -> None:
    server = EchoServer()
    try:
        sc = Sidecar(tcp_config(server.port, grace="10s", accept_period="300ms"))
        try:
            app = socket.create_connection(("127.0.0.1", sc.port("redis")), timeout=5)
            assert echo(app, b"PING\r\n") == b"PING\r\n"
            t0 = time.monotonic()
            sc.signal(signal.SIGTERM)
            time.sleep(0.8)
            assert sc.proc.poll() is None  # the app still holds its tunnel
            assert echo(app, b"PING\r\n") == b"PING\r\n"
            app.close()
            rc = sc.wait(5)
            exit_s = time.monotonic() - t0
        finally:
            sc.stop()
    finally:
        server.close()
    assert rc == 0 and exit_s < 3.0, exit_s


# --- POST /drain?exit=false -----------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_post_drain_exit_false_stays_up_drained(loop: str) -> None:
    with Upstream() as up:
        sc = Sidecar(config(up.port, grace="5s", accept_period="500ms"), loop=loop)
        try:
            assert fetch(sc.port("egress"), "/before")[0] == 200
            before = drain_status(sc)
            assert before["state"] == "serving" and before["elapsed"] == 0
            t0 = time.monotonic()
            status, body = http_get(
                f"{sc.admin}/drain?exit=false&wait=true", method="POST", timeout=BOUND
            )
            waited = time.monotonic() - t0
            assert status == 200
            st = json.loads(body)
            assert st["state"] == "drained", st
            assert {"state", "inflight", "connections", "elapsed"} <= set(st)
            assert st["inflight"] == 0 and st["connections"] == 0
            time.sleep(1.0)
            later = drain_status(sc)
            assert later["state"] == "drained" and later["elapsed"] > st["elapsed"]
            assert sc.proc.poll() is None, "exit=false: the process stays up"
            assert readyz(sc.status) == 503 and readyz(sc.admin) == 503
            assert sc.metric("sidecar_drain_state") == 2
            refused = fetch(sc.port("egress"), "/after")
            assert refused[0] == 503 and refused[1]["x-sidecar-error"] == "draining"
            # Idempotent: another POST changes nothing.
            status, body = http_get(f"{sc.admin}/drain?exit=false", method="POST")
            assert status == 200 and json.loads(body)["state"] == "drained"
            assert sc.proc.poll() is None
            sc.signal(signal.SIGTERM)
            assert sc.wait(5) == 0
        finally:
            sc.stop()
    assert 0.4 <= waited < 3.0, waited


# --- steady load through a drain ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
def test_steady_load_through_a_drain_loses_nothing(loop: str) -> None:
    accept = 1.0
    more_after_signal = 120
    with Upstream() as up:
        sc = Sidecar(config(up.port, grace="15s", accept_period="1s"), loop=loop)
        try:
            url = sc.url("egress", "/steady?d=0.02")
            signalled = threading.Event()
            state: dict[str, Any] = {"ok": 0, "failed": [], "after_signal": 0, "last_at": 0.0}
            closed_at: list[float] = []

            def app() -> None:
                session = requests.Session()
                session.trust_env = False  # talk to the sidecar, not to an HTTP_PROXY
                try:
                    for _ in range(3000):  # bounded
                        try:
                            r = session.get(url, timeout=5)
                            if r.status_code == 200:
                                state["ok"] += 1
                                if r.headers.get("Connection", "").lower() == "close":
                                    state["failed"].append("Connection: close from the sidecar")
                            else:
                                state["failed"].append((r.status_code, r.text[:200]))
                        except requests.RequestException as exc:
                            state["failed"].append(repr(exc))
                        if signalled.is_set():
                            state["after_signal"] += 1
                            state["last_at"] = time.monotonic()
                            if state["after_signal"] >= more_after_signal:
                                break  # the app's own shutdown: stop, close its pool
                finally:
                    session.close()
                    closed_at.append(time.monotonic())

            thread = threading.Thread(target=app, daemon=True)
            thread.start()
            wait_for(lambda: state["ok"] >= 30, what="steady load")
            t0 = time.monotonic()
            sc.signal(signal.SIGTERM)
            signalled.set()
            thread.join(BOUND * 2)
            assert not thread.is_alive()
            rc = sc.wait(BOUND)
            exited = time.monotonic()
        finally:
            sc.stop()
    assert state["failed"] == [], state["failed"][:5]
    assert state["after_signal"] == more_after_signal
    assert state["last_at"] - t0 > accept, "the app kept calling out after accept_period"
    assert rc == 0
    exit_after_app_closed = exited - closed_at[0]
    assert exit_after_app_closed < 3.0, exit_after_app_closed
    assert up.connection_close == 0
    figures(
        f"steady[{loop}]",
        requests=state["ok"],
        failures=0,
        after_sigterm=state["after_signal"],
        app_busy_after_sigterm_s=round(state["last_at"] - t0, 3),
        exit_after_app_closed_s=round(exit_after_app_closed, 3),
    )


# --- config hot reload ----------------------------------------------------------------------------


def routed_config(routes: dict[str, Upstream]) -> dict[str, Any]:
    """A Host-routed listener: host `<name>.test` -> cluster `<name>`."""
    return {
        "listeners": [
            {
                "name": "egress",
                "protocol": "http",
                "routes": [{"match": {"host": f"{n}.test"}, "cluster": n} for n in routes],
            }
        ],
        "clusters": [cluster(n, u.port) for n, u in routes.items()],
    }


def with_ports(sc: Sidecar, new: dict[str, Any]) -> dict[str, Any]:
    """`new`, keeping the running sidecar's admin/status/listener addresses."""
    out = dict(new)
    for key in ("admin", "status", "access_log"):
        out[key] = sc.config[key]
    for listener in out["listeners"]:
        listener["address"] = f"127.0.0.1:{sc.port(listener['name'])}"
    return out


class ConfigMapSidecar(Sidecar):
    """The config file as a Kubernetes ConfigMap volume lays it out: `config.yaml` ->
    `..data/config.yaml`, `..data` -> `..<timestamp>/`; an update writes a new timestamped
    directory and swaps the `..data` symlink atomically (rename over it)."""

    def write_config(self, config: dict[str, Any]) -> None:
        root = self.config_path.parent
        generation = root / f"..{time.time_ns()}"
        generation.mkdir()
        (generation / "config.yaml").write_text(yaml.safe_dump(config))
        tmp = root / "..data_tmp"
        os.symlink(generation.name, tmp)
        old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
        os.replace(tmp, root / "..data")
        if not self.config_path.is_symlink():
            os.symlink("..data/config.yaml", self.config_path)
        if old is not None:
            (root / old / "config.yaml").unlink()
            (root / old).rmdir()


@pytest.mark.parametrize("kind", ["rename", "configmap-symlink"])
@pytest.mark.parametrize("loop", LOOPS)
def test_reload_adds_a_route_while_open_connections_keep_working(loop: str, kind: str) -> None:
    factory = Sidecar if kind == "rename" else ConfigMapSidecar
    with Upstream("a") as a, Upstream("b") as b:
        sc = factory(routed_config({"a": a}), loop=loop)
        app_conn: RawConn | None = None
        try:
            port = sc.port("egress")
            app_conn = RawConn(port)  # opened before the reload, used after it
            assert app_conn.get("/1", "a.test")[0] == 200
            status, headers, _ = fetch(port, "/", "b.test")
            assert status == 404 and headers["x-sidecar-error"] == "no_route"
            t0 = time.monotonic()
            sc.write_config(with_ports(sc, routed_config({"a": a, "b": b})))
            wait_for(lambda: fetch(port, "/", "b.test")[0] == 200, within=5.0, what="the new route")
            applied_s = time.monotonic() - t0
            assert app_conn.get("/2", "a.test")[:1] == (200,)
            status, _, body = app_conn.get("/3", "b.test")
            assert (status, body) == (200, b"b /3")
            assert sc.metric("sidecar_config_reloads_total", result="success") == 1
            assert sc.metric("sidecar_config_reloads_total", result="rejected") == 0
            same_app_conn = app_conn.local_port
        finally:
            if app_conn is not None:
                app_conn.close()
            sc.stop()
    # The unchanged cluster kept its pool: one upstream connection carried all of a's requests.
    assert len(set(a.peer_ports)) == 1, a.peer_ports
    figures(
        f"reload[{loop},{kind}]",
        applied_within_s=round(applied_s, 3),
        app_connection_port=same_app_conn,
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_reload_moving_a_cluster_lets_its_requests_in_flight_finish(loop: str) -> None:
    with Upstream("a") as a, Upstream("a2") as a2, executor(2) as pool:
        sc = Sidecar(routed_config({"a": a}), loop=loop)
        try:
            port = sc.port("egress")
            slow = pool.submit(fetch, port, "/slow?d=2", "a.test")
            wait_for(lambda: a.active == 1, what="a request in flight on the old endpoint")
            moved = with_ports(sc, routed_config({"a": a}))
            moved["clusters"][0]["discovery"]["endpoints"] = [f"127.0.0.1:{a2.port}"]
            sc.write_config(moved)
            wait_for(
                lambda: fetch(port, "/", "a.test")[2].startswith(b"a2 "),
                within=5.0,
                what="new requests on the new endpoint",
            )
            assert a.active == 1  # the old pool still carries the request in flight
            status, _, body = slow.result(BOUND)
        finally:
            sc.stop()
    assert (status, body) == (200, b"a /slow?d=2")


@pytest.mark.parametrize("loop", LOOPS)
def test_invalid_config_is_rejected_and_changes_nothing(loop: str) -> None:
    with Upstream("a") as a, Upstream("b") as b:
        sc = Sidecar(routed_config({"a": a}), loop=loop)
        try:
            port = sc.port("egress")
            config_before = http_get(f"{sc.admin}/config")[1]
            bad = with_ports(sc, routed_config({"a": a, "b": b}))
            bad["clusters"][1]["pool"]["min_idel"] = 1  # a typo: unknown keys are errors
            tmp = sc.config_path.with_suffix(".bad")
            tmp.write_text(yaml.safe_dump(bad))
            os.replace(tmp, sc.config_path)
            wait_for(
                lambda: sc.metric("sidecar_config_reloads_total", result="rejected") == 1,
                within=5.0,
                what="the watcher rejects the file",
            )
            assert "config reload rejected" in logs_of(sc)
            assert "min_idel" in logs_of(sc)
            assert http_get(f"{sc.admin}/config")[1] == config_before
            assert fetch(port, "/", "a.test")[0] == 200
            assert fetch(port, "/", "b.test")[0] == 404
            status, body = http_get(f"{sc.admin}/reload", method="POST")
            assert status == 400 and json.loads(body)["applied"] is False
            assert "min_idel" in json.loads(body)["message"]
            assert sc.metric("sidecar_config_reloads_total", result="rejected") == 2
            assert sc.metric("sidecar_config_reloads_total", result="success") == 0
            sc.write_config(with_ports(sc, routed_config({"a": a, "b": b})))
            status, body = http_get(f"{sc.admin}/reload", method="POST")
            assert status == 200 and json.loads(body) == {"applied": True, "message": "applied"}
            assert fetch(port, "/", "b.test")[0] == 200
            assert sc.metric("sidecar_config_reloads_total", result="success") >= 1
        finally:
            sc.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reload_that_cannot_be_applied_leaves_nothing_behind(loop: str, tmp_path: Path) -> None:
    """Valid YAML whose TLS file does not load fails while clusters are being built: the
    clusters built before the failure must not keep running (here: health-checking)."""
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    with Upstream("a") as a, Upstream("b") as b, Upstream("c") as c:
        sc = Sidecar(routed_config({"a": a}), loop=loop)
        try:
            port = sc.port("egress")
            new = with_ports(sc, routed_config({"a": a, "b": b, "c": c}))
            new["clusters"][1]["health_check"] = {
                "type": "http",
                "path": "/healthz",
                "interval": "100ms",
            }
            new["clusters"][2]["tls"] = {"enabled": True, "ca_file": str(bad_ca)}
            tmp = sc.config_path.with_suffix(".new")
            tmp.write_text(yaml.safe_dump(new))
            os.replace(tmp, sc.config_path)
            wait_for(
                lambda: sc.metric("sidecar_config_reloads_total", result="rejected") == 1,
                within=5.0,
                what="the reload is rejected",
            )
            assert "could not be applied" in logs_of(sc)
            time.sleep(1.0)
            assert b.served == 0, "a cluster of the rejected config is health-checking"
            assert fetch(port, "/", "a.test")[0] == 200
            assert fetch(port, "/", "b.test")[0] == 404
            assert set(sc.clusters()) == {"a"}
        finally:
            sc.stop()


# --- drain.grace: auto ----------------------------------------------------------------------------


def test_grace_auto_outside_kubernetes_falls_back_and_says_so() -> None:
    # Outside a pod whatever this machine's environment says: empty means unset (podinfo.py).
    outside = {"POD_NAME": "", "KUBERNETES_SERVICE_HOST": "", "KUBECONFIG": ""}
    with Upstream() as up:
        sc = Sidecar(config(up.port, grace="auto"), env=outside)
        try:
            assert drain_status(sc)["grace"] == 25.0
        finally:
            sc.stop()
    assert "drain.grace: auto" in logs_of(sc) and "fallback" in logs_of(sc)


class ThreadedApiServer:
    """tests/k8s/fake_apiserver.py on its own loop in a thread, for a sidecar subprocess."""

    def __init__(self, workdir: Path) -> None:
        from tests.k8s.fake_apiserver import FakeApiServer

        self.server = FakeApiServer(workdir)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def test_grace_auto_reads_the_pods_termination_grace_period(tmp_path: Path) -> None:
    api = ThreadedApiServer(tmp_path / "apiserver")
    try:
        api.server.put_pod("shop", "app-0", termination_grace_period_seconds=45)
        kubeconfig = api.server.write_kubeconfig()
        with Upstream() as up:
            sc = Sidecar(
                config(up.port, grace="auto", accept_period="1s"),
                env={"POD_NAME": "app-0", "POD_NAMESPACE": "shop", "KUBECONFIG": str(kubeconfig)},
            )
            try:
                st = drain_status(sc)
            finally:
                sc.stop()
        pod_reads = [r for r in api.server.requests if "/pods/app-0" in r.path]
    finally:
        api.stop()
    assert st["grace"] == 40.0, (st, logs_of(sc))  # 45 s minus the 5 s margin
    assert pod_reads, "the pod was read through the API"
    assert "terminationGracePeriodSeconds" in logs_of(sc)


def run_async(main: Callable[[], Any]) -> Any:
    with asyncio.Runner() as runner:
        return runner.run(main())


def test_grace_from_period() -> None:
    from sidecar.podinfo import grace_from_period

    assert grace_from_period(30) == 25.0  # the default pod grace period gives the default grace
    assert grace_from_period(45) == 40.0
    assert grace_from_period(10) == 5.0
    assert grace_from_period(6) == 3.0  # short periods: half of it
    assert grace_from_period(1) == 1.0
    assert grace_from_period(0) == 1.0


def test_auto_grace_in_cluster_against_the_fake_api_server(tmp_path: Path) -> None:
    from sidecar.discovery.kubernetes import in_cluster
    from sidecar.podinfo import FALLBACK, auto_grace
    from tests.k8s.fake_apiserver import FakeApiServer

    async def main() -> None:
        async with FakeApiServer(tmp_path / "apiserver") as server:
            server.put_pod("shop", "app-0", termination_grace_period_seconds=60)
            env = {"POD_NAME": "app-0", "POD_NAMESPACE": "shop", **server.env()}

            def api() -> Any:
                return in_cluster(
                    token_path=str(server.token_path), ca_path=str(server.ca_path), environ=env
                )

            got = await auto_grace(env, api=api())
            assert (got.seconds, got.source, got.period) == (55.0, "pod", 60)
            missing = await auto_grace({**env, "POD_NAME": "gone"}, api=api())
            assert (missing.seconds, missing.source) == (FALLBACK, "fallback")
            assert "shop/gone" in missing.detail
            server.stall_requests()
            t0 = time.monotonic()
            stalled = await auto_grace(env, api=api(), read_timeout=0.5)
            assert stalled.source == "fallback" and "longer than 0.5s" in stalled.detail
            assert time.monotonic() - t0 < 2.0
            server.stall_requests(False)

    run_async(main)


def test_auto_grace_outside_a_pod_falls_back() -> None:
    from sidecar.podinfo import FALLBACK, auto_grace

    got = run_async(lambda: auto_grace({}))
    assert (got.seconds, got.source) == (FALLBACK, "fallback") and "POD_NAME" in got.detail
    got = run_async(lambda: auto_grace({"POD_NAME": "app-0"}))
    assert got.source == "fallback" and "KUBERNETES_SERVICE_HOST" in got.detail
