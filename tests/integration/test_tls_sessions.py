"""Session resumption against an origin that closes every connection (issue 17, TLS set-up).

The cached session is offered by reference through `SSL_set_session` (upstream/tls_native.py),
not through CPython's i2d/d2i copy; the pure path stays as the fallback. Both are run here
against nginx (from apt, `keepalive_timeout 0`, session cache and tickets on: its access log's
`$ssl_session_reused` is the upstream's word), on both loops and both TLS versions, through the
same hooks the pool calls. No timing is asserted (the rate is bench/tls_handshake.py's job).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import ssl
import weakref
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import uvloop

from sidecar.clock import FakeClock
from sidecar.observe.stats import Stats
from sidecar.timers import Wheel
from sidecar.upstream import tls as tls_module
from sidecar.upstream import tls_native
from sidecar.upstream.pool import Pool, PoolSettings
from sidecar.upstream.tls import _RECAPTURE, TlsOrigin, _ResumingContext
from tests.harness import LOOPS
from tests.integration.tls_servers import NginxTlsUpstream, Pki
from tests.unit.test_pool import connect, eventually, request

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
SNI = "upstream.test"
CONNECTIONS = 40
CLOSED_CONNECTIONS = 5
WAIT = 10.0


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Iterator[Run[Any]]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner.run


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


class _Get(asyncio.Protocol):
    """One GET; done when the upstream closes (it closes after every response)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(f"GET / HTTP/1.1\r\nHost: {SNI}\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _ssl_pointer(sslobj: ssl.SSLObject) -> int:
    return tls_native._field(sslobj._sslobj, tls_native._SOCKET_SSL)  # type: ignore[attr-defined]


def _session_in_use(sslobj: ssl.SSLObject) -> int:
    """The `SSL_SESSION *` the connection holds, read without copying it (SSL_get_session)."""
    get = ctypes.CDLL(ssl._ssl.__file__).SSL_get_session  # type: ignore[attr-defined]
    get.argtypes, get.restype = [ctypes.c_void_p], ctypes.c_void_p
    return int(get(_ssl_pointer(sslobj)) or 0)


async def _connections(origin: TlsOrigin, port: int, n: int) -> list[tuple[bool, bool]]:
    """`n` connections one after another, each hooked as the pool hooks it: (resumed, whether
    the session offered was the cached object itself rather than a copy)."""
    loop = asyncio.get_running_loop()
    out = []
    for _ in range(n):
        context = cast(_ResumingContext, origin.context_for_connect())
        cached = context.sessions.get(SNI)
        # What a connection made now is handed, before any handshake could replace it.
        probe = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=SNI)
        shared = cached is not None and _session_in_use(probe) == tls_native._field(
            cached, tls_native._SESSION_PTR
        )
        transport, proto = await asyncio.wait_for(
            loop.create_connection(
                _Get, "127.0.0.1", port, ssl=context, server_hostname=origin.server_hostname
            ),
            WAIT,
        )
        sslobj = transport.get_extra_info("ssl_object")
        origin.on_connected(transport)
        await asyncio.wait_for(proto.done, WAIT)
        origin.capture_session(transport)  # what the pool's release does
        transport.close()
        out.append((bool(sslobj.session_reused), shared))
    return out


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "pure"])
def test_resumed_share_with_an_origin_closing_every_connection(
    run: Run[Any], pki: Pki, tmp_path: Path, version: str, native: bool
) -> None:
    with NginxTlsUpstream(tmp_path / "nginx", pki.server, version=version) as nginx:
        origin = TlsOrigin(sni=SNI, ca_file=pki.ca_file, native_sessions=native)
        got = run(_connections(origin, nginx.ports[0], CONNECTIONS))
        lines = nginx.wait_log_lines(CONNECTIONS)
    resumed = [r for r, _ in got]
    # The upstream's word agrees with ours, connection by connection.
    assert [line.reused for line in lines] == resumed
    assert {line.protocol for line in lines} == {version}
    assert resumed[0] is False
    assert sum(resumed[1:]) >= 0.95 * (CONNECTIONS - 1)
    assert origin.handshakes == {True: sum(resumed), False: CONNECTIONS - sum(resumed)}
    offered = [shared for _, shared in got[1:]]
    if native:
        # Offered by reference: no ASN.1 copy of the session and certificate per connection.
        assert all(offered)
    else:
        assert not any(offered)  # the pure path hands OpenSSL CPython's copy


def test_native_path_is_available_here() -> None:
    """CPython 3.11 with a dynamically linked _ssl (this machine, the image): the fast path must
    not silently fall back, or the handshake rate drops by a third."""
    assert tls_native.AVAILABLE
    assert tls_native.SessionOffer().enabled
    assert not tls_native.SessionOffer(enabled=False).enabled


