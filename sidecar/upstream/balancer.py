"""Choosing an endpoint per request: round robin, least request (power of two choices), random."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar, assert_never

if TYPE_CHECKING:
    from sidecar.config import LoadBalancer


class Loaded(Protocol):
    @property
    def inflight(self) -> int: ...


T = TypeVar("T", bound=Loaded)


class RoundRobin:
    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = random.randrange(1 << 16)  # sidecars of many pods don't all start at [0]

    def pick(self, candidates: Sequence[T], avoid: T | None = None) -> T:
        n = len(candidates)
        i = self._next % n
        self._next = i + 1
        choice = candidates[i]
        if choice is avoid and n > 1:
            choice = candidates[(i + 1) % n]
            self._next = i + 2
        return choice


class LeastRequest:
    """Power of two choices (Mitzenmacher): two random candidates, the one with fewer requests
    in flight. Nearly as good as a full scan, O(1), and no herd onto one idle endpoint."""

    __slots__ = ()

    def pick(self, candidates: Sequence[T], avoid: T | None = None) -> T:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        if n == 2:
            a, b = candidates[0], candidates[1]
        else:
            i = random.randrange(n)
            j = random.randrange(n - 1)
            if j >= i:
                j += 1
            a, b = candidates[i], candidates[j]
        if a is avoid:
            return b
        if b is avoid:
            return a
        if a.inflight == b.inflight:
            return a if random.random() < 0.5 else b
        return a if a.inflight < b.inflight else b


class Random:
    __slots__ = ()

    def pick(self, candidates: Sequence[T], avoid: T | None = None) -> T:
        choice = candidates[random.randrange(len(candidates))]
        if choice is avoid and len(candidates) > 1:
            return self.pick([c for c in candidates if c is not avoid])
        return choice


def make_balancer(kind: LoadBalancer) -> RoundRobin | LeastRequest | Random:
    """The balancer a cluster's `load_balancer` names. The config admits only these names, and
    mypy checks that each has its case: a new one cannot fall through to a silent default."""
    match kind:
        case "round_robin":
            return RoundRobin()
        case "least_request":
            return LeastRequest()
        case "random":
            return Random()
        case _:
            assert_never(kind)
