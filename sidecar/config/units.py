"""Durations ("250ms", "1m30s") and sizes ("64KiB"): parsing, formatting, and the
`Duration` / `Size` field types that read the one and show the other."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_DURATION_FULL = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)(?:ms|s|m|h))+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "5s", "2m", "1h", "1m30s", "1.5s", or a bare number of seconds."""
    if isinstance(value, bool):  # bool is an int: `timeout: true` must not mean 1 second
        raise ValueError("expected a duration like 250ms, 5s, 2m; got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"duration {value!r} must not be negative")
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION_FULL.fullmatch(text):
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(
                f"invalid duration {value!r}: use a number with a unit (ms, s, m, h), "
                "e.g. 250ms, 5s, 2m"
            )
    else:
        raise ValueError(f"expected a duration like 250ms, 5s, 2m; got {_kind(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"duration {value!r} must be finite")
    if seconds < 0:
        raise ValueError(f"duration {value!r} must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of `parse_duration`, in the largest unit that is exact: 0.25 -> "250ms"."""
    millis = round(seconds * 1000, 6)
    if millis != int(millis):  # sub-millisecond: rare, but must round-trip
        return f"{millis:.6f}".rstrip("0").rstrip(".") + "ms"
    whole = int(millis)
    if whole == 0:
        return "0s"
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}ms"


_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?")


def parse_size(value: object) -> int:
    """Bytes from "64KiB", "1MiB", "512B", "1KB" (1000 bytes), or a bare integer."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 64KiB or 1MiB; got a boolean")
    if isinstance(value, int):
        size: float = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"size {value!r} must be finite")
        size = value
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"size {value!r} must not be negative")
        match = _SIZE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"invalid size {value!r}: use bytes or a unit (B, KB, MB, GB, KiB, MiB, GiB), "
                "e.g. 64KiB"
            )
        size = float(match[1]) * _SIZE_UNITS[match[2] or "B"]
    else:
        raise ValueError(f"expected a size like 64KiB or 1MiB; got {_kind(value)}")
    if size < 0:
        raise ValueError(f"size {value!r} must not be negative")
    if size != int(size):
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(size)


def format_size(size: int) -> str:
    """The inverse of `parse_size`, in the largest binary unit that is exact: 65536 -> "64KiB"."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


# Floats and ints in Python; strings like "250ms" / "64KiB" in YAML and in JSON dumps, so that
# `model_dump(mode="json")` is what `/config` shows and it parses back to the same config.
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
]


def _parse_grace(value: object) -> float | str:
    if value == "auto":
        return "auto"
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("grace must be greater than 0s (or auto)")
    return seconds


def _format_grace(value: float | str) -> str:
    return value if isinstance(value, str) else format_duration(value)


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
