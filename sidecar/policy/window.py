"""A rolling window of two counters in time buckets: O(1) per event, no allocation, no timers.

Why buckets and not a deque of timestamps: a deque costs an allocation per event and an
unbounded trim under load; a fixed ring of `n` buckets costs two integer additions per event.
The price is granularity: the window covers the current bucket plus the `n - 1` before it, so an
event leaves the window between `width * (n - 1)` and `width * n` seconds after it happened.
"""

from __future__ import annotations


class RollingCounts:
    """Two event counts (`a`, `b`) over the last `window` seconds, in `buckets` time buckets.

    `a` and `b` are the live totals over the window, kept up to date incrementally so that
    reading them is free. Callers must call `roll(now)` (or `add`) before reading them.
    """

    __slots__ = ("_width", "_n", "_a", "_b", "_epoch", "_idx", "_until", "a", "b")

    def __init__(self, window: float, buckets: int = 10) -> None:
        if window <= 0 or buckets < 1:
            raise ValueError("window must be > 0 and buckets >= 1")
        self._width = window / buckets
        self._n = buckets
        self._a = [0] * buckets
        self._b = [0] * buckets
        self._epoch: int | None = None  # bucket number (now // width) of the current bucket
        self._idx = 0
        self._until = -1.0  # when the current bucket ends: before it, no roll is needed
        self.a = 0
        self.b = 0

    def roll(self, now: float) -> None:
        """Move the window to `now`, dropping buckets that fell out of it."""
        epoch = int(now // self._width)
        if epoch != self._epoch:
            self._advance(epoch)

    def add(self, now: float, a: int, b: int) -> None:
        if not now < self._until:
            epoch = int(now // self._width)
            if epoch != self._epoch:
                self._advance(epoch)
        i = self._idx
        self._a[i] += a
        self._b[i] += b
        self.a += a
        self.b += b

    def _advance(self, epoch: int) -> None:
        last = self._epoch
        n = self._n
        if last is None or epoch - last >= n:
            self.clear()
        elif epoch < last:
            # The clock went backwards (it should not: it is monotonic). Keep counting into the
            # current bucket rather than corrupting the ring.
            return
        else:
            a, b = self._a, self._b
            for e in range(last + 1, epoch + 1):
                i = e % n
                self.a -= a[i]
                self.b -= b[i]
                a[i] = 0
                b[i] = 0
        self._epoch = epoch
        self._idx = epoch % n
        self._until = (epoch + 1) * self._width

    def clear(self) -> None:
        n = self._n
        self._a[:] = [0] * n
        self._b[:] = [0] * n
        self.a = 0
        self.b = 0

    def __repr__(self) -> str:
        return f"<RollingCounts a={self.a} b={self.b} width={self._width:g}s x{self._n}>"
