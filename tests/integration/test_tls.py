"""TLS origination on 127.0.0.1: resumption on both loops, verification failures, mTLS, reload."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import uvloop

from sidecar.config import TlsConfig
from sidecar.upstream.tls import (
    TlsFileError,
    TlsOrigin,
    classify_tls_error,
    describe_tls_error,
)
from tests.integration.tls_servers import (
    AiohttpTlsUpstream,
    KubeSecretDir,
    NginxTlsUpstream,
    Pki,
    ThreadedTlsUpstream,
    cn_of,
    server_context,
)

T = TypeVar("T")
TIMEOUT = 5.0  # every wait in this file is bounded by this
CONNECTIONS = 100
VERSIONS = ["TLSv1.2", "TLSv1.3"]

Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Run[Any]]:
    """Runs a coroutine on a fresh loop of the parametrized kind."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner.run


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


# --- a client doing what the connection code does --------------------------------------------
@dataclass
class Fetched:
    status: int
    body: bytes
    resumed: bool


class _OneRequest(asyncio.Protocol):
    """Writes one GET and collects the response until the upstream closes."""

    def __init__(self, host: str) -> None:
        self.request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        self.data = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if not self.data:  # what the connection code treats as a reset before the response
            self.done.set_exception(exc or ConnectionResetError("closed before any response"))
        else:
            self.done.set_result(None)


async def fetch(
    origin: TlsOrigin,
    port: int,
    *,
    server_hostname: str | None = None,
    wait_for: float = TIMEOUT,
    tunnel: bool = False,
) -> Fetched:
    """One request on a new connection, with the exact hook sequence the connection code uses.
    `tunnel`: like a connection that left the pool as a byte tunnel, only `on_connected`."""
    loop = asyncio.get_running_loop()
    hostname = server_hostname or origin.server_hostname
    transport, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: _OneRequest(hostname),
            "127.0.0.1",
            port,
            ssl=origin.context_for_connect(),
            server_hostname=hostname,
            ssl_handshake_timeout=origin.handshake_timeout,
        ),
        wait_for,
    )
    try:
        origin.on_connected(transport)
        resumed = bool(transport.get_extra_info("ssl_object").session_reused)
        await asyncio.wait_for(asyncio.shield(proto.done), TIMEOUT)
    finally:
        if not tunnel:
            origin.capture_session(transport)  # what the pool's release does
        transport.close()
    head, _, body = bytes(proto.data).partition(b"\r\n\r\n")
    return Fetched(int(head.split(b" ", 2)[1]), body, resumed)


async def fetch_error(origin: TlsOrigin, port: int, **kwargs: Any) -> BaseException:
    """The exception a connect (or, TLS 1.3 mTLS, the first read) raised."""
    try:
        await fetch(origin, port, **kwargs)
    except (OSError, TimeoutError) as exc:
        return exc
    raise AssertionError("the connection unexpectedly succeeded")


def after_first(flags: list[bool]) -> float:
    rest = flags[1:]
    return sum(rest) / len(rest)


# --- resumption ------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_resumption_nginx(run: Run[Any], pki: Pki, tmp_path: Path, version: str) -> None:
    origin = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file)
    with NginxTlsUpstream(tmp_path / "nginx", pki.server, version=version, ports=2) as nginx:

        async def scenario() -> list[bool]:
            # Two ports of one server block: two endpoints sharing ticket keys and a cache.
            return [(await fetch(origin, nginx.ports[i % 2])).resumed for i in range(CONNECTIONS)]

        client = run(scenario())
        lines = nginx.wait_log_lines(CONNECTIONS)
    server = [line.reused for line in lines]
    print(f"nginx {version}: resumed after first {after_first(client):.2%}", origin)
    assert [line.protocol for line in lines] == [version] * CONNECTIONS
    assert client[0] is False
    assert after_first(client) >= 0.9
    assert server == client  # the upstream confirms each one
    assert origin.handshakes == {True: sum(client), False: CONNECTIONS - sum(client)}
    assert origin.resumption_ratio() == sum(client) / CONNECTIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_resumption_aiohttp(run: Run[Any], pki: Pki, version: str) -> None:
    origin = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file)

    async def scenario() -> tuple[list[bool], list[bool], list[str]]:
        # Two servers sharing one SSLContext (hence ticket keys): two endpoints of a cluster.
        async with AiohttpTlsUpstream(server_context(pki.server, version=version), ports=2) as up:
            got = [await fetch(origin, up.ports[i % 2]) for i in range(CONNECTIONS)]
            return [f.resumed for f in got], up.reused, [json.loads(f.body)["version"] for f in got]

    client, server, versions = run(scenario())
    print(f"aiohttp {version}: resumed after first {after_first(client):.2%}", origin)
    assert set(versions) == {version}
    assert client[0] is False
    assert after_first(client) >= 0.9
    assert server == client
    assert origin.resumption_ratio() == sum(client) / CONNECTIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_tunnels_feed_the_session_cache(run: Run[Any], pki: Pki, version: str) -> None:
    """Connections that never report back (TCP listeners, upgrades) still feed the cache: the
    next connect takes the newest connection's session once its TLS 1.3 ticket has arrived."""
    origin = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file)

    async def scenario() -> tuple[list[bool], list[bool]]:
        async with AiohttpTlsUpstream(server_context(pki.server, version=version)) as up:
            got = [await fetch(origin, up.ports[0], tunnel=True) for _ in range(5)]
            return [f.resumed for f in got], up.reused

    client, server = run(scenario())
    assert client == server == [False, True, True, True, True]


