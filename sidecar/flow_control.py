"""Pause a transport's reading for any of several independent reasons; resume when none is left.

A downstream socket may be paused because the upstream's write buffer is full, because its
request waits for a pooled connection, or because a pipelined request waits its turn; each
reason clears on its own. A bit per reason keeps them from resuming each other by mistake.
"""

from __future__ import annotations

import asyncio
from typing import Final

PEER_WRITE_FULL: Final = 1  # the other leg's write buffer is above its high-water mark
WAITING_UPSTREAM: Final = 2  # the request has no upstream connection yet
PIPELINED: Final = 4  # a further request arrived while one is in progress


class ReadGate:
    __slots__ = ("_transport", "_reasons")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reasons = 0

    def pause(self, reason: int) -> None:
        if not self._reasons:
            try:
                self._transport.pause_reading()
            except (RuntimeError, AttributeError):
                return  # closing transport
        self._reasons |= reason

    def resume(self, reason: int) -> None:
        if not self._reasons & reason:
            return
        self._reasons &= ~reason
        if not self._reasons:
            try:
                self._transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass


# Write buffer limits on both legs: enough to keep a 10 Gbit pipe busy per connection on
# loopback, small enough that 10 000 connections cannot hold gigabytes.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
