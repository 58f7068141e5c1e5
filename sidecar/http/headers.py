"""Header rules of RFC 9110/9112 that a proxy must apply: hop-by-hop fields and their tokens."""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]

# Fields that describe one hop and never travel further (RFC 9110 7.6.1), plus the
# de-facto `proxy-connection` and the proxy-auth fields meant for this proxy.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"content-length",  # re-emitted by the writer from the framing it chose
    }
)


def connection_tokens(value: bytes) -> set[bytes]:
    """The lowercased tokens of a `Connection` field value."""
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def parse_keep_alive_timeout(value: bytes) -> float | None:
    """`Keep-Alive: timeout=5, max=100` -> 5.0; None when absent or malformed."""
    for part in value.split(b","):
        name, _, arg = part.strip().partition(b"=")
        if name.strip().lower() == b"timeout":
            try:
                seconds = float(arg.strip().strip(b'"'))
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


def end_to_end(headers: Headers, connection_named: frozenset[bytes] | set[bytes]) -> Headers:
    """The fields of `headers` that are forwarded: hop-by-hop ones and any field the
    `Connection` header named are dropped (RFC 9110 7.6.1)."""
    if connection_named:
        return [
            (n, v)
            for n, v in headers
            if (low := n.lower()) not in HOP_BY_HOP and low not in connection_named
        ]
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP]
