"""Coarse deadlines for many objects with few timers: a bucketed wheel on the event loop.

Every app connection has a deadline (head, idle or request timeout) that moves with each
request. A loop timer per request would cost an allocation and a heap operation each time;
here an object is filed under the bucket of its deadline only when that bucket is *earlier*
than the one it is already filed under. When a bucket fires, each object in it checks its own
current deadline: passed -> `on_deadline(now)`; later -> it is filed again. A keep-alive
connection serving thousands of requests a second is thus filed about once per timeout
period, not once per request. Precision is one tick (50 ms), ample for timeouts in seconds.

An object that is done (a closed connection, a served waiter) calls `cancel`: the wheel would
otherwise hold it, and everything it references, until its bucket fires, which for an idle
timeout is minutes away. At thousands of new connections a second that is hundreds of
thousands of dead objects kept alive into the collector's oldest generation, and one full
collection freeing them all at once stalled the loop for over a second.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final

from mypy_extensions import trait

TICK: Final = 0.05


@trait
class Timed:
    """What the wheel files. A trait (mypyc's interface), not a `typing.Protocol`: compiled,
    the wheel then reads these fields at fixed offsets instead of looking them up by name."""

    # The time at which `on_deadline` should run, or inf for none. Kept by the object itself.
    deadline: float
    # The bucket the object is filed under (0 when none); managed by the wheel.
    filed_bucket: int

    def on_deadline(self, now: float) -> None:
        raise NotImplementedError


class Wheel:
    __slots__ = ("_loop", "_buckets")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # bucket -> the objects filed under it, a dict used as an insertion-ordered set so
        # that `cancel` is O(1).
        self._buckets: dict[int, dict[Timed, None]] = {}

    def schedule(self, obj: Timed) -> None:
        """Call after changing `obj.deadline`. O(1); usually does nothing."""
        deadline = obj.deadline
        if deadline == math.inf:
            return
        bucket = int(deadline / TICK) + 1
        filed = obj.filed_bucket
        if filed and filed <= bucket:
            return  # it fires earlier anyway and will re-file itself
        obj.filed_bucket = bucket
        if filed:
            self._unfile(obj, filed)  # moved earlier: out of the later bucket
        entries = self._buckets.get(bucket)
        if entries is None:
            self._buckets[bucket] = {obj: None}
            self._loop.call_at(bucket * TICK, self._fire, bucket)
        else:
            entries[obj] = None

    def cancel(self, obj: Timed) -> None:
        """`obj` needs no deadline any more: forget it now. O(1); safe to repeat, and safe
        from inside `on_deadline` (the bucket being fired skips it). The caller keeps its own
        `deadline` (mypyc 2.4 cannot compile a float attribute set through a trait)."""
        filed = obj.filed_bucket
        if filed:
            obj.filed_bucket = 0
            self._unfile(obj, filed)

    def _unfile(self, obj: Timed, bucket: int) -> None:
        entries = self._buckets.get(bucket)
        if entries is not None:  # None: that bucket is firing now, or has fired
            entries.pop(obj, None)

    def _fire(self, bucket: int) -> None:
        entries = self._buckets.pop(bucket, None)
        if not entries:
            return
        now = self._loop.time()
        for obj in entries:
            if obj.filed_bucket != bucket:
                continue  # re-filed earlier since; that bucket handled it
            obj.filed_bucket = 0
            if obj.deadline <= now:
                try:
                    obj.on_deadline(now)
                except Exception:  # one broken object must not stop the others' timeouts
                    import logging

                    logging.getLogger("sidecar.timers").exception("deadline handler failed")
            elif obj.deadline != math.inf:
                self.schedule(obj)

    def __len__(self) -> int:
        return sum(len(v) for v in self._buckets.values())