def test_a_superseded_context_hands_new_connections_to_the_current_one(
    run: Run[Any], pki: Pki, tmp_path: Path
) -> None:
    """Whoever kept the context of before a reload (the health checker) uses the new material."""
    secret = _secret(pki, tmp_path / "secret", "client-a")
    origin = TlsOrigin(
        sni="upstream.test", ca_file=pki.ca_file, cert_file=secret.cert, key_file=secret.key
    )
    kept = origin.context_for_connect()
    _rotate(pki, secret, "client-b")
    assert origin.maybe_reload()
    assert origin.context_for_connect() is not kept
    context = server_context(pki.server, version="TLSv1.3", client_ca=pki.ca_file)

    async def scenario() -> Fetched:
        async with AiohttpTlsUpstream(context) as up:
            loop = asyncio.get_running_loop()
            transport, proto = await loop.create_connection(
                lambda: _OneRequest("upstream.test"),
                "127.0.0.1",
                up.ports[0],
                ssl=kept,
                server_hostname="upstream.test",
            )
            try:
                assert transport.get_extra_info("ssl_object").context is not kept
                await asyncio.wait_for(asyncio.shield(proto.done), TIMEOUT)
            finally:
                transport.close()
            _, _, body = bytes(proto.data).partition(b"\r\n\r\n")
            return Fetched(200, body, False)

    assert _cn(run(scenario())) == "client-b"


@pytest.mark.parametrize("version", VERSIONS)
def test_forgotten_session_means_full_handshake(
    run: Run[Any], pki: Pki, tmp_path: Path, version: str
) -> None:
    """A restarted upstream (new ticket keys, empty cache) rejects the offer: no error."""
    origin = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file)
    nginx = NginxTlsUpstream(tmp_path / "nginx", pki.server, version=version)
    try:
        nginx.start()
        before = run(fetch_n(origin, nginx.ports[0], 3))
        nginx.stop()
        nginx.start()  # same port, forgot everything
        after = run(fetch_n(origin, nginx.ports[0], 3))
    finally:
        nginx.stop()
    assert before == [False, True, True]
    assert after == [False, True, True]


async def fetch_n(origin: TlsOrigin, port: int, n: int) -> list[bool]:
    return [(await fetch(origin, port)).resumed for _ in range(n)]


@pytest.mark.parametrize("version", VERSIONS)
def test_session_never_offered_to_another_name(
    run: Run[Any], pki: Pki, tmp_path: Path, version: str
) -> None:
    """nginx would resume a TLS 1.2 ticket under any name: not resumed means not offered."""
    origin = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file)
    with NginxTlsUpstream(tmp_path / "nginx", pki.server, version=version) as nginx:
        port = nginx.ports[0]

        async def scenario() -> list[bool]:
            return [
                (await fetch(origin, port)).resumed,
                (await fetch(origin, port)).resumed,
                (await fetch(origin, port, server_hostname="alt.test")).resumed,
                (await fetch(origin, port, server_hostname="alt.test")).resumed,
                (await fetch(origin, port)).resumed,
            ]

        flags = run(scenario())
    # alt.test gets its own first (full) handshake and then its own session.
    assert flags == [False, True, False, True, True]


