"""The values discovery speaks (after linkerd2-proxy's resolve.rs): Reset/Add/Remove/DoesNotExist.

A resolver knows nothing of clusters; a cluster knows nothing of where endpoints came from.
A resolver calls `emit(delta)` synchronously from the event loop; the cluster applies it at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address traffic can go to. `ready` False or `terminating` True: no new requests."""

    ip: str
    port: int
    ready: bool = True
    terminating: bool = False
    hostname: str | None = None  # e.g. the pod name, for logs
    zone: str | None = None

    @property
    def key(self) -> str:
        """"ip:port", with IPv6 in brackets: the `endpoint` metric label and the pool key."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @property
    def serving(self) -> bool:
        return self.ready and not self.terminating


@dataclass(frozen=True, slots=True)
class Reset:
    """The complete current set; anything not in it is gone."""

    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Add:
    """New endpoints, or new conditions for known ones (same key)."""

    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Remove:
    """Endpoints gone, by key ("ip:port")."""

    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DoesNotExist:
    """The named service does not exist (yet). Treated as an empty set."""


Delta = Reset | Add | Remove | DoesNotExist
Emit = Callable[[Delta], None]


class Resolver(Protocol):
    """Runs until cancelled, calling `emit` for every change. Errors are its own to log, count
    and retry; it never raises out except on cancellation. Before its first successful answer it
    emits nothing, and a cluster that has never had an answer is not ready."""

    async def run(self, emit: Emit) -> None: ...


def apply_delta(current: dict[str, Endpoint], delta: Delta) -> dict[str, Endpoint]:
    """The endpoint set after `delta`, as a new dict keyed by `Endpoint.key`."""
    if isinstance(delta, Reset):
        return {ep.key: ep for ep in delta.endpoints}
    if isinstance(delta, DoesNotExist):
        return {}
    out = dict(current)
    if isinstance(delta, Add):
        for ep in delta.endpoints:
            out[ep.key] = ep
    else:
        for key in delta.keys:
            out.pop(key, None)
    return out
