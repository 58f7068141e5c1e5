"""TLS origination through the real sidecar process, on both loops.

The app speaks plain HTTP (or plain TCP bytes) to the sidecar; the cluster says `tls`; the
upstream (nginx, or aiohttp) speaks TLS and closes after every response, so every request
needs a new TLS connection: after the first, almost all of them must resume. The upstream's
own record of each handshake (nginx's `$ssl_session_reused`, aiohttp's `session_reused`) must
agree with the sidecar's `sidecar_tls_handshakes_total` and `/clusters`.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from tests.harness import LOOPS, Sidecar, ThreadedServer, http_get
from tests.integration.tls_servers import (
    KubeSecretDir,
    NginxTlsUpstream,
    Pki,
    ThreadedTlsUpstream,
    cn_of,
    server_context,
)

T = TypeVar("T")
REQUESTS = 100
VERSIONS = ["TLSv1.2", "TLSv1.3"]
SNI = "upstream.test"
# TlsOrigin.watch runs every 5 s in the sidecar: a file change shows within ~5 s, plus slack.
RELOAD_WAIT = 9.0
# The sidecar stops on SIGTERM at the end of each test: no need to keep serving for seconds.
FAST_DRAIN = {"grace": "2s", "accept_period": "0s"}


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


# --- the app side --------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def get(port: int, path: str = "/", host: str = SNI, timeout: float = 10.0) -> Answer:
    """One plain-HTTP request from the app to the sidecar, on a new app connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.05)


# --- sidecar configs --------------------------------------------------------------------------
def cluster(ports: list[int], tls: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "up",
        "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{p}" for p in ports]},
        "tls": {
            "enabled": True,
            **{k: str(v) if isinstance(v, Path) else v for k, v in tls.items()},
        },
        "pool": {"connect_timeout": "2s"},
        **extra,
    }


def http_config(clusters: list[dict[str, Any]], **listener: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "egress", "protocol": "http", **(listener or {"cluster": "up"})}],
        "clusters": clusters,
        "drain": FAST_DRAIN,
    }


def handshakes(sidecar: Sidecar) -> tuple[int, int]:
    """(resumed, full) from `sidecar_tls_handshakes_total`."""
    name = "sidecar_tls_handshakes_total"
    return (
        int(sidecar.metric(name, cluster="up", resumed="true")),
        int(sidecar.metric(name, cluster="up", resumed="false")),
    )


def ratio_after_first(resumed: int, full: int) -> float:
    """Of the handshakes after the first (which is always full), the resumed share."""
    return resumed / (resumed + full - 1)


# --- an aiohttp TLS upstream in a thread ---------------------------------------------------------
@dataclass
class Seen:
    path: str
    reused: bool
    version: str
    client_cn: str | None