def test_a_session_of_another_context_is_left_to_the_pure_path(
    run: Run[Any], pki: Pki, tmp_path: Path
) -> None:
    """The layout self-check and CPython's "different SSLContext" rule both hold natively."""
    with NginxTlsUpstream(tmp_path / "nginx", pki.server, version="TLSv1.2") as nginx:
        first = TlsOrigin(sni=SNI, ca_file=pki.ca_file)
        run(_connections(first, nginx.ports[0], 2))
    session = cast(_ResumingContext, first.context_for_connect()).sessions[SNI]
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    sslobj = other.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=SNI)
    fresh = tls_native.SessionOffer()
    assert fresh.offer(sslobj, session) is None  # the check on the first session fails...
    assert not fresh.enabled  # ...and turns the fast path off for that context
    checked = tls_native.SessionOffer()
    own = first.context_for_connect().wrap_bio(
        ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=SNI
    )
    assert checked.offer(own, session) is True
    assert checked.offer(sslobj, session) is None  # another context's session: not offered
    assert checked.enabled


def test_the_recapture_interval_reads_the_clock_seam(pki: Pki) -> None:
    clock = FakeClock()
    origin = TlsOrigin(sni=SNI, ca_file=pki.ca_file, clock=clock)
    context = cast(_ResumingContext, origin.context_for_connect())
    assert context.wants_session(SNI)
    context.captured_at[SNI] = clock.now()
    assert not context.wants_session(SNI)
    clock.advance(_RECAPTURE - 0.5)
    assert not context.wants_session(SNI)
    clock.advance(0.5)
    assert context.wants_session(SNI)


def test_peercert_extra_is_decoded_when_read(run: Run[Any], pki: Pki, tmp_path: Path) -> None:
    """The `peercert` extra both loops fill at handshake end is decoded only when read, and
    reads as the very dict `getpeercert()` always gave."""

    async def scenario(origin: TlsOrigin, port: int) -> tuple[Any, Any, bytes]:
        loop = asyncio.get_running_loop()
        transport, proto = await asyncio.wait_for(
            loop.create_connection(
                _Get, "127.0.0.1", port, ssl=origin.context_for_connect(),
                server_hostname=origin.server_hostname,
            ),
            WAIT,
        )
        peercert, sslobj = transport.get_extra_info("peercert"), transport.get_extra_info(
            "ssl_object"
        )
        await asyncio.wait_for(proto.done, WAIT)
        transport.close()
        return peercert, sslobj, bytes(proto.data)

    with NginxTlsUpstream(tmp_path / "nginx", pki.server, version="TLSv1.3") as nginx:
        verified = TlsOrigin(sni=SNI, ca_file=pki.ca_file)
        peercert, sslobj, data = run(scenario(verified, nginx.ports[0]))
        insecure = TlsOrigin(sni=SNI, insecure_skip_verify=True)
        unverified, _, _ = run(scenario(insecure, nginx.ports[0]))
    assert data.startswith(b"HTTP/1.1 200")
    expected = sslobj._sslobj.getpeercert()  # the C decoder, as ssl.SSLObject calls it
    assert expected and dict(peercert) == expected
    assert peercert["subjectAltName"] == expected["subjectAltName"]
    assert sslobj.getpeercert(binary_form=True) == sslobj._sslobj.getpeercert(True)
    assert unverified == {}


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_a_closed_tls_connection_frees_its_tls_state_at_once(
    run: Run[Any], pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    """A closed upstream connection must not wait for the cyclic collector to free its TLS
    transport: uvloop's SSLProtocol holds a 256 KiB read buffer (plus OpenSSL's SSL and BIOs),
    and under an origin closing every connection the garbage waiting for a collection kept
    ~100 MiB of heap (sidecar RSS 79 -> 105 MiB in 30 s; with the transport released at
    connection_lost, 58 MiB flat). The collector is off here: what is freed is freed by
    reference counting. The context keeps the newest connection's SSLObject by design."""
    alive: weakref.WeakSet[ssl.SSLObject] = weakref.WeakSet()

    class Tracked(tls_module._SSLObject):
        @classmethod
        def _create(cls, *args: Any, **kwargs: Any) -> Tracked:
            obj: Tracked = super()._create(*args, **kwargs)  # type: ignore[misc]
            alive.add(obj)
            return obj

    monkeypatch.setattr(_ResumingContext, "sslobject_class", Tracked)

    async def scenario(port: int) -> int:
        loop = asyncio.get_running_loop()
        origin = TlsOrigin(sni=SNI, ca_file=pki.ca_file)
        pool = Pool("c", "127.0.0.1", port, PoolSettings(), Stats().cluster("c"), loop,
                    Wheel(loop), origin)
        for _ in range(CLOSED_CONNECTIONS):
            conn = await connect(pool)
            head = await request(pool, conn)  # nginx answers Connection: close
            assert head.status == 200
        # Bounded poll: uvloop frees a closed handle on a later loop iteration.
        await eventually(lambda: not pool.total and len(alive) <= 1, WAIT)
        return len(alive)

    gc.collect()
    gc.disable()
    try:
        with NginxTlsUpstream(tmp_path / "nginx", pki.server, version=version) as nginx:
            left = run(scenario(nginx.ports[0]))
    finally:
        gc.enable()
    assert left <= 1
