"""Measure event loop lag: how late a timer fires, observed into a stats histogram."""

from __future__ import annotations

import asyncio

from sidecar.observe.stats import Histogram


async def watch_loop_lag(hist: Histogram, interval: float = 0.25) -> None:
    """Sleep `interval` over and over and observe how late each wake-up was; runs until
    cancelled. A callback that blocks the loop (sync DNS, a big JSON dump) shows up here as
    lag, long before it shows up as request latency."""
    loop = asyncio.get_running_loop()
    while True:
        # The loop's own clock: the one its timers are scheduled on, so only lateness remains.
        start = loop.time()
        await asyncio.sleep(interval)
        # Never negative: the loop may wake a hair early (it rounds to its clock resolution).
        hist.observe(max(0.0, loop.time() - start - interval))