def test_session_reuse_off(run: Run[Any], pki: Pki, tmp_path: Path) -> None:
    origin = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file, session_reuse=False)
    with NginxTlsUpstream(tmp_path / "nginx", pki.server, version="TLSv1.3") as nginx:
        flags = run(fetch_n(origin, nginx.ports[0], 5))
    assert flags == [False] * 5
    assert origin.resumption_ratio() == 0.0
    assert origin.cached_sessions() == 0


# --- failures and their 502 detail -------------------------------------------------------------
_PAST = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)


@pytest.mark.parametrize(
    ("case", "kind", "detail"),
    [
        ("wrong_ca", "unknown_ca", "certificate verify failed: unable to get local issuer"),
        ("wrong_hostname", "hostname_mismatch", "hostname mismatch"),
        ("expired", "expired", "certificate verify failed: certificate has expired"),
        ("self_signed", "unknown_ca", "self-signed certificate"),
    ],
)
def test_verification_failures(
    run: Run[Any], pki: Pki, tmp_path: Path, case: str, kind: str, detail: str
) -> None:
    cert = pki.server
    ca_file = pki.ca_file
    sni = "upstream.test"
    if case == "wrong_ca":
        ca_file = Pki(tmp_path / "other").ca_file
    elif case == "wrong_hostname":
        sni = "elsewhere.test"
    elif case == "expired":
        cert = pki.issue(
            "expired",
            "upstream.test",
            not_before=_PAST,
            not_after=_PAST + datetime.timedelta(days=1),
        )
    elif case == "self_signed":
        cert = pki.self_signed()
    origin = TlsOrigin(sni=sni, ca_file=ca_file)

    async def scenario() -> BaseException:
        async with AiohttpTlsUpstream(server_context(cert)) as up:
            return await fetch_error(origin, up.ports[0])

    exc = run(scenario())
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert classify_tls_error(exc) == kind
    assert detail in describe_tls_error(exc)
    assert origin.describe_error(exc).startswith(describe_tls_error(exc))
    if kind == "unknown_ca":
        assert f"trusting {ca_file}" in origin.describe_error(exc)
    assert origin.handshakes == {True: 0, False: 0}


def test_protocol_version(run: Run[Any], pki: Pki) -> None:
    """min_version TLSv1.3 against a TLS 1.2-only upstream fails; TLSv1.2 reaches a 1.3-only one."""
    strict = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file, min_version="TLSv1.3")
    lenient = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file, min_version="TLSv1.2")

    async def scenario(old_port: int) -> tuple[BaseException, Fetched]:
        async with AiohttpTlsUpstream(server_context(pki.server, version="TLSv1.3")) as new:
            return await fetch_error(strict, old_port), await fetch(lenient, new.ports[0])

    with ThreadedTlsUpstream(server_context(pki.server, version="TLSv1.2")) as old:
        exc, ok = run(scenario(old.port))
    assert classify_tls_error(exc) == "protocol_version"
    assert describe_tls_error(exc).startswith("TLS protocol version: no version in common")
    assert strict.describe_error(exc).endswith("min_version is TLSv1.3")
    assert json.loads(ok.body)["version"] == "TLSv1.3"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listening socket nobody accepts on: TCP connects, the TLS handshake never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_handshake_timeout(run: Run[Any], pki: Pki, silent_port: int) -> None:
    origin = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file, handshake_timeout=0.2)
    # The loop's own ssl_handshake_timeout, and an outer connect deadline (asyncio.wait_for).
    by_loop = run(fetch_error(origin, silent_port))
    patient = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file, handshake_timeout=30)
    by_deadline = run(fetch_error(patient, silent_port, wait_for=0.2))
    assert classify_tls_error(by_loop) == "handshake_timeout"
    assert describe_tls_error(by_loop) == "TLS handshake timeout: no handshake within 0.2s"
    assert isinstance(by_deadline, TimeoutError)
    assert describe_tls_error(by_deadline).startswith("TLS handshake timeout")


