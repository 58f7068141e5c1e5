"""Header rules of RFC 9110/9112 that a proxy must apply: hop-by-hop fields and their tokens."""

from __future__ import annotations

from typing import Final

Headers = list[tuple[bytes, bytes]]

# Fields that describe one hop and never travel further (RFC 9110 7.6.1), plus the
# de-facto `proxy-connection` and the proxy-auth fields meant for this proxy.
HOP_BY_HOP: Final = frozenset(
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


_TOKENS_CACHE: Final[dict[bytes, frozenset[bytes]]] = {}
# Values seen are few (keep-alive, close, upgrade); a bound for the rest.
_TOKENS_CACHE_MAX: Final = 256


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lowercased tokens of a `Connection` field value (cached: nearly every message
    carries one of a handful of values)."""
    tokens = _TOKENS_CACHE.get(value)
    if tokens is None:
        tokens = frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
        if len(_TOKENS_CACHE) < _TOKENS_CACHE_MAX:
            _TOKENS_CACHE[value] = tokens
    return tokens


class FieldKinds(dict[bytes, int]):
    """What a proxy does with a field, by its name *as received*: `kinds[name]` is one dict
    lookup per field on the hot path instead of a `lower()` and a set test. Kind 0 means
    "forward unchanged"; others are given by `table` (lowercase name -> kind). Spellings are
    remembered up to a bound, so random names sent by a peer cannot grow it without limit.

    `lookalike` (non-zero): the kind of a name with underscores whose `-` spelling is in
    `table` (`Transfer_Encoding`); decided once per spelling, like the rest."""

    __slots__ = ("_table", "_max", "_lookalike")

    def __init__(
        self, table: dict[bytes, int], max_spellings: int = 4096, lookalike: int = 0
    ) -> None:
        super().__init__()
        self._table = table
        self._max = max_spellings
        self._lookalike = lookalike

    def __missing__(self, name: bytes) -> int:
        low = name.lower()
        kind = self._table.get(low, 0)
        if not kind and self._lookalike and b"_" in low and low.replace(b"_", b"-") in self._table:
            kind = self._lookalike
        if len(self) < self._max:
            self[name] = kind
        return kind


def parse_keep_alive_timeout(value: bytes) -> float | None:
    """`Keep-Alive: timeout=5, max=100` -> 5.0; None when absent or malformed. ASCII digits
    with an optional fraction only: `float()` alone would also take `1_0`, `inf`, `nan`, `1e3`
    and non-ASCII digits."""
    for part in value.split(b","):
        name, _, arg = part.strip().partition(b"=")
        if name.strip().lower() == b"timeout":
            whole, dot, fraction = arg.strip().strip(b'"').partition(b".")
            if not whole.isdigit() or (dot and not fraction.isdigit()) or len(whole) > 9:
                return None  # bytes.isdigit() is ASCII-only
            return float(whole + dot + fraction)
    return None

