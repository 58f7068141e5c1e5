"""A TLS cluster offers the endpoint only the protocols the upstream leg speaks.

`protocol: auto` (the default) configures ALPN `h2, http/1.1` (SPEC section 11), and a user may
write `alpn: [h2, http/1.1]`. Until the HTTP/2 upstream exists, an endpoint that prefers h2 must
be steered to HTTP/1.1 by the handshake, not be handed HTTP/1.1 bytes on a connection it agreed
to speak HTTP/2 on. The endpoint here is a real TLS server (Python's ssl, preferring h2, as nginx
and most gRPC servers do) that records the protocol each handshake selected and the raw request
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
    """Prefers h2 in ALPN; records each handshake's selected protocol and the request head."""

    def __init__(self, context: ssl.SSLContext) -> None:
        context.set_alpn_protocols(["h2", "http/1.1"])
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


@pytest.fixture
def upstream(pki: Pki) -> Iterator[AlpnUpstream]:
    with AlpnUpstream(server_context(pki.server)) as server:
        yield server


def config(port: int, pki: Pki, tls: dict[str, Any]) -> dict[str, Any]:
    return {
        "listeners": [{"name": "egress", "protocol": "http", "cluster": "up"}],
        "clusters": [
            {
                "name": "up",
                "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{port}"]},
                "tls": {"enabled": True, "ca_file": str(pki.ca_file), "sni": SNI, **tls},
            }
        ],
        "drain": {"grace": "2s", "accept_period": "0s"},
    }


@pytest.mark.parametrize(
    "tls",
    [{}, {"alpn": ["h2", "http/1.1"]}],
    ids=["auto-default", "explicit-h2-first"],
)
def test_an_h2_preferring_endpoint_is_spoken_to_in_http1(
    upstream: AlpnUpstream, pki: Pki, loop: str, tls: dict[str, Any]
) -> None:
    sidecar = Sidecar(config(upstream.port, pki, tls), loop=loop, wait_ready=False)
    try:
        sidecar.wait_ready()
        conn = http.client.HTTPConnection("127.0.0.1", sidecar.port("egress"), timeout=10)
        try:
            conn.request("GET", "/alpn", headers={"Host": SNI})
            answer = conn.getresponse()
            assert (answer.status, answer.read()) == (200, b"ok")
        finally:
            conn.close()
        # What the sidecar reports it configured: SPEC's list, h2 first.
        shown = json.loads(http_get(f"{sidecar.admin}/config")[1])
        assert shown["clusters"][0]["tls"]["alpn"] == ["h2", "http/1.1"]
    finally:
        sidecar.stop()
    assert upstream.selected == ["http/1.1"], upstream.selected
    assert upstream.heads[0].startswith(b"GET /alpn HTTP/1.1\r\n")
