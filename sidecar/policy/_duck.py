"""Reading durations and sizes from duck-typed config objects, whatever type the model chose."""

from __future__ import annotations

from typing import Any


def seconds(value: Any) -> float:
    """A duration as float seconds: a number, or anything with `total_seconds()` (timedelta)."""
    total = getattr(value, "total_seconds", None)
    if callable(total):
        return float(total())
    return float(value)
