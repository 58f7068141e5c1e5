"""What a cluster says about its upstream HTTP/2 connections (SPEC section 4 `http2`), in a
module of its own: the pool and the cluster hold it without importing the HTTP/2 upstream
(sidecar/upstream/http2.py and the nghttp2 binding under it load only when a connection to an
endpoint speaks HTTP/2: about 2 MiB and 50 ms of import a sidecar without HTTP/2 never pays)."""

from __future__ import annotations


class H2Settings:
    """What a cluster says about its upstream HTTP/2 connections (SPEC section 4 `http2`)."""

    __slots__ = ("max_concurrent_streams", "keepalive_interval", "keepalive_timeout",
                 "scheme", "initial_window")

    def __init__(
        self,
        max_concurrent_streams: int = 100,
        keepalive_interval: float = 30.0,
        keepalive_timeout: float = 5.0,
        scheme: bytes = b"http",
        initial_window: int = 1 << 20,
    ) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.scheme = scheme
        self.initial_window = initial_window