class AiohttpUpstream:
    """aiohttp over TLS on its own thread; `Connection: close` on every response. Records what
    it saw of each request's TLS connection: the upstream's side of resumption."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.seen: list[Seen] = []
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self.server = ThreadedServer(app, ssl_context=context)
        self.port = self.server.port

    async def _handle(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        sslobj = request.transport.get_extra_info("ssl_object")
        peer = sslobj.getpeercert() or {}
        cn = next((v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"), None)
        seen = Seen(request.path, bool(sslobj.session_reused), str(sslobj.version()), cn)
        self.seen.append(seen)
        response = web.json_response(seen.__dict__)
        response.force_close()
        return response

    def __enter__(self) -> AiohttpUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


@pytest.fixture
def sidecars() -> Iterator[Callable[..., Sidecar]]:
    """Start sidecars that are stopped (by PID) at the end of the test, pass or fail."""
    started: list[Sidecar] = []

    def start(config: dict[str, Any], loop: str) -> Sidecar:
        sidecar = Sidecar(config, loop=loop, wait_ready=False)
        started.append(sidecar)
        sidecar.wait_ready()
        return sidecar

    yield start
    for sidecar in started:
        sidecar.stop()


# --- resumption through the proxy -------------------------------------------------------------
def _check_resumption(sidecar: Sidecar, upstream_flags: list[bool], label: str) -> None:
    resumed, full = handshakes(sidecar)
    ratio = sidecar.clusters()["up"]["tls_resumption_ratio"]
    print(
        f"{label}: {resumed} resumed, {full} full, after the first "
        f"{ratio_after_first(resumed, full):.1%}, /clusters ratio {ratio:.3f}"
    )
    assert resumed + full == REQUESTS  # one new TLS connection per request, no more
    assert upstream_flags[0] is False
    assert ratio_after_first(resumed, full) >= 0.9
    assert ratio == pytest.approx(resumed / REQUESTS)
    # The upstream's word, connection by connection, agrees with the sidecar's count.
    assert len(upstream_flags) == REQUESTS
    assert sum(upstream_flags) == resumed


@pytest.mark.parametrize("version", VERSIONS)
def test_resumption_nginx(
    sidecars: Callable[..., Sidecar], loop: str, pki: Pki, tmp_path: Path, version: str
) -> None:
    with NginxTlsUpstream(tmp_path / "nginx", pki.server, version=version, ports=2) as nginx:
        sidecar = sidecars(
            http_config([cluster(nginx.ports, {"ca_file": pki.ca_file, "sni": SNI})]), loop
        )
        port = sidecar.port("egress")
        answers = [get(port) for _ in range(REQUESTS)]
        lines = nginx.wait_log_lines(REQUESTS)
        assert [a.status for a in answers] == [200] * REQUESTS
        assert {a.body for a in answers} == {b"ok\n"}
        assert {line.protocol for line in lines} == {version}
        assert {line.port for line in lines} == set(nginx.ports)  # both endpoints used
        _check_resumption(sidecar, [line.reused for line in lines], f"nginx {version} {loop}")


@pytest.mark.parametrize("version", VERSIONS)
def test_resumption_aiohttp(
    sidecars: Callable[..., Sidecar], loop: str, pki: Pki, version: str
) -> None:
    with AiohttpUpstream(server_context(pki.server, version=version)) as up:
        sidecar = sidecars(
            http_config([cluster([up.port], {"ca_file": pki.ca_file, "sni": SNI})]), loop
        )
        port = sidecar.port("egress")
        answers = [get(port) for _ in range(REQUESTS)]
        assert [a.status for a in answers] == [200] * REQUESTS
        assert {a.json()["version"] for a in answers} == {version}
        _check_resumption(sidecar, [s.reused for s in up.seen], f"aiohttp {version} {loop}")


def test_session_reuse_off(
    sidecars: Callable[..., Sidecar], loop: str, pki: Pki, tmp_path: Path
) -> None:
    with NginxTlsUpstream(tmp_path / "nginx", pki.server, version="TLSv1.3") as nginx:
        tls = {"ca_file": pki.ca_file, "sni": SNI, "session_reuse": False}
        sidecar = sidecars(http_config([cluster(nginx.ports, tls)]), loop)
        assert [get(sidecar.port("egress")).status for _ in range(10)] == [200] * 10
        lines = nginx.wait_log_lines(10)
        assert [line.reused for line in lines] == [False] * 10
        assert handshakes(sidecar) == (0, 10)
        assert sidecar.clusters()["up"]["tls_resumption_ratio"] == 0.0


# --- failures: 502 connect_failed, and the detail says what failed -----------------------------
_PAST = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_ca", ["certificate verify failed", "unknown CA"]),
        ("wrong_hostname", ["certificate verify failed", "hostname mismatch", "wrong.test"]),
        ("expired", ["certificate verify failed", "expired"]),
    ],
)
def test_verification_failures(
    sidecars: Callable[..., Sidecar], loop: str, pki: Pki, case: str, expected: list[str]
) -> None:
    cert, ca_file, sni = pki.server, pki.ca_file, SNI
    if case == "wrong_ca":
        ca_file = Pki(pki.dir / "other").ca_file
    elif case == "wrong_hostname":
        sni = "wrong.test"
    else:
        cert = pki.issue("expired", SNI, not_before=_PAST, not_after=_PAST + datetime.timedelta(1))
    with AiohttpUpstream(server_context(cert)) as up:
        sidecar = sidecars(
            http_config([cluster([up.port], {"ca_file": ca_file, "sni": sni})]), loop
        )
        answer = get(sidecar.port("egress"))
        assert up.seen == []  # no request ever reached the upstream
    assert answer.status == 502
    assert answer.headers["x-sidecar-error"] == "connect_failed"
    body = answer.json()
    assert (body["error"], body["cluster"]) == ("connect_failed", "up")
    for word in expected:
        assert word in body["detail"], body
    assert handshakes(sidecar) == (0, 0)  # failed handshakes are not handshakes


def test_protocol_version(sidecars: Callable[..., Sidecar], loop: str, pki: Pki) -> None:
    context = server_context(pki.server, version="TLSv1.2")
    with ThreadedTlsUpstream(context) as old:  # sends the protocol_version alert
        tls = {"ca_file": pki.ca_file, "sni": SNI, "min_version": "TLSv1.3"}
        sidecar = sidecars(http_config([cluster([old.port], tls)]), loop)
        answer = get(sidecar.port("egress"))
    assert (answer.status, answer.headers["x-sidecar-error"]) == (502, "connect_failed")
    detail = answer.json()["detail"]
    assert "TLS protocol version" in detail and "min_version is TLSv1.3" in detail, detail


def test_unloadable_tls_files_are_a_config_error(pki: Pki, tmp_path: Path) -> None:
    """At start, a CA file that is missing or not PEM: exit 2, naming cluster, setting, file."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [(tmp_path / "missing.pem", "No such file"), (garbage, "no certificate")]
    for ca_file, reason in cases:
        config = http_config([cluster([9], {"ca_file": ca_file, "sni": SNI})])
        sidecar = Sidecar(config, wait_ready=False)
        try:
            assert sidecar.wait(15) == 2
            assert f"cluster up: tls.ca_file {ca_file}: {reason}" in sidecar.logs()
        finally:
            sidecar.stop()


