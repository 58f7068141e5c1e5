"""Log lines on stderr: one JSON object per line (`ts`, `level`, `event`, fields), or text."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{ts} {record.levelname:<7} {record.getMessage()} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(fmt: str = "json", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log is off (we log the data path ourselves).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    logger.log(level, message, extra={"fields": fields})


class Throttled:
    """A log line that can flood (the same failure for every request) written at most once per
    `interval` seconds per site; the lines held back are counted and the count rides on the next
    one. Sites are fixed strings chosen in the code, so the tables stay small."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(
        self,
        site: str,
        level: int,
        message: str,
        exc: BaseException | None = None,
        **fields: Any,
    ) -> bool:
        """Write the line (True) or count it as held back (False)."""
        now = self._clock()
        last = self._last.get(site)
        if last is not None and now - last < self._interval:
            self._held[site] = self._held.get(site, 0) + 1
            return False
        self._last[site] = now
        held = self._held.pop(site, 0)
        self._logger.log(
            level,
            message,
            exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
            extra={"fields": {"site": site, "suppressed": held, **fields}},
        )
        return True
