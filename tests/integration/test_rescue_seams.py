"""Issue 18 finding 3, the class rather than the two repros: an unexpected exception at any seam
where a callback enters the sidecar (a pool hand-over from a connect task, an upstream read, a
timer) gets the app an answer (502 `internal` after routing), never a silently closed or
hanging connection, and is counted.

The sidecar runs in-process (its `App`, on the default loop) so that a fault can be injected:
no real part raises on demand, so the method named in each case is replaced by one that raises
(pytest's monkeypatch), and that replacement is the only mock here. The origin is a real
socket server on 127.0.0.1 that records every byte.

Compiled, `Exchange` is a native class whose methods are called through its vtable, so a
replacement set on the class is never called: these run in the SIDECAR_PURE=1 pass of
scripts/check, on the same source.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sidecar._build import compiled
from sidecar.app import App
from sidecar.downstream.exchange import Exchange
from tests.harness import LOOPS, app_in_process, run_loop

TIMEOUT = 10.0


class Origin:
    """Answers `200 ok` to each request head, except `/hang` (never answered) and `/close`
    (the connection is closed instead)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    self.received += head
                    line = head.split(b"\r\n", 1)[0]
                    if b" /close " in line:
                        break
                    if b" /hang " not in line:
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


async def ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), TIMEOUT)  # until the sidecar closes
    finally:
        writer.close()


def run_with_sidecar(test: Callable[[App, Origin, int], Awaitable[None]], loop: str) -> None:
    async def main() -> None:
        origin = Origin()
        await origin.start()
        cluster = {"discovery": {"type": "static", "endpoints": [f"127.0.0.1:{origin.port}"]}}
        try:
            async with app_in_process(cluster) as (app, port):
                await asyncio.wait_for(test(app, origin, port), 3 * TIMEOUT)
        finally:
            assert origin.server is not None
            origin.server.close()

    run_loop(loop, main)


def answer(raw: bytes) -> tuple[int, str, dict[str, Any]]:
    assert raw, "the connection closed without an answer"
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    code = next(line.split(":", 1)[1].strip() for line in lines
                if line.lower().startswith("x-sidecar-error:"))
    return int(lines[0].split()[1]), code, json.loads(body)


def _boom(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("injected")


@pytest.mark.skipif(compiled(), reason="by design: compiled methods cannot be replaced; runs in "
                    "the SIDECAR_PURE=1 pass of scripts/check")
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("_attach", "/x"),  # the pool hands a new connection over from its connect task
        ("on_response_head", "/x"),  # an upstream read, under the response parser
        ("on_upstream_error", "/close"),  # the upstream closed: its EOF reaches the exchange
        ("on_deadline", "/hang"),  # a timer: the request deadline fires on the wheel
    ],
)
def test_an_exception_at_a_seam_gets_502_internal(
    loop: str, method: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Exchange, method, _boom)

    async def test(app: App, origin: Origin, port: int) -> None:
        raw = await ask(port, b"GET %s HTTP/1.1\r\nHost: up\r\nx-sidecar-timeout-ms: 300\r\n"
                        b"x-sidecar-retry-attempts: 1\r\n\r\n" % path.encode())
        status, code, body = answer(raw)
        assert (status, code) == (502, "internal")
        assert body["cluster"] == "up" and "RuntimeError" in body["detail"]
        assert app.stats.listeners["l"].internal_errors == 1
        # The sidecar goes on serving (a new connection: that one was closed after the answer).
        monkeypatch.undo()
        raw = await ask(port, b"GET /ok HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200")

    run_with_sidecar(test, loop)
