"""Discovery speaks deltas: a slice event emits what that slice changed, and a cluster applies a
delta in proportion to it. The resolver runs against the fake API server (real HTTPS, the
watch protocol on the wire); the cluster tests drive a real `Cluster` with real pools."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ClusterConfig
from sidecar.discovery.endpoints import Add, DoesNotExist, Endpoint, Remove, Reset
from sidecar.discovery.kubernetes import KubernetesResolver
from sidecar.observe.stats import ClusterStats
from sidecar.timers import Wheel
from sidecar.upstream.cluster import Cluster
from tests.k8s.cluster_iface import FakeCluster
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.support import LOOPS, Recorder, run, running, wait_until

SVC = "payments"
FAST = {"backoff_initial": 0.02, "backoff_max": 0.2, "request_timeout": 5.0}


def key(ip: str) -> str:
    return f"{ip}:8080"


def on_fake(tmp_path: Path, body: Any, loop_factory: Any = asyncio.new_event_loop) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path / "apiserver") as server:
            await body(FakeCluster(server))

    run(main, loop_factory)


async def next_delta(rec: Recorder) -> Any:
    await rec.wait_for_deltas(len(rec.deltas) + 1)
    return rec.deltas[-1]


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_each_slice_event_emits_only_what_it_changed(loop_factory: Any, tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        a = await cluster.create_endpoints(SVC, ["127.0.1.1", "127.0.1.2"], slice_name="pay-a")
        await cluster.create_endpoints(SVC, ["127.0.1.3"], slice_name="pay-b")
        rec = Recorder()
        resolver = KubernetesResolver(SVC, cluster.namespace, "http", api=cluster.api(), **FAST)
        async with running(resolver, rec):
            await rec.wait_for_deltas(1)
            assert rec.deltas == [
                Reset(tuple(Endpoint(f"127.0.1.{n}", 8080) for n in (1, 2, 3)))
            ]
            # Add within a slice.
            await cluster.scale(SVC, ["127.0.1.1", "127.0.1.2", "127.0.1.4"], slice_name=a)
            assert await next_delta(rec) == Add((Endpoint("127.0.1.4", 8080),))
            # Remove within a slice.
            await cluster.scale(SVC, ["127.0.1.1", "127.0.1.4"], slice_name=a)
            assert await next_delta(rec) == Remove((key("127.0.1.2"),))
            # A flip of one endpoint's conditions: an Add of its new view, nothing else.
            await cluster.mark_terminating(SVC, "127.0.1.4", serving=True, slice_name=a)
            assert await next_delta(rec) == Add(
                (Endpoint("127.0.1.4", 8080, ready=True, terminating=True),)
            )
            # A bookmark records its version and emits nothing.
            cluster.server.bookmark()
            # A slice deleted: a Remove of what only it held.
            await cluster.delete_endpoints(SVC, slice_name="pay-b")
            assert await next_delta(rec) == Remove((key("127.0.1.3"),))
            assert rec.keys == {key("127.0.1.1"), key("127.0.1.4")}
            assert len(rec.deltas) == 5

    on_fake(tmp_path, body, loop_factory)


def test_an_endpoint_moving_between_slices_never_leaves(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        await cluster.create_endpoints(SVC, ["127.0.1.1", "127.0.1.2"], slice_name="old")
        await cluster.create_endpoints(SVC, ["127.0.1.3"], slice_name="new")
        rec = Recorder()
        resolver = KubernetesResolver(SVC, cluster.namespace, "http", api=cluster.api(), **FAST)
        async with running(resolver, rec):
            await rec.wait_for_deltas(1)
            # The controller adds the address to its new slice first (same view: nothing to
            # say), then takes it out of the old one (still held by the new one: nothing).
            await cluster.scale(SVC, ["127.0.1.3", "127.0.1.2"], slice_name="new")
            await cluster.scale(SVC, ["127.0.1.1"], slice_name="old")
            # Then a real change, so we know both events above were processed.
            await cluster.scale(SVC, ["127.0.1.1", "127.0.1.5"], slice_name="old")
            assert await next_delta(rec) == Add((Endpoint("127.0.1.5", 8080),))
            assert len(rec.deltas) == 2
            # A worse view in one slice does not hide the better one in the other.
            await cluster.create_endpoints(SVC, ["127.0.1.3"], slice_name="dup", ready=False)
            await cluster.scale(SVC, ["127.0.1.1", "127.0.1.5", "127.0.1.6"], slice_name="old")
            assert await next_delta(rec) == Add((Endpoint("127.0.1.6", 8080),))
            assert rec.current[key("127.0.1.3")].ready
            # Its better view goes: the worse one is what is left.
            await cluster.scale(SVC, ["127.0.1.2"], slice_name="new")
            assert await next_delta(rec) == Add((Endpoint("127.0.1.3", 8080, ready=False),))
            await cluster.delete_endpoints(SVC, slice_name="dup")
            assert await next_delta(rec) == Remove((key("127.0.1.3"),))
            assert rec.keys == {key(f"127.0.1.{n}") for n in (1, 2, 5, 6)}

    on_fake(tmp_path, body)


def test_the_service_going_and_coming_back(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        await cluster.create_endpoints(SVC, ["127.0.1.1"], slice_name="only")
        rec = Recorder()
        resolver = KubernetesResolver(SVC, cluster.namespace, "http", api=cluster.api(), **FAST)
        async with running(resolver, rec):
            await rec.wait_for_deltas(1)
            await cluster.delete_endpoints(SVC, slice_name="only")
            assert await next_delta(rec) == DoesNotExist()
            await cluster.create_endpoints(SVC, ["127.0.1.2"], slice_name="again")
            assert await next_delta(rec) == Reset((Endpoint("127.0.1.2", 8080),))

    on_fake(tmp_path, body)


def test_a_relist_after_410_publishes_only_a_changed_set(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        await cluster.create_endpoints(SVC, ["127.0.1.1", "127.0.1.2"], slice_name="pay-a")
        rec = Recorder()
        resolver = KubernetesResolver(SVC, cluster.namespace, "http", api=cluster.api(), **FAST)
        async with running(resolver, rec):
            await rec.wait_for_deltas(1)
            await cluster.server.wait_for_watches(1)
            cluster.server.compact()
            cluster.server.expire_watches()
            await wait_until(lambda: resolver.stats.relists == 1, what="a relist")
            # The same set: the relist says nothing.
            assert len(rec.deltas) == 1
            await cluster.scale(SVC, ["127.0.1.2", "127.0.1.3"], slice_name="pay-a")
            await rec.wait_for_keys({key("127.0.1.2"), key("127.0.1.3")})
            assert all(isinstance(d, Add | Remove) for d in rec.deltas[1:])


# -- the cluster side: a delta costs what it changed ---------------------------------------------


def make_cluster(loop: asyncio.AbstractEventLoop) -> Cluster:
    config = ClusterConfig.model_validate(
        {"name": "c", "discovery": {"type": "static", "endpoints": ["127.0.0.1:1"]}}
    )
    return Cluster(config, loop, Wheel(loop), ClusterStats("c"))


def eps(*ns: int, **kw: Any) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"10.0.{n // 250}.{n % 250 + 1}", 8080, **kw) for n in ns)


def test_cluster_applies_adds_and_removes_in_place() -> None:
    async def main() -> None:
        cluster = make_cluster(asyncio.get_running_loop())
        cluster.apply(Reset(eps(*range(1000))))
        pools = dict(cluster.pools)
        assert len(pools) == 1000
        assert {cluster.pick().key for _ in range(200)} <= set(pools)

        cluster.apply(Remove(tuple(ep.key for ep in eps(3, 500))))
        assert len(cluster.pools) == 998
        assert eps(3)[0].key not in cluster.pools and eps(500)[0].key not in cluster.pools
        # Untouched pools are the same objects: nothing was rebuilt.
        assert all(cluster.pools[k] is pools[k] for k in cluster.pools)

        cluster.apply(Add(eps(1000)))
        assert cluster.pools[eps(1000)[0].key] is not None
        # A flip to terminating stops new requests to it; it stays known.
        flipped = eps(7, terminating=True)[0]
        cluster.apply(Add((flipped,)))
        assert cluster.endpoints[flipped.key].terminating
        assert all(cluster.pick().key != flipped.key for _ in range(2000))
        # Back to serving: it takes requests again.
        cluster.apply(Add(eps(7)))
        assert any(cluster.pick().key == flipped.key for _ in range(20000))

        # A Reset is the difference: the same set changes nothing.
        before = dict(cluster.pools)
        cluster.apply(Reset(tuple(cluster.endpoints.values())))
        assert cluster.pools == before
        snapshot = cluster.snapshot()
        assert len(snapshot["endpoints"]) == 999
        cluster.start_closing("test")

    asyncio.run(main())


def test_serving_index_stays_consistent_under_churn() -> None:
    """The O(1) removal moves the last serving pool into the gap: after any sequence of adds,
    removes and flips, the set `pick` draws from is exactly the serving endpoints."""

    async def main() -> None:
        import random

        rng = random.Random(7)
        cluster = make_cluster(asyncio.get_running_loop())
        cluster.apply(Reset(eps(*range(50))))
        for _ in range(500):
            n = rng.randrange(60)
            action = rng.randrange(3)
            if action == 0:
                cluster.apply(Add(eps(n)))
            elif action == 1:
                cluster.apply(Remove((eps(n)[0].key,)))
            else:
                cluster.apply(Add(eps(n, terminating=True)))
            serving = {k for k, ep in cluster.endpoints.items() if ep.serving}
            drawn = {p.key for p in cluster._serving}  # noqa: SLF001 (the invariant itself)
            assert drawn == serving
            assert len(cluster._serving) == len(serving)  # noqa: SLF001
        cluster.start_closing("test")

    asyncio.run(main())