def test_handshake_timeout(sidecars: Callable[..., Sidecar], loop: str, pki: Pki) -> None:
    """An upstream that accepts TCP and never answers the ClientHello: `tls.handshake_timeout`
    bounds the handshake, and the detail says so."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody reads
        port = silent.getsockname()[1]
        tls = {"ca_file": pki.ca_file, "sni": SNI, "handshake_timeout": "300ms"}
        sidecar = sidecars(http_config([cluster([port], tls, retry={"attempts": 1})]), loop)
        started = time.monotonic()
        answer = get(sidecar.port("egress"))
        elapsed = time.monotonic() - started
    assert (answer.status, answer.headers["x-sidecar-error"]) == (502, "connect_failed")
    assert "TLS handshake timeout: no handshake within 0.3s" in answer.json()["detail"]
    assert elapsed < 1.5  # the handshake's limit, not connect_timeout (2s)


# --- mTLS, and client certificate rotation on disk ---------------------------------------------
def _issue_into(pki: Pki, secret: KubeSecretDir, cn: str) -> None:
    files = pki.issue(cn, cn, into=pki.dir / "issued")
    secret.update(files.cert.read_bytes(), files.key.read_bytes())


def test_mtls_and_rotation(
    sidecars: Callable[..., Sidecar], loop: str, pki: Pki, tmp_path: Path
) -> None:
    secret = KubeSecretDir(tmp_path / "secret")
    _issue_into(pki, secret, "client-a")
    context = server_context(pki.server, version="TLSv1.3", client_ca=pki.ca_file)
    with AiohttpUpstream(context) as up:
        tls = {"ca_file": pki.ca_file, "sni": SNI, "cert_file": secret.cert, "key_file": secret.key}
        health = {"type": "http", "path": "/healthz", "interval": "500ms", "timeout": "400ms"}
        sidecar = sidecars(http_config([cluster([up.port], tls, health_check=health)]), loop)
        port = sidecar.port("egress")

        def app_cns(n: int) -> list[str | None]:
            return [get(port).json()["client_cn"] for _ in range(n)]

        assert app_cns(3) == ["client-a"] * 3

        # The kubelet swaps the secret's ..data symlink: new connections show the new cert,
        # the app's requests and the health checks alike.
        _issue_into(pki, secret, "client-b")
        rotated_at = len(up.seen)
        wait_for("the rotated client certificate", lambda: app_cns(1) == ["client-b"], RELOAD_WAIT)
        assert app_cns(3) == ["client-b"] * 3
        wait_for(
            "a health check with the rotated client certificate",
            lambda: any(
                s.path == "/healthz" and s.client_cn == "client-b" for s in up.seen[rotated_at:]
            ),
            5.0,
        )

        # A broken new file is rejected with a log line; the last good one keeps working.
        secret.update(b"-----BEGIN CERTIFICATE-----\nnot a cert\n", secret.key.read_bytes())
        wait_for(
            "the rejection in the log",
            lambda: "rejected new certificate files" in sidecar.logs(),
            RELOAD_WAIT,
        )
        assert app_cns(3) == ["client-b"] * 3
        assert all(s.client_cn == "client-b" for s in up.seen[-3:])


@pytest.mark.parametrize("version", VERSIONS)
def test_mtls_without_a_client_certificate(
    sidecars: Callable[..., Sidecar], loop: str, pki: Pki, version: str
) -> None:
    """The upstream requires a client certificate and the cluster has none: 502 connect_failed.

    TLS 1.2 refuses in the handshake. TLS 1.3 lets the client finish first and sends its alert
    after: the sidecar reads it on the first read and still reports a connect failure, unless
    the upstream's RST (it closes with our unread request in its buffer) overtakes the alert:
    then all the app can be told is that the upstream reset the connection.
    """
    context = server_context(pki.server, version=version, client_ca=pki.ca_file)
    with ThreadedTlsUpstream(context) as strict:  # sends the alerts OpenSSL servers send
        sidecar = sidecars(
            http_config([cluster([strict.port], {"ca_file": pki.ca_file, "sni": SNI})]), loop
        )
        answer = get(sidecar.port("egress"))
        assert strict.reused == []  # no request was ever answered
    code, detail = answer.headers["x-sidecar-error"], answer.json()["detail"]
    assert answer.status == 502
    if version == "TLSv1.2":
        assert code == "connect_failed"
    else:
        assert code in ("connect_failed", "upstream_reset"), detail
    if code == "connect_failed":
        assert "client certificate" in detail and "none configured" in detail, detail


def test_mtls_nginx_sees_the_client_certificate(
    sidecars: Callable[..., Sidecar], loop: str, pki: Pki, tmp_path: Path
) -> None:
    client = pki.issue("client-a", "client-a")
    with NginxTlsUpstream(
        tmp_path / "nginx", pki.server, version="TLSv1.2", client_ca=pki.ca_file
    ) as nginx:
        tls = {"ca_file": pki.ca_file, "sni": SNI, "cert_file": client.cert, "key_file": client.key}
        sidecar = sidecars(http_config([cluster(nginx.ports, tls)]), loop)
        assert [get(sidecar.port("egress")).status for _ in range(5)] == [200] * 5
        lines = nginx.wait_log_lines(5)
    assert [cn_of(line.client_dn) for line in lines] == ["client-a"] * 5
    assert [line.reused for line in lines] == [False, True, True, True, True]


# --- insecure_skip_verify ----------------------------------------------------------------------
def test_insecure_skip_verify(sidecars: Callable[..., Sidecar], loop: str, pki: Pki) -> None:
    with AiohttpUpstream(server_context(pki.self_signed())) as up:
        tls = {"sni": SNI, "insecure_skip_verify": True}
        sidecar = sidecars(http_config([cluster([up.port], tls)]), loop)
        assert get(sidecar.port("egress")).status == 200
    logs = sidecar.logs()
    warnings = [
        json.loads(line)
        for line in logs.splitlines()
        if line.startswith("{") and "insecure_skip_verify" in line
    ]
    assert warnings and all(w["level"] == "warning" for w in warnings), logs
    status, body = http_get(f"{sidecar.admin}/config")
    assert status == 200
    config = json.loads(body)
    assert any("insecure_skip_verify" in w for w in config["warnings"]), config["warnings"]
    assert config["clusters"][0]["tls"]["insecure_skip_verify"] is True


# --- a TCP listener originates TLS ---------------------------------------------------------------
def _tcp_exchange(port: int, payload: bytes, half_close: bool, timeout: float = 10.0) -> bytes:
    """Send plaintext bytes to the sidecar's TCP listener, read until the upstream closes.
    `half_close`: once the tunnel is up, shut down our sending side after the payload (a TLS
    upstream cannot be told; the answer must still come back)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if half_close:
            time.sleep(0.2)  # the tunnel is up by now (else the EOF is held: fine too)
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("version", VERSIONS)
def test_tcp_listener_originates_tls(
    sidecars: Callable[..., Sidecar], loop: str, pki: Pki, tmp_path: Path, version: str
) -> None:
    with NginxTlsUpstream(tmp_path / "nginx", pki.server, version=version) as nginx:
        config = {
            "listeners": [{"name": "raw", "protocol": "tcp", "cluster": "up"}],
            "clusters": [cluster(nginx.ports, {"ca_file": pki.ca_file, "sni": SNI})],
            "drain": FAST_DRAIN,
        }
        sidecar = sidecars(config, loop)
        request = f"GET / HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode()
        replies = [
            _tcp_exchange(sidecar.port("raw"), request, half_close=i % 2 == 1) for i in range(10)
        ]
        lines = nginx.wait_log_lines(10)
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        assert reply.endswith(b"\r\n\r\nok\n")
    # nginx parsed the app's plaintext request off its TLS listener.
    assert [(line.protocol, line.status) for line in lines] == [(version, 200)] * 10
    resumed, full = handshakes(sidecar)
    print(f"tcp listener {version} {loop}: {resumed} resumed, {full} full")
    assert resumed + full == 10
    assert sum(line.reused for line in lines) == resumed
    assert resumed >= 8, (resumed, full)  # tunnels feed the session cache too
    assert "eof_received" not in sidecar.logs()  # no asyncio warning per TLS tunnel


# --- CONNECT to a route whose cluster originates TLS ---------------------------------------------
def test_connect_to_a_tls_cluster_originates_tls(
    sidecars: Callable[..., Sidecar], loop: str, pki: Pki
) -> None:
    """A CONNECT routed to a cluster with `tls.enabled`: the operator said that cluster speaks
    TLS, so the tunnel's upstream side is TLS and the app's bytes inside it are plaintext
    (issue 4). The upstream reads the app's request off its TLS listener."""
    with AiohttpUpstream(server_context(pki.server)) as up:
        listener = {
            "routes": [{"match": {"host": SNI}, "cluster": "up"}],
            "forward_proxy": {"enabled": True, "allowed_hosts": ["*"], "connect": True},
        }
        config = http_config([cluster([up.port], {"ca_file": pki.ca_file, "sni": SNI})], **listener)
        sidecar = sidecars(config, loop)
        port = sidecar.port("egress")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"CONNECT {SNI}:443 HTTP/1.1\r\nHost: {SNI}:443\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 "), data
            sock.sendall(f"GET /inside HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n"
                         .encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        assert [s.path for s in up.seen] == ["/inside"]
    assert handshakes(sidecar) == (0, 1)
