"""DnsResolver: IP literals, localhost on both loops, scripted answers, failures, dedup."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.discovery.dns import DnsResolver, backoff_delays
from sidecar.discovery.endpoints import Endpoint, Reset
from sidecar.discovery.stats import ERROR_KINDS, DiscoveryStats
from tests.k8s.support import LOOPS, Recorder, run, running, wait_until

V4 = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
V6 = (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")


def answer(*ips: str, port: int = 443) -> list[tuple[Any, ...]]:
    """getaddrinfo's shape for these addresses."""
    return [(*V6, (ip, port, 0, 0)) if ":" in ip else (*V4, (ip, port)) for ip in ips]


class ScriptedLoop(asyncio.SelectorEventLoop):
    """A real loop whose getaddrinfo plays a script: each step an answer or an exception (the
    last step repeats). Records every call, so tests can also prove no lookup happened."""

    def __init__(self) -> None:
        super().__init__()
        self.script: list[Any] = []
        self.calls: list[tuple[Any, ...]] = []

    async def getaddrinfo(self, host: Any, port: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls.append((host, port, kwargs))
        step = self.script[min(len(self.calls), len(self.script)) - 1]
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            return await step()
        return step


def scripted(*steps: Any) -> Callable[[], ScriptedLoop]:
    def factory() -> ScriptedLoop:
        loop = ScriptedLoop()
        loop.script = list(steps)
        return loop

    return factory


def ips(delta: Any) -> list[str]:
    assert isinstance(delta, Reset)
    return [ep.ip for ep in delta.endpoints]


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_localhost_resolves_through_the_system_resolver(loop_factory: Any) -> None:
    async def main() -> None:
        expected = {
            info[4][0]
            for info in socket.getaddrinfo("localhost", 8080, type=socket.SOCK_STREAM)
            if info[0] in (socket.AF_INET, socket.AF_INET6)
        }
        rec, resolver = Recorder(), DnsResolver("localhost", 8080, refresh=30)
        async with running(resolver, rec):
            await rec.wait_for_deltas(1)
        # Whatever the system answers (127.0.0.1, and ::1 where /etc/hosts has it), all kept.
        assert set(ips(rec.deltas[0])) == expected
        assert "127.0.0.1" in expected
        assert all(ep.port == 8080 and ep.serving for ep in rec.current.values())
        assert resolver.stats.updates == 1 and resolver.stats.last_success is not None

    run(main, loop_factory)


def test_localhost_with_a_v4_and_a_v6_answer_keeps_both_sorted_and_unique() -> None:
    async def main() -> None:
        rec, resolver = Recorder(), DnsResolver("localhost", 443, refresh=30)
        async with running(resolver, rec):
            await rec.wait_for_deltas(1)
        assert rec.deltas == [Reset((Endpoint("127.0.0.1", 443), Endpoint("::1", 443)))]
        assert rec.keys == {"127.0.0.1:443", "[::1]:443"}

    run(main, scripted(answer("::1", "127.0.0.1", "::1", "127.0.0.1")))


@pytest.mark.parametrize(
    ("host", "ip"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("[::1]", "::1"), ("127.000.0.1", None)],
)
def test_ip_literals_resolve_to_themselves_without_a_lookup(host: str, ip: str | None) -> None:
    loop_factory = scripted(socket.gaierror(socket.EAI_NONAME, "not a literal"))

    async def main() -> None:
        rec, resolver = Recorder(), DnsResolver(host, 80, refresh=0.01)
        async with running(resolver, rec):
            if ip is None:  # not a valid literal (leading zeros): it is a name, looked up
                await wait_until(lambda: resolver.stats.errors["resolve"] >= 1, what="lookup")
                assert rec.deltas == []
                return
            await rec.wait_for_deltas(1)
            await asyncio.sleep(0.05)  # many refresh periods: still nothing more
        assert rec.deltas == [Reset((Endpoint(ip, 80),))]
        loop = asyncio.get_running_loop()
        assert isinstance(loop, ScriptedLoop) and loop.calls == []

    run(main, loop_factory)


def test_a_failing_name_keeps_the_last_endpoints_and_counts_errors() -> None:
    nxdomain = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    steps = [answer("127.0.1.1"), nxdomain, nxdomain, nxdomain, answer("127.0.1.2")]

    async def main() -> None:
        stats = DiscoveryStats()
        rec = Recorder()
        resolver = DnsResolver("api.example.test", 443, refresh=0.01, stats=stats)
        async with running(resolver, rec):
            await rec.wait_for_keys({"127.0.1.2:443"})
        # The failures emitted nothing: 127.0.1.1 stayed until the next good answer.
        assert [ips(d) for d in rec.deltas] == [["127.0.1.1"], ["127.0.1.2"]]
        assert stats.errors["resolve"] == 3
        assert sum(stats.errors.values()) == 3
        assert stats.updates == 2

    run(main, scripted(*steps))


def test_a_name_that_never_resolves_emits_nothing_and_keeps_counting() -> None:
    async def main() -> None:
        rec, resolver = Recorder(), DnsResolver("nothing.example.test", 443, refresh=0.01)
        async with running(resolver, rec):
            await wait_until(lambda: resolver.stats.errors["resolve"] >= 3, what="3 errors")
        assert rec.deltas == []
        assert resolver.stats.last_success is None

    run(main, scripted(socket.gaierror(socket.EAI_NONAME, "Name or service not known")))


def test_refresh_emits_only_when_the_answer_changes() -> None:
    a, b = answer("127.0.1.1", "127.0.1.2"), answer("127.0.1.2", "127.0.1.1", "127.0.1.3")

    async def main() -> None:
        rec, resolver = Recorder(), DnsResolver("svc.example.test", 443, refresh=0.005)
        async with running(resolver, rec):
            loop = asyncio.get_running_loop()
            assert isinstance(loop, ScriptedLoop)
            await wait_until(lambda: len(loop.calls) >= 8, what="8 lookups")
        assert [ips(d) for d in rec.deltas] == [
            ["127.0.1.1", "127.0.1.2"],
            ["127.0.1.1", "127.0.1.2", "127.0.1.3"],
        ]
        assert resolver.stats.updates == 2
        # Non-blocking lookups of TCP addresses, for the configured port.
        host, port, kwargs = loop.calls[0]
        assert (host, port, kwargs["type"]) == ("svc.example.test", 443, socket.SOCK_STREAM)

    run(main, scripted(a, a, a, a, b))  # the last step repeats


def test_a_lookup_that_hangs_times_out_and_counts() -> None:
    async def hang() -> Any:
        await asyncio.sleep(3600)

    async def main() -> None:
        rec = Recorder()
        resolver = DnsResolver("slow.example.test", 443, refresh=0.01, timeout=0.02)
        async with running(resolver, rec):
            await wait_until(lambda: resolver.stats.errors["timeout"] >= 2, what="timeouts")
        assert rec.deltas == []

    run(main, scripted(hang))


def test_an_unexpected_error_is_counted_and_run_goes_on() -> None:
    async def main() -> None:
        rec, resolver = Recorder(), DnsResolver("odd.example.test", 443, refresh=0.01)
        async with running(resolver, rec):
            await rec.wait_for_keys({"127.0.1.1:443"})
        assert resolver.stats.errors["unexpected"] == 1

    run(main, scripted(RuntimeError("bug in a resolver library"), answer("127.0.1.1")))


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_cancel_ends_run_promptly_mid_sleep(loop_factory: Any) -> None:
    async def main() -> None:
        rec, resolver = Recorder(), DnsResolver("localhost", 80, refresh=3600)
        task = asyncio.create_task(resolver.run(rec))
        await rec.wait_for_deltas(1)
        task.cancel()
        async with asyncio.timeout(2):
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main, loop_factory)


def test_stats_start_with_every_error_kind_at_zero() -> None:
    stats = DiscoveryStats()
    assert stats.errors == dict.fromkeys(ERROR_KINDS, 0)
    assert (stats.updates, stats.watch_restarts, stats.relists, stats.last_success) == (
        0,
        0,
        0,
        None,
    )


def test_backoff_grows_is_jittered_and_capped() -> None:
    delays = backoff_delays(0.5, 8.0)
    first = [next(delays) for _ in range(40)]
    assert first[0] == 0.5
    assert all(0.5 <= d <= 8.0 for d in first)
    # It grows: from the 7th draw on each is uniform in [0, 8] (floored at 0.5), so 34 draws
    # all at or below 2.0 has probability 0.25**34. (With 6 draws, 1 run in 4000 failed.)
    assert max(first[6:]) > 2.0
    assert len({round(d, 6) for d in first[6:]}) > 1  # and is spread at the cap


def test_refresh_must_be_positive() -> None:
    with pytest.raises(ValueError, match="refresh"):
        DnsResolver("localhost", 80, refresh=0)
