"""`discovery: {type: dns, ...}`: getaddrinfo on a jittered timer, a Reset on each new answer."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator

from tenacity import RetryCallState, Retrying, wait_random_exponential

from sidecar.discovery.endpoints import Emit, Endpoint, Reset
from sidecar.discovery.stats import DiscoveryStats
from sidecar.log import Throttled

log = logging.getLogger(__name__)
# A failing name is retried every few seconds, and a forward proxy may have hundreds: one
# line per interval per site (a configured host, or all forward-proxy names together).
_FAIL_LOG = Throttled(log, interval=10.0)

_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def ip_literal(host: str) -> str | None:
    """The canonical text of `host` if it is an IP address ("[::1]" too), else None."""
    try:
        return str(ipaddress.ip_address(host[1:-1] if host.startswith("[") else host))
    except ValueError:
        return None


def sort_key(ip: str) -> tuple[int, int, str]:
    """IPv4 before IPv6, then numeric order: a stable, readable order for Reset tuples."""
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr), ip


def backoff_delays(initial: float, cap: float) -> Iterator[float]:
    """Delays before each retry: tenacity's random exponential, used as a pure policy object.

    Drawn from [initial, min(cap, initial * 2**n)]: never zero (no hot loop on a dead resolver),
    and still spread at the cap, so many sidecars failing together do not retry in lockstep.
    Start a new iterator to reset after a success."""
    wait = wait_random_exponential(multiplier=initial, min=initial, max=max(initial, cap))
    state = RetryCallState(Retrying(), None, (), {})
    while True:
        yield wait(state)
        state.attempt_number += 1


class DnsResolver:
    """Resolves A and AAAA records for `host` every `refresh` seconds (±10% jitter).

    Emits `Reset` of the sorted unique endpoints at the first answer and whenever the answer
    changes; on failure keeps the last endpoints (emits nothing), counts the error and retries
    with backoff, sooner than `refresh`. IP literals are answered without a lookup.
    """

    def __init__(
        self,
        host: str,
        port: int,
        refresh: float,
        *,
        stats: DiscoveryStats | None = None,
        timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        on_unresolved: Callable[[str], None] | None = None,
        log_site: str | None = None,
    ) -> None:
        if refresh <= 0:
            raise ValueError(f"refresh must be positive, got {refresh!r}")
        self.host = host
        self.port = port
        self.refresh = refresh
        self.stats = stats if stats is not None else DiscoveryStats()
        self._timeout = timeout
        # Called when a lookup fails before any answer: the owner may give up on the name
        # (the forward proxy does, so unknown names are not retried in a loop).
        self._on_unresolved = on_unresolved
        self._log_site = log_site or f"dns:{host}"
        # A failing name is retried sooner than `refresh`, but never more often than it: a tiny
        # refresh (tests) keeps tiny retries, a long one (300s) still recovers within the cap.
        self._backoff_initial = min(backoff_initial, refresh)
        self._backoff_max = min(backoff_max, max(refresh, self._backoff_initial))

    async def run(self, emit: Emit) -> None:
        literal = ip_literal(self.host)
        if literal is not None:
            self._answered(emit, (Endpoint(literal, self.port),), None)
            await asyncio.Event().wait()  # an address never changes; wait for cancellation

        last: tuple[Endpoint, ...] | None = None
        delays = backoff_delays(self._backoff_initial, self._backoff_max)
        while True:
            try:
                endpoints = await self._resolve()
                last = self._answered(emit, endpoints, last)
            except TimeoutError:
                self._failed("timeout", "getaddrinfo timed out", last)
                delay = next(delays)
            except (OSError, UnicodeError) as exc:
                # socket.gaierror is an OSError; UnicodeError is a name IDNA cannot encode.
                self._failed("resolve", str(exc) or type(exc).__name__, last)
                delay = next(delays)
            except Exception:
                # Never out of run(): a bug must not end discovery for the cluster.
                self.stats.error("unexpected")
                log.exception("dns_resolve_unexpected", extra={"host": self.host})
                delay = next(delays)
            else:
                delays = backoff_delays(self._backoff_initial, self._backoff_max)
                delay = self.refresh * random.uniform(0.9, 1.1)
            await asyncio.sleep(delay)

    async def _resolve(self) -> tuple[Endpoint, ...]:
        # The loop's getaddrinfo runs the blocking libc call off the loop (a thread on asyncio,
        # libuv's pool on uvloop). No AI_ADDRCONFIG: "localhost" keeps both 127.0.0.1 and ::1.
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            ),
            self._timeout,
        )
        ips = {str(info[4][0]) for info in infos if info[0] in _FAMILIES}
        if not ips:
            raise OSError(f"no A or AAAA records for {self.host}")
        return tuple(Endpoint(ip, self.port) for ip in sorted(ips, key=sort_key))

    def _answered(
        self, emit: Emit, endpoints: tuple[Endpoint, ...], last: tuple[Endpoint, ...] | None
    ) -> tuple[Endpoint, ...]:
        self.stats.last_success = time.time()
        if endpoints != last:
            emit(Reset(endpoints))
            self.stats.updates += 1
            log.info(
                "dns_endpoints",
                extra={"host": self.host, "endpoints": [ep.key for ep in endpoints]},
            )
        return endpoints

    def _failed(self, kind: str, detail: str, last: tuple[Endpoint, ...] | None) -> None:
        self.stats.error(kind)
        _FAIL_LOG.log(
            self._log_site,
            logging.WARNING,
            "dns_resolve_failed",
            host=self.host,
            kind=kind,
            detail=detail,
            kept=len(last) if last is not None else 0,
        )
        if last is None and self._on_unresolved is not None:
            self._on_unresolved(f"{self.host}: name did not resolve ({kind}: {detail})")
