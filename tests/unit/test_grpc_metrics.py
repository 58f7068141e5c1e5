"""The HTTP/2 and gRPC metric families (SPEC sections 8 and 11): `sidecar_grpc_responses_total
{cluster,status}`, `sidecar_upstream_streams{cluster}` and `sidecar_http2_abuse_total
{listener,kind}`. Every series exists from start; the data path's hooks count what they should;
a real sidecar process exports them for every configured cluster and listener."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import grpc_status
from sidecar.config import ClusterConfig
from sidecar.discovery.endpoints import Endpoint, Reset
from sidecar.observe.metrics import StatsCollector, build_registry, render
from sidecar.observe.stats import HTTP2_ABUSE_KINDS, Stats
from sidecar.timers import Wheel
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.http2 import H2Connection
from sidecar.upstream.pool import Pool
from tests.harness import LOOPS, Sidecar, free_port

# SPEC section 8's `status` values, in the order of the numbers on the wire (grpc statuscodes.md).
SPEC_STATUSES = (
    "ok", "cancelled", "unknown", "invalid_argument", "deadline_exceeded", "not_found",
    "already_exists", "permission_denied", "resource_exhausted", "failed_precondition",
    "aborted", "out_of_range", "unimplemented", "internal", "unavailable", "data_loss",
    "unauthenticated",
)
SPEC_ABUSE = (
    "rapid_reset", "continuation_flood", "hpack_bomb", "settings_flood", "ping_flood",
    "zero_window_stall",
)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label pairs: value} of the samples called `name` in a scrape."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def scrape(stats: Stats) -> str:
    body, _ = render(build_registry(stats))
    text = body.decode()
    # The scrape the sidecar serves is written directly (observe.metrics.Scraper): the same.
    assert text.startswith(StatsCollector(stats).text())
    return text


def test_status_table_is_the_grpc_one() -> None:
    assert grpc_status.NAMES == SPEC_STATUSES
    assert grpc_status.CODES["unavailable"] == 14 and grpc_status.CODES["ok"] == 0
    assert [grpc_status.name(n) for n in (0, 4, 13, 16)] == [
        "ok", "deadline_exceeded", "internal", "unauthenticated"]
    assert grpc_status.name(17) == grpc_status.name(-1) == "unknown"


def test_every_grpc_status_series_exists_from_start_at_zero() -> None:
    stats = Stats()
    stats.cluster("orders")
    stats.cluster("web")
    got = samples(scrape(stats), "sidecar_grpc_responses_total")
    expected = {
        (("cluster", c), ("status", s)): 0.0 for c in ("orders", "web") for s in SPEC_STATUSES
    }
    assert got == expected


def test_grpc_response_counts_by_number_and_unknown_numbers_as_unknown() -> None:
    stats = Stats()
    cluster = stats.cluster("orders")
    for code in (0, 0, 14, 3, 16, 17, 99, -1, 2):
        cluster.grpc_response(code)
    snapshot = stats.snapshot()
    cluster.grpc_response(0)  # after the snapshot: not in it
    got = samples(scrape(snapshot), "sidecar_grpc_responses_total")
    nonzero = {dict(k)["status"]: v for k, v in got.items() if v}
    assert nonzero == {"ok": 2, "unavailable": 1, "invalid_argument": 1,
                       "unauthenticated": 1, "unknown": 4}
    assert cluster.grpc_responses[0] == 3


def test_abuse_series_exist_from_start_per_listener_and_count() -> None:
    assert HTTP2_ABUSE_KINDS == SPEC_ABUSE
    stats = Stats()
    stats.listener("egress")
    grpc = stats.listener("grpc")
    grpc.abuse("rapid_reset")
    grpc.abuse("rapid_reset")
    grpc.abuse("ping_flood")
    got = samples(scrape(stats.snapshot()), "sidecar_http2_abuse_total")
    assert set(got) == {
        (("kind", k), ("listener", lst)) for lst in ("egress", "grpc") for k in SPEC_ABUSE
    }
    nonzero = {(dict(k)["listener"], dict(k)["kind"]): v for k, v in got.items() if v}
    assert nonzero == {("grpc", "rapid_reset"): 2, ("grpc", "ping_flood"): 1}


def _carrying(pool: Pool, n: int) -> H2Connection:
    """A real HTTP/2 connection object of `pool`, never connected, counting n streams as being
    opened (`Pool.streams` reads `stream_count`). A real one, not a stand-in: compiled, the
    pool's list of connections holds `H2Connection`s only."""
    conn = H2Connection(pool, pool.key, 0.0, math.inf, pool.h2)
    conn.opening = n
    return conn


def test_upstream_streams_is_the_sum_of_the_pools_streams_read_at_scrape() -> None:
    """A real Cluster with two endpoints (no connection opened: the pools only exist): the gauge
    is 0 from start, then the streams the pools' HTTP/2 connections carry (`Pool.streams`)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ports = (free_port(), free_port())
        cfg = ClusterConfig.model_validate({
            "name": "orders",
            "discovery": {"type": "static", "endpoints": [f"127.0.0.1:{p}" for p in ports]},
        })
        stats = Stats()
        cluster = Cluster(cfg, loop, Wheel(loop), stats.cluster("orders"))
        stats.cluster("orders").gauges = cluster.gauges
        cluster.apply(Reset(tuple(Endpoint("127.0.0.1", p) for p in ports)))
        streams = samples(scrape(stats), "sidecar_upstream_streams")
        assert streams == {(("cluster", "orders"),): 0.0}
        pools = list(cluster.pools.values())
        assert len(pools) == 2
        # `Pool.streams` sums its HTTP/2 connections' open streams (sidecar/upstream/http2.py):
        # connections carrying 3 and 4 streams, no socket needed.
        pools[0]._mux.append(_carrying(pools[0], 3))
        pools[1]._mux.append(_carrying(pools[1], 4))
        assert samples(scrape(stats), "sidecar_upstream_streams") == {
            (("cluster", "orders"),): 7.0
        }
        assert samples(scrape(stats.snapshot()), "sidecar_upstream_streams") == {
            (("cluster", "orders"),): 7.0
        }

    with asyncio.Runner() as runner:
        runner.run(main())


@pytest.fixture(scope="module", params=LOOPS)
def sidecar(request: pytest.FixtureRequest) -> Iterator[Sidecar]:
    dead = f"127.0.0.1:{free_port()}"  # no request is sent: nothing needs to listen
    config = {
        "listeners": [
            {"name": "egress", "protocol": "http", "cluster": "web"},
            {"name": "grpc", "protocol": "http", "cluster": "orders"},
        ],
        "clusters": [
            {"name": name, "discovery": {"type": "static", "endpoints": [dead]}}
            for name in ("web", "orders")
        ],
    }
    with Sidecar(config, loop=request.param) as sc:
        yield sc


def test_a_running_sidecar_exports_every_new_series_from_start(sidecar: Sidecar) -> None:
    text = sidecar.metrics()
    grpc = samples(text, "sidecar_grpc_responses_total")
    assert grpc == {
        (("cluster", c), ("status", s)): 0.0 for c in ("web", "orders") for s in SPEC_STATUSES
    }
    assert samples(text, "sidecar_upstream_streams") == {
        (("cluster", "web"),): 0.0, (("cluster", "orders"),): 0.0
    }
    abuse = samples(text, "sidecar_http2_abuse_total")
    assert abuse == {
        (("kind", k), ("listener", lst)): 0.0 for lst in ("egress", "grpc") for k in SPEC_ABUSE
    }
