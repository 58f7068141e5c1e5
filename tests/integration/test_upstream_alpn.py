"""A TLS cluster speaks what the handshake chose, and offers only what it may speak.

`protocol: auto` (the default) configures ALPN `h2, http/1.1` (SPEC section 11) and the
endpoint's choice is used: an endpoint that speaks only HTTP/1.1 gets HTTP/1.1 (one that prefers
h2 gets HTTP/2: tests/integration/test_h2_upstream.py). `protocol: http1` offers only
`http/1.1`, so an endpoint that prefers h2 is steered to HTTP/1.1 by the handshake, never handed
HTTP/1.1 bytes on a connection it agreed to speak HTTP/2 on. The endpoint here is a real TLS
server (Python's ssl) that records the protocol each handshake selected and the raw request
bytes; the sidecar is the real process, on both loops.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import LOOPS, Sidecar, http_get
from tests.integration.tls_servers import Pki, ThreadedTlsUpstream, server_context

SNI = "upstream.test"


class AlpnUpstream(ThreadedTlsUpstream):
    """Offers `alpn` (h2 first: preferring it); records each handshake's selected protocol and
    the request head."""

    def __init__(self, context: ssl.SSLContext, alpn: list[str]) -> None:
        context.set_alpn_protocols(alpn)
        super().__init__(context)
        self.selected: list[str | None] = []
        self.heads: list[bytes] = []

    def _answer(self, tls: ssl.SSLSocket) -> None:
        self.selected.append(tls.selected_alpn_protocol())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(4096)
            if not chunk:
                break
            head += chunk
        self.heads.append(head)
        tls.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        tls.unwrap()


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


CASES: dict[str, tuple[list[str], dict[str, Any], list[str]]] = {
    # endpoint's ALPN, the cluster's settings, the ALPN the sidecar says it configured
    "http1-steers-an-h2-endpoint": (["h2", "http/1.1"], {"protocol": "http1"}, ["http/1.1"]),
    "auto-to-an-http1-only-endpoint": (["http/1.1"], {}, ["h2", "http/1.1"]),
    "explicit-alpn-to-an-http1-only-endpoint": (
        ["http/1.1"], {"tls": {"alpn": ["h2", "http/1.1"]}}, ["h2", "http/1.1"]),
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[list[str], dict[str, Any], list[str]]:
    return CASES[str(request.param)]


@pytest.fixture
def upstream(pki: Pki, case: tuple[list[str], dict[str, Any], list[str]]
             ) -> Iterator[AlpnUpstream]:
    with AlpnUpstream(server_context(pki.server), case[0]) as server:
        yield server


def config(port: int, pki: Pki, extra: dict[str, Any]) -> dict[str, Any]:
    tls = extra.get("tls", {})
    rest = {k: v for k, v in extra.items() if k != "tls"}
    return {
        "listeners": [{"name": "egress", "protocol": "http", "cluster": "up"}],
        "clusters": [
            {
                "name": "up",
                "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{port}"]},
                "tls": {"enabled": True, "ca_file": str(pki.ca_file), "sni": SNI, **tls},
                **rest,
            }
        ],
        "drain": {"grace": "2s", "accept_period": "0s"},
    }


def test_http1_when_the_handshake_chose_it(
    upstream: AlpnUpstream, pki: Pki, loop: str,
    case: tuple[list[str], dict[str, Any], list[str]],
) -> None:
    sidecar = Sidecar(config(upstream.port, pki, case[1]), loop=loop, wait_ready=False)
    try:
        sidecar.wait_ready()
        conn = http.client.HTTPConnection("127.0.0.1", sidecar.port("egress"), timeout=10)
        try:
            conn.request("GET", "/alpn", headers={"Host": SNI})
            answer = conn.getresponse()
            assert (answer.status, answer.read()) == (200, b"ok")
        finally:
            conn.close()
        # What the sidecar reports it configured (auto: SPEC's list, h2 first).
        shown = json.loads(http_get(f"{sidecar.admin}/config")[1])
        assert shown["clusters"][0]["tls"]["alpn"] == case[2]
    finally:
        sidecar.stop()
    assert upstream.selected == ["http/1.1"], upstream.selected
    assert upstream.heads[0].startswith(b"GET /alpn HTTP/1.1\r\n")