def test_upstream_not_speaking_tls(run: Run[Any], pki: Pki) -> None:
    origin = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file)

    class PlainHttp(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    async def scenario() -> BaseException:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(PlainHttp, "127.0.0.1", 0)
        try:
            return await fetch_error(origin, server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await asyncio.wait_for(server.wait_closed(), TIMEOUT)

    exc = run(scenario())
    assert classify_tls_error(exc) == "not_tls"
    assert "does not speak TLS" in describe_tls_error(exc)


def test_describe_follows_the_cause_chain() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_code = 10
    verify.verify_message = "certificate has expired"
    try:
        try:
            raise verify
        except ssl.SSLError as inner:
            raise RuntimeError("connect failed") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert describe_tls_error(wrapped) == "certificate verify failed: certificate has expired"
    assert describe_tls_error(ConnectionRefusedError(111, "refused")) == "connection refused"


# --- mTLS and certificate reload -------------------------------------------------------------
def _secret(pki: Pki, root: Path, cn: str) -> KubeSecretDir:
    secret = KubeSecretDir(root)
    _rotate(pki, secret, cn)
    return secret


def _rotate(pki: Pki, secret: KubeSecretDir, cn: str) -> None:
    files = pki.issue(cn, cn, into=pki.dir / "issued")
    secret.update(files.cert.read_bytes(), files.key.read_bytes())


@pytest.mark.parametrize("version", VERSIONS)
def test_mtls_and_client_cert_rotation(
    run: Run[Any], pki: Pki, tmp_path: Path, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = _secret(pki, tmp_path / "secret", "client-a")
    anonymous = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file)
    origin = TlsOrigin(
        sni="upstream.test", ca_file=pki.ca_file, cert_file=secret.cert, key_file=secret.key
    )
    context = server_context(pki.server, version=version, client_ca=pki.ca_file)

    # Without a client certificate: refused with an alert (TLS 1.2: in the handshake; TLS 1.3:
    # the client finishes first, so the alert comes on the first read).
    with ThreadedTlsUpstream(context) as strict:
        exc = run(fetch_error(anonymous, strict.port))
    expected = {"TLSv1.2": "handshake_failure", "TLSv1.3": "client_certificate_rejected"}
    assert classify_tls_error(exc) == expected[version]
    assert "client certificate" in describe_tls_error(exc)

    async def scenario(up: AiohttpTlsUpstream) -> None:
        port = up.ports[0]
        # aiohttp (asyncio's server side) drops the connection without an alert.
        assert "upstream" in describe_tls_error(await fetch_error(anonymous, port))

        first, second = await fetch(origin, port), await fetch(origin, port)
        assert [_cn(first), _cn(second)] == ["client-a", "client-a"]
        assert [first.resumed, second.resumed] == [False, True]

        # The kubelet swaps the secret's ..data symlink: the next connection shows the new cert.
        _rotate(pki, secret, "client-b")
        assert origin.maybe_reload() is True
        assert origin.maybe_reload() is False  # nothing changed since
        rotated = await fetch(origin, port)
        assert (_cn(rotated), rotated.resumed) == ("client-b", False)
        assert (await fetch(origin, port)).resumed

        # Broken new material (garbage cert; then a cert that does not match its key): rejected,
        # the old context keeps working and resuming.
        secret.update(b"-----BEGIN CERTIFICATE-----\nnot a cert\n", secret.key.read_bytes())
        with caplog.at_level(logging.ERROR, logger="sidecar.tls"):
            assert origin.maybe_reload() is False
        other = pki.issue("client-c", "client-c", into=pki.dir / "mismatch")
        secret.update(other.cert.read_bytes(), pki.server.key.read_bytes())
        assert origin.maybe_reload() is False
        kept = await fetch(origin, port)
        assert (_cn(kept), kept.resumed) == ("client-b", True)

        _rotate(pki, secret, "client-d")  # fixed: picked up again
        assert origin.maybe_reload() is True
        assert _cn(await fetch(origin, port)) == "client-d"

    async def main() -> None:
        async with AiohttpTlsUpstream(context) as up:
            await scenario(up)

    run(main())
    assert origin.reloads == 2
    assert origin.reload_errors == 2
    assert any("rejected new certificate files" in r.getMessage() for r in caplog.records)


def _cn(fetched: Fetched) -> str | None:
    cn: str | None = json.loads(fetched.body)["client_cn"]
    return cn


def test_mtls_rotation_nginx(run: Run[Any], pki: Pki, tmp_path: Path) -> None:
    """nginx checks the client certificate and logs its subject; rotation shows up there."""
    secret = _secret(pki, tmp_path / "secret", "client-a")
    origin = TlsOrigin(
        sni="upstream.test", ca_file=pki.ca_file, cert_file=secret.cert, key_file=secret.key
    )
    anonymous = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file)
    with NginxTlsUpstream(
        tmp_path / "nginx", pki.server, version="TLSv1.3", client_ca=pki.ca_file
    ) as nginx:
        port = nginx.ports[0]

        async def scenario() -> list[int]:
            statuses = [(await fetch(anonymous, port)).status]  # nginx answers 400 itself
            statuses += [(await fetch(origin, port)).status for _ in range(2)]
            _rotate(pki, secret, "client-b")
            assert origin.maybe_reload()
            statuses += [(await fetch(origin, port)).status for _ in range(2)]
            return statuses

        statuses = run(scenario())
        lines = nginx.wait_log_lines(5)
    assert statuses == [400, 200, 200, 200, 200]
    assert [cn_of(line.client_dn) for line in lines] == [None, "client-a", "client-a"] + [
        "client-b",
        "client-b",
    ]
    assert [line.reused for line in lines][1:] == [False, True, False, True]


def test_watch_reloads_until_cancelled(run: Run[Any], pki: Pki, tmp_path: Path) -> None:
    secret = _secret(pki, tmp_path / "secret", "client-a")
    origin = TlsOrigin(
        sni="upstream.test", ca_file=pki.ca_file, cert_file=secret.cert, key_file=secret.key
    )

    async def scenario() -> None:
        watcher = asyncio.create_task(origin.watch(0.02))
        try:
            _rotate(pki, secret, "client-b")
            await wait_until(lambda: origin.reloads == 1)
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher

    run(scenario())


async def wait_until(condition: Callable[[], bool], step: float = 0.01) -> None:
    for _ in range(int(TIMEOUT / step)):
        if condition():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"not true within {TIMEOUT}s")


