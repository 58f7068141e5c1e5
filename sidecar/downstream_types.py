"""Shapes shared across layers without an upward import (structural types only)."""

from __future__ import annotations

from typing import Protocol


class ForwardTargetLike(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def cluster(self) -> str: ...
