"""Admin and status servers on loopback: every route, readiness, drain and the metrics scrape."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin import AdminServer, StatusServer
from sidecar.admin.server import SHUTDOWN_TIMEOUT
from sidecar.errors import LOCAL_ERROR_CODES
from sidecar.observe.loop_lag import watch_loop_lag
from sidecar.observe.metrics import build_registry, render
from sidecar.observe.stats import CODE_CLASSES, ClusterGauges, EndpointGauge, Stats

# The names and types of SPEC section 8 (tests/unit/test_metrics_names.py checks the full set).
SPEC_TYPES = {
    "sidecar_requests_total": "counter",
    "sidecar_request_duration_seconds": "histogram",
    "sidecar_upstream_connections": "gauge",
    "sidecar_upstream_connections_opened_total": "counter",
    "sidecar_upstream_connections_closed_total": "counter",
    "sidecar_upstream_connect_duration_seconds": "histogram",
    "sidecar_pool_pending_requests": "gauge",
    "sidecar_pool_wait_duration_seconds": "histogram",
    "sidecar_tls_handshakes_total": "counter",
    "sidecar_circuit_breaker_state": "gauge",
    "sidecar_circuit_breaker_transitions_total": "counter",
    "sidecar_retries_total": "counter",
    "sidecar_retry_budget_exhausted_total": "counter",
    "sidecar_endpoint_healthy": "gauge",
    "sidecar_outlier_ejections_total": "counter",
    "sidecar_health_checks_total": "counter",
    "sidecar_local_errors_total": "counter",
    "sidecar_downstream_connections": "gauge",
    "sidecar_inflight_requests": "gauge",
    "sidecar_drain_state": "gauge",
    "sidecar_drain_aborted_connections_total": "counter",
    "sidecar_event_loop_lag_seconds": "histogram",
    "sidecar_config_reloads_total": "counter",
}

BOUND = 10.0  # seconds: no test step may wait longer than this

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
# Every test runs under both loops: production runs uvloop, the default loop is the reference.
pytestmark = pytest.mark.parametrize("loop", sorted(LOOPS))


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main)


class FakeHooks:
    """A stand-in for app.py's hooks. Legitimate: `AdminHooks` is the seam between the admin
    server and the process, and what is under test here is the HTTP side of that seam."""

    def __init__(self) -> None:
        self.is_ready = False
        self.state = "serving"
        self.exit_flags: list[bool] = []
        self.reload_result = (True, "applied: 1 cluster changed")
        self.reloads = 0
        self._drained = asyncio.Event()

    def ready(self) -> bool:
        return self.is_ready

    def drain_status(self) -> dict[str, object]:
        return {"state": self.state, "inflight": 3, "connections": 2, "elapsed": 1.5}

    async def start_drain(self, exit: bool) -> None:
        self.exit_flags.append(exit)
        if self.state == "serving":
            self.state = "draining"

    async def wait_drained(self) -> None:
        await self._drained.wait()

    def finish_drain(self) -> None:
        self.state = "drained"
        self._drained.set()

    async def reload(self) -> tuple[bool, str]:
        self.reloads += 1
        return self.reload_result

    def clusters(self) -> list[dict[str, object]]:
        return [
            {
                "name": "c1",
                "breaker": "closed",
                "endpoints": [
                    {
                        "address": "10.0.0.1:8080",
                        "healthy": True,
                        "ejected": False,
                        "terminating": False,
                        "active": 1,
                        "idle": 2,
                        "pending": 0,
                    }
                ],
                "tls_resumption_ratio": 0.0,
            }
        ]

    def config(self) -> dict[str, object]:
        return {"clusters": [{"name": "c1"}], "access_log": True}


class Harness:
    def __init__(self, stats: Stats, hooks: FakeHooks, session: aiohttp.ClientSession) -> None:
        self.stats = stats
        self.hooks = hooks
        self.session = session
        self.admin_url = ""
        self.status_url = ""

    async def get(self, url: str) -> tuple[int, str]:
        async with self.session.get(url) as resp:
            return resp.status, await resp.text()

    async def post(self, url: str) -> tuple[int, str]:
        async with self.session.post(url) as resp:
            return resp.status, await resp.text()


def make_stats() -> Stats:
    stats = Stats()
    stats.cluster("c1").expect_listener("l1")
    stats.listener("l1")
    return stats


def run(loop: str, body: Callable[[Harness], Awaitable[None]]) -> None:
    """Start both servers on 127.0.0.1 free ports around `body`, every wait bounded."""

    async def main() -> None:
        stats = make_stats()
        hooks = FakeHooks()
        metrics = functools.partial(render, build_registry(stats))
        admin = AdminServer(hooks, metrics)
        status = StatusServer(hooks, metrics)
        await admin.start("127.0.0.1", 0)
        await status.start("127.0.0.1", 0)
        try:
            timeout = aiohttp.ClientTimeout(total=BOUND)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                h = Harness(stats, hooks, session)
                h.admin_url = f"http://127.0.0.1:{admin.port}"
                h.status_url = f"http://127.0.0.1:{status.port}"
                await body(h)
        finally:
            await admin.stop()
            await status.stop()

    run_on(loop, asyncio.wait_for(main(), 3 * BOUND))


def test_healthz_on_both_ports(loop: str) -> None:
    async def body(h: Harness) -> None:
        for base in (h.admin_url, h.status_url):
            assert await h.get(f"{base}/healthz") == (200, "ok")

    run(loop, body)


def test_readyz_follows_hooks_on_both_ports(loop: str) -> None:
    async def body(h: Harness) -> None:
        for base in (h.admin_url, h.status_url):
            status, text = await h.get(f"{base}/readyz")
            assert status == 503
            assert json.loads(text)["reason"] == "starting"
        h.hooks.is_ready = True
        for base in (h.admin_url, h.status_url):
            assert (await h.get(f"{base}/readyz"))[0] == 200
        # A drain turns readiness off on both ports, and both keep answering.
        status, _ = await h.post(f"{h.admin_url}/drain?exit=false")
        assert status == 200
        h.hooks.is_ready = False
        for base in (h.admin_url, h.status_url):
            status, text = await h.get(f"{base}/readyz")
            assert status == 503
            assert json.loads(text)["reason"] == "draining"
            assert (await h.get(f"{base}/healthz"))[0] == 200
            assert (await h.get(f"{base}/metrics"))[0] == 200

    run(loop, body)


def test_status_port_serves_only_probes_and_metrics(loop: str) -> None:
    async def body(h: Harness) -> None:
        for path in ("/clusters", "/config", "/drain", "/reload", "/nope"):
            assert (await h.get(f"{h.status_url}{path}"))[0] == 404
        assert (await h.post(f"{h.status_url}/drain"))[0] == 404
        assert h.hooks.exit_flags == []

    run(loop, body)


def test_admin_routes(loop: str) -> None:
    async def body(h: Harness) -> None:
        status, text = await h.get(f"{h.admin_url}/clusters")
        assert status == 200
        assert json.loads(text) == {"clusters": h.hooks.clusters()}

        status, text = await h.get(f"{h.admin_url}/config")
        assert status == 200
        assert json.loads(text) == h.hooks.config()

        status, text = await h.get(f"{h.admin_url}/drain")
        assert status == 200
        assert json.loads(text) == {
            "state": "serving",
            "inflight": 3,
            "connections": 2,
            "elapsed": 1.5,
        }
        assert h.hooks.exit_flags == []  # GET only reports

        assert (await h.get(f"{h.admin_url}/nope"))[0] == 404
        # Wrong methods on known paths.
        assert (await h.get(f"{h.admin_url}/reload"))[0] == 405
        assert (await h.post(f"{h.admin_url}/healthz"))[0] == 405
        assert (await h.post(f"{h.admin_url}/metrics"))[0] == 405
        async with h.session.delete(f"{h.admin_url}/drain") as resp:
            assert resp.status == 405

    run(loop, body)


def test_reload_applied_and_rejected(loop: str) -> None:
    async def body(h: Harness) -> None:
        status, text = await h.post(f"{h.admin_url}/reload")
        assert status == 200
        assert json.loads(text) == {"applied": True, "message": "applied: 1 cluster changed"}
        h.hooks.reload_result = (False, "clusters[0].pool.max_idle: must be >= 0")
        status, text = await h.post(f"{h.admin_url}/reload")
        assert status == 400
        assert json.loads(text)["applied"] is False
        assert h.hooks.reloads == 2

    run(loop, body)


def test_post_drain_starts_and_reports(loop: str) -> None:
    async def body(h: Harness) -> None:
        status, text = await h.post(f"{h.admin_url}/drain")
        assert status == 200
        assert json.loads(text)["state"] == "draining"
        status, _ = await h.post(f"{h.admin_url}/drain?exit=false")
        assert status == 200
        assert h.hooks.exit_flags == [True, False]
        # A bad flag is refused before any drain starts.
        assert (await h.post(f"{h.admin_url}/drain?wait=maybe"))[0] == 400
        assert h.hooks.exit_flags == [True, False]

    run(loop, body)


def test_post_drain_wait_returns_once_drained(loop: str) -> None:
    async def body(h: Harness) -> None:
        waiter = asyncio.create_task(h.post(f"{h.admin_url}/drain?wait=true&exit=false"))
        # The request must still be waiting while the fake reports draining.
        done, _ = await asyncio.wait({waiter}, timeout=0.3)
        assert not done
        status, text = await h.get(f"{h.admin_url}/drain")
        assert json.loads(text)["state"] == "draining"
        h.hooks.finish_drain()
        status, text = await asyncio.wait_for(waiter, BOUND)
        assert status == 200
        assert json.loads(text)["state"] == "drained"
        assert h.hooks.exit_flags == [False]

    run(loop, body)


def test_non_loopback_admin_host_raises(loop: str) -> None:
    async def main() -> None:
        admin = AdminServer(FakeHooks(), functools.partial(render, build_registry(Stats())))
        for host in ("0.0.0.0", "10.1.2.3", "::", "example.com"):
            with pytest.raises(ValueError, match="loopback"):
                await admin.start(host, 0)
        await admin.stop()

    run_on(loop, asyncio.wait_for(main(), BOUND))


def _families(text: str) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    """{exposition name: (type, samples)}; counters are keyed with their `_total` name."""
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = (fam.type, [(s.name, s.labels, s.value) for s in fam.samples])
    return out


def test_metrics_scrape_has_every_spec_metric_with_zero_series(loop: str) -> None:
    async def body(h: Harness) -> None:
        for base in (h.admin_url, h.status_url):
            async with h.session.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                text = await resp.text()
            for name, kind in SPEC_TYPES.items():
                assert f"# HELP {name} " in text, name
                assert f"# TYPE {name} {kind}\n" in text, name

        lines = set(text.splitlines())
        for cc in CODE_CLASSES:
            assert (
                f'sidecar_requests_total{{cluster="c1",code_class="{cc}",listener="l1"}} 0.0'
                in lines
            )
        for to in ("closed", "open", "half_open"):
            line = f'sidecar_circuit_breaker_transitions_total{{cluster="c1",to="{to}"}} 0.0'
            assert line in lines
        for code in LOCAL_ERROR_CODES:
            assert f'sidecar_local_errors_total{{cluster="c1",code="{code}"}} 0.0' in lines
        for state in ("active", "idle"):
            assert f'sidecar_upstream_connections{{cluster="c1",state="{state}"}} 0.0' in lines
        for resumed in ("true", "false"):
            assert f'sidecar_tls_handshakes_total{{cluster="c1",resumed="{resumed}"}} 0.0' in lines
        for result in ("success", "rejected"):
            assert f'sidecar_config_reloads_total{{result="{result}"}} 0.0' in lines
        expected_zero = [
            'sidecar_circuit_breaker_state{cluster="c1"} 0.0',
            'sidecar_retry_budget_exhausted_total{cluster="c1"} 0.0',
            'sidecar_outlier_ejections_total{cluster="c1"} 0.0',
            'sidecar_health_checks_total{cluster="c1",result="failure"} 0.0',
            'sidecar_retries_total{cluster="c1",reason="connect-failure"} 0.0',
            'sidecar_upstream_connections_closed_total{cluster="c1",reason="idle_timeout"} 0.0',
            'sidecar_upstream_connections_opened_total{cluster="c1"} 0.0',
            'sidecar_pool_pending_requests{cluster="c1"} 0.0',
            'sidecar_request_duration_seconds_count{cluster="c1"} 0.0',
            'sidecar_request_duration_seconds_bucket{cluster="c1",le="+Inf"} 0.0',
            'sidecar_downstream_connections{listener="l1"} 0.0',
            'sidecar_inflight_requests{listener="l1"} 0.0',
            'sidecar_downstream_connections_shed_total{listener="l1"} 0.0',
            'sidecar_endpoints{cluster="c1",state="serving"} 0.0',
            'sidecar_endpoints{cluster="c1",state="terminating"} 0.0',
            "sidecar_drain_state 0.0",
            "sidecar_drain_aborted_connections_total 0.0",
            "sidecar_event_loop_lag_seconds_count 0.0",
        ]
        for line in expected_zero:
            assert line in lines, line

        families = _families(text)
        for name, kind in SPEC_TYPES.items():
            assert families[name][0] == kind, name
        # The process collector rides along on the same registry.
        assert "process_resident_memory_bytes" in families

    run(loop, body)


def test_metrics_follow_stats_and_gauges(loop: str) -> None:
    async def body(h: Harness) -> None:
        c1 = h.stats.cluster("c1")
        c1.request_done("l1", 503, 0.003)
        c1.request_done("l1", 200, 0.2)
        c1.request_done("l1", 204, 0.2)
        c1.local_error("circuit_open")
        c1.breaker_transitions["open"] += 1
        c1.closed("remote_closed")
        c1.connections_opened += 4
        c1.tls_handshakes[True] += 2
        c1.retried("reset")
        c1.connect_duration.observe(0.002)
        listener = h.stats.listener("l1")
        listener.inflight = 2
        listener.downstream_connections = 5
        listener.shed_connections = 1
        h.stats.process.drain_state = 1
        h.stats.process.config_reloads["rejected"] += 1
        h.stats.process.event_loop_lag.observe(0.01)
        c1.gauges = lambda: ClusterGauges(
            active=3,
            idle=7,
            pending=1,
            breaker_state=1,
            endpoints=[
                EndpointGauge("10.0.0.1:80", True),
                EndpointGauge("10.0.0.2:80", False, "unhealthy"),
            ],
        )

        status, text = await h.get(f"{h.admin_url}/metrics")
        assert status == 200
        lines = set(text.splitlines())
        for line in [
            'sidecar_requests_total{cluster="c1",code_class="5xx",listener="l1"} 1.0',
            'sidecar_requests_total{cluster="c1",code_class="2xx",listener="l1"} 2.0',
            'sidecar_requests_total{cluster="c1",code_class="4xx",listener="l1"} 0.0',
            'sidecar_request_duration_seconds_count{cluster="c1"} 3.0',
            'sidecar_request_duration_seconds_bucket{cluster="c1",le="0.005"} 1.0',
            'sidecar_request_duration_seconds_bucket{cluster="c1",le="0.25"} 3.0',
            'sidecar_local_errors_total{cluster="c1",code="circuit_open"} 1.0',
            'sidecar_circuit_breaker_transitions_total{cluster="c1",to="open"} 1.0',
            'sidecar_upstream_connections_closed_total{cluster="c1",reason="remote_closed"} 1.0',
            'sidecar_upstream_connections_opened_total{cluster="c1"} 4.0',
            'sidecar_tls_handshakes_total{cluster="c1",resumed="true"} 2.0',
            'sidecar_retries_total{cluster="c1",reason="reset"} 1.0',
            'sidecar_upstream_connect_duration_seconds_count{cluster="c1"} 1.0',
            'sidecar_upstream_connections{cluster="c1",state="active"} 3.0',
            'sidecar_upstream_connections{cluster="c1",state="idle"} 7.0',
            'sidecar_pool_pending_requests{cluster="c1"} 1.0',
            'sidecar_circuit_breaker_state{cluster="c1"} 1.0',
            'sidecar_endpoint_healthy{cluster="c1",endpoint="10.0.0.1:80"} 1.0',
            'sidecar_endpoint_healthy{cluster="c1",endpoint="10.0.0.2:80"} 0.0',
            'sidecar_endpoints{cluster="c1",state="serving"} 1.0',
            'sidecar_endpoints{cluster="c1",state="unhealthy"} 1.0',
            'sidecar_inflight_requests{listener="l1"} 2.0',
            'sidecar_downstream_connections{listener="l1"} 5.0',
            'sidecar_downstream_connections_shed_total{listener="l1"} 1.0',
            "sidecar_drain_state 1.0",
            'sidecar_config_reloads_total{result="rejected"} 1.0',
            "sidecar_event_loop_lag_seconds_count 1.0",
        ]:
            assert line in lines, line

        # The histogram's sum survives the parser and cumulative buckets never decrease.
        _, samples = _families(text)["sidecar_request_duration_seconds"]
        sums = [v for n, _, v in samples if n.endswith("_sum")]
        assert sums == [pytest.approx(0.403)]
        buckets = [v for n, _, v in samples if n.endswith("_bucket")]
        assert buckets == sorted(buckets)

    run(loop, body)


def test_loop_lag_watcher_feeds_the_scrape(loop: str) -> None:
    async def body(h: Harness) -> None:
        lag = h.stats.process.event_loop_lag
        watcher = asyncio.create_task(watch_loop_lag(lag, interval=0.01))
        try:
            await asyncio.sleep(0.02)
            # Block the loop on purpose: the watcher's next wake-up is late by about 50 ms.
            time.sleep(0.05)  # noqa: ASYNC251
            for _ in range(int(BOUND / 0.01)):  # bounded poll until a few more wake-ups
                if lag.count >= 3:
                    break
                await asyncio.sleep(0.01)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        assert lag.sum >= 0.03
        _, text = await h.get(f"{h.status_url}/metrics")
        prefix = "sidecar_event_loop_lag_seconds_count "
        count = [ln for ln in text.splitlines() if ln.startswith(prefix)]
        assert count
        assert float(count[0].removeprefix(prefix)) >= 3

    run(loop, body)


def test_stop_is_bounded_while_a_drain_waiter_hangs(loop: str) -> None:
    # The process must be able to exit even if a `POST /drain?wait=true` never sees `drained`.
    async def main() -> None:
        hooks = FakeHooks()
        admin = AdminServer(hooks, functools.partial(render, build_registry(make_stats())))
        await admin.start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{admin.port}/drain?wait=true"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND)) as session:

            async def hang() -> int:
                async with session.post(url) as resp:
                    return resp.status

            waiter = asyncio.create_task(hang())
            for _ in range(int(BOUND / 0.01)):  # bounded poll until the drain has started
                if hooks.exit_flags:
                    break
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await admin.stop()
            assert time.monotonic() - started < SHUTDOWN_TIMEOUT + 2.0
            with pytest.raises(aiohttp.ClientError):
                await waiter
        await admin.stop()  # idempotent

    run_on(loop, asyncio.wait_for(main(), 3 * BOUND))