# --- insecure mode, views, construction ------------------------------------------------------
def test_insecure_skip_verify(run: Run[Any], pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    self_signed = pki.self_signed()
    with caplog.at_level(logging.WARNING, logger="sidecar.tls"):
        origin = TlsOrigin(sni="upstream.test", insecure_skip_verify=True)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "NOT verified" in caplog.records[0].getMessage()

    async def scenario() -> Fetched:
        async with AiohttpTlsUpstream(server_context(self_signed)) as up:
            return await fetch(origin, up.ports[0])

    assert run(scenario()).status == 200


def test_from_config(pki: Pki, tmp_path: Path) -> None:
    client = pki.issue("client-a", "client-a")
    cfg = TlsConfig(
        enabled=True,
        sni=None,
        ca_file=str(pki.ca_file),
        cert_file=str(client.cert),
        key_file=str(client.key),
        session_reuse=True,
        alpn=["http/1.1"],
        min_version="TLSv1.3",
        insecure_skip_verify=False,
        handshake_timeout="3s",
    )
    stats: dict[bool, int] = {True: 0, False: 0}
    origin = TlsOrigin.from_config(cfg, "payments.shop.svc", handshakes=stats)
    assert origin is not None
    assert origin.handshakes is stats
    assert origin.server_hostname == "payments.shop.svc"
    assert origin.handshake_timeout == 3.0
    context = origin.context_for_connect()
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert origin.resumption_ratio() is None
    assert TlsOrigin.from_config(TlsConfig(enabled=False), "x") is None


def test_bad_settings_fail_at_construction(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_version"):
        TlsOrigin(sni="upstream.test", min_version="TLSv1.1")
    with pytest.raises(TlsFileError, match=r"tls.ca_file .*missing.pem: No such file"):
        TlsOrigin(sni="upstream.test", ca_file=tmp_path / "missing.pem")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    with pytest.raises(TlsFileError, match=r"tls.ca_file .*broken.pem: "):
        TlsOrigin(sni="upstream.test", ca_file=broken)


@pytest.mark.parametrize("version", VERSIONS)
def test_resumed_connections_do_not_read_their_session_again(
    run: Run[Any], pki: Pki, version: str
) -> None:
    """Reading SSLObject.session costs an ASN.1 round trip of the session and certificates
    (most of a resumed handshake's CPU): once a name has a fresh session, resumed connections
    keep using it and no new one is read; a refused offer forces a new read (the test above)."""
    origin = TlsOrigin(sni="upstream.test", ca_file=pki.ca_file)

    async def scenario() -> tuple[list[bool], list[object]]:
        async with AiohttpTlsUpstream(server_context(pki.server, version=version)) as up:
            resumed, cached = [], []
            for _ in range(6):
                resumed.append((await fetch(origin, up.ports[0])).resumed)
                sessions = cast(Any, origin.context_for_connect()).sessions
                cached.append(sessions.get("upstream.test"))
            return resumed, cached

    resumed, cached = run(scenario())
    assert resumed == [False] + [True] * 5
    assert cached[0] is not None  # the first (full) handshake's session, captured at close
    assert all(session is cached[0] for session in cached)  # never read again while fresh
