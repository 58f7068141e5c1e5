"""`discovery: {type: static, endpoints: [...]}`: one Reset, then nothing ever changes."""

from __future__ import annotations

import asyncio

from sidecar.discovery.endpoints import Emit, Endpoint, Reset


def parse_hostport(text: str) -> tuple[str, int]:
    """"10.1.2.3:8443" or "[::1]:8443" -> (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":"))
    host, _, port = text.rpartition(":")
    return host, int(port)


class StaticResolver:
    def __init__(self, endpoints: list[str]) -> None:
        self._endpoints = tuple(Endpoint(*parse_hostport(e)) for e in endpoints)

    async def run(self, emit: Emit) -> None:
        emit(Reset(self._endpoints))
        await asyncio.Event().wait()  # nothing more will ever change; wait for cancellation
