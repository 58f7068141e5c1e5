"""KubernetesResolver against a cluster: the fake API server always, a real one when given."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from sidecar.discovery.endpoints import Add, DoesNotExist, Endpoint, Remove, Reset
from sidecar.discovery.kubernetes import (
    KubernetesResolver,
    default_api,
    in_cluster,
    kubeconfig,
    pod_namespace,
    termination_grace_period,
)
from sidecar.discovery.stats import DiscoveryStats
from tests.k8s.cluster_iface import CLUSTER_KINDS, Cluster, FakeCluster, open_cluster
from tests.k8s.fake_apiserver import FakeApiServer, endpoint, endpoint_slice
from tests.k8s.support import LOOPS, Recorder, run, running, wait_until

# Behaviour every cluster shows (list, scale, terminating, merged slices, named ports) runs on both
# `cluster_iface` implementations; faults only the fake can make (dropped streams, 410, 401/403,
# an API server that goes away, a rotated token) run on the fake. Both event loops, every wait
# bounded, every address a loopback one.

SVC = "payments"
FAST = {"backoff_initial": 0.02, "backoff_max": 0.2, "request_timeout": 5.0}


def resolver(cluster: Cluster, port: int | str = "http", **kwargs: Any) -> KubernetesResolver:
    return KubernetesResolver(SVC, cluster.namespace, port, api=cluster.api(), **{**FAST, **kwargs})


def keys(*ips: str, port: int = 8080) -> set[str]:
    return {f"{ip}:{port}" for ip in ips}


def on_cluster(
    kind: str,
    tmp_path: Path,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    body: Callable[[Cluster], Coroutine[Any, Any, None]],
) -> None:
    async def main() -> None:
        async with open_cluster(kind, tmp_path) as cluster:
            await body(cluster)

    run(main, loop_factory)


def on_fake(
    tmp_path: Path,
    body: Callable[[FakeCluster], Coroutine[Any, Any, None]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path / "apiserver") as server:
            await body(FakeCluster(server))

    run(main, loop_factory)


# -- on any cluster (addresses from cluster.ip: loopback on the fake, TEST-NET on a real one) ---


@pytest.mark.parametrize("loop_factory", LOOPS)
@pytest.mark.parametrize("kind", CLUSTER_KINDS)
def test_initial_list_emits_one_reset(kind: str, loop_factory: Any, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        ip = cluster.ip
        await cluster.create_endpoints(SVC, [ip(1), ip(2)])
        await cluster.create_endpoints("unrelated", [ip(9)])
        rec, r = Recorder(), resolver(cluster)
        async with running(r, rec):
            await rec.wait_for_deltas(1)
        assert rec.deltas == [Reset((Endpoint(ip(1), 8080), Endpoint(ip(2), 8080)))]
        assert r.stats.updates == 1 and r.stats.last_success is not None
        assert sum(r.stats.errors.values()) == 0

    on_cluster(kind, tmp_path, loop_factory, body)


@pytest.mark.parametrize("loop_factory", LOOPS)
@pytest.mark.parametrize("kind", CLUSTER_KINDS)
def test_scale_up_and_down(kind: str, loop_factory: Any, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        ip = cluster.ip
        first = await cluster.create_endpoints(SVC, [ip(1)])
        rec = Recorder()
        async with running(resolver(cluster), rec):
            await rec.wait_for_keys(keys(ip(1)))
            await cluster.scale(SVC, [ip(1), ip(2), ip(3)])  # MODIFIED
            await rec.wait_for_keys(keys(ip(1), ip(2), ip(3)))
            second = await cluster.create_endpoints(SVC, [ip(4)])  # ADDED
            await rec.wait_for_keys(keys(ip(1), ip(2), ip(3), ip(4)))
            await cluster.scale(SVC, [ip(3)], slice_name=first)  # MODIFIED, down
            await rec.wait_for_keys(keys(ip(3), ip(4)))
            await cluster.delete_endpoints(SVC, slice_name=second)  # DELETED
            await rec.wait_for_keys(keys(ip(3)))
            await cluster.scale(SVC, [])  # a Service with no pods still has its slice
            await rec.wait_for(lambda current: not current)
            assert rec.deltas[-1] == Remove((f"{ip(3)}:8080",))
            await cluster.delete_endpoints(SVC)  # the Service itself is gone
            await rec.wait_for_deltas(len(rec.deltas) + 1)
            assert rec.deltas[-1] == DoesNotExist()
        # A list gives the whole set; each watch event only what its slice changed.
        assert isinstance(rec.deltas[0], Reset)
        assert all(isinstance(d, Add | Remove) for d in rec.deltas[1:-1])

    on_cluster(kind, tmp_path, loop_factory, body)


@pytest.mark.parametrize("kind", CLUSTER_KINDS)
def test_terminating_endpoints_stay_known_but_not_serving(kind: str, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        ip = cluster.ip
        await cluster.create_endpoints(SVC, [ip(1), ip(2), ip(3)])
        rec = Recorder()
        async with running(resolver(cluster), rec):
            await rec.wait_for_keys(keys(ip(1), ip(2), ip(3)))
            await cluster.mark_terminating(SVC, ip(2), serving=True)
            current = await rec.wait_for(lambda c: c[f"{ip(2)}:8080"].terminating)
            # Still able to finish its work (serving), but no new requests (not `serving` for us).
            assert current[f"{ip(2)}:8080"] == Endpoint(ip(2), 8080, ready=True, terminating=True)
            assert not current[f"{ip(2)}:8080"].serving
            await cluster.mark_terminating(SVC, ip(3), serving=False)
            current = await rec.wait_for(lambda c: c[f"{ip(3)}:8080"].terminating)
            assert not current[f"{ip(3)}:8080"].ready
            await cluster.set_ready(SVC, ip(1), False)
            current = await rec.wait_for(lambda c: not c[f"{ip(1)}:8080"].ready)
            assert not current[f"{ip(1)}:8080"].terminating
            await cluster.scale(SVC, [ip(1), ip(3)])  # the pod is gone
            await rec.wait_for_keys(keys(ip(1), ip(3)))

    on_cluster(kind, tmp_path, asyncio.new_event_loop, body)


@pytest.mark.parametrize("kind", CLUSTER_KINDS)
def test_several_slices_are_merged(kind: str, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        ip, v6 = cluster.ip, cluster.ip6(1)
        await cluster.create_endpoints(SVC, [ip(1), ip(2)], slice_name="pay-a")
        await cluster.create_endpoints(SVC, [ip(3)], slice_name="pay-b")
        # An address moving between slices shows up in both for a moment: one endpoint, the
        # better view of it wins whatever order the slices arrive in.
        await cluster.create_endpoints(SVC, [ip(2)], slice_name="pay-c", ready=False)
        await cluster.create_endpoints(SVC, [v6], slice_name="pay-v6", address_type="IPv6")
        rec = Recorder()
        async with running(resolver(cluster), rec):
            current = await rec.wait_for_keys(keys(ip(1), ip(2), ip(3)) | {f"[{v6}]:8080"})
            assert current[f"{ip(2)}:8080"].ready
            last = rec.deltas[-1]
            assert isinstance(last, Reset)
            assert [ep.ip for ep in last.endpoints] == [ip(1), ip(2), ip(3), v6]  # v4 first
            await cluster.delete_endpoints(SVC, slice_name="pay-a")
            current = await rec.wait_for_keys(keys(ip(2), ip(3)) | {f"[{v6}]:8080"})
            assert not current[f"{ip(2)}:8080"].ready  # only pay-c's view is left

    on_cluster(kind, tmp_path, asyncio.new_event_loop, body)


@pytest.mark.parametrize("kind", CLUSTER_KINDS)
def test_named_port_is_resolved_per_slice(kind: str, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        ip = cluster.ip
        # A rollout changing the target port: old pods on 8443, new pods on 9443, one name.
        ports_old = (("https", 8443), ("metrics", 9090))
        ports_new = (("metrics", 9090), ("https", 9443))
        await cluster.create_endpoints(SVC, [ip(1)], slice_name="old", ports=ports_old)
        await cluster.create_endpoints(SVC, [ip(2)], slice_name="new", ports=ports_new)
        by_name, by_number, metrics = Recorder(), Recorder(), Recorder()
        async with (
            running(resolver(cluster, "https"), by_name),
            running(resolver(cluster, 9443), by_number),
            running(resolver(cluster, "metrics"), metrics),
        ):
            await by_name.wait_for_keys({f"{ip(1)}:8443", f"{ip(2)}:9443"})
            await by_number.wait_for_keys({f"{ip(2)}:9443"})  # a number is a target port
            await metrics.wait_for_keys({f"{ip(1)}:9090", f"{ip(2)}:9090"})

    on_cluster(kind, tmp_path, asyncio.new_event_loop, body)


@pytest.mark.parametrize("kind", CLUSTER_KINDS)
def test_a_missing_service_does_not_exist_until_it_appears(kind: str, tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        rec = Recorder()
        async with running(resolver(cluster), rec):
            await rec.wait_for_deltas(1)
            assert rec.deltas == [DoesNotExist()]
            await cluster.create_endpoints(SVC, [cluster.ip(1)])
            await rec.wait_for_keys(keys(cluster.ip(1)))

    on_cluster(kind, tmp_path, asyncio.new_event_loop, body)


# -- on the fake: what only it can do ----------------------------------------------------------


def test_the_single_port_of_a_slice_serves_a_service_port_number(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        await cluster.create_endpoints(SVC, ["127.0.1.1"], ports=(("", 8080),))
        rec = Recorder()
        async with running(resolver(cluster, 80), rec):  # Service port 80 -> targetPort 8080
            await rec.wait_for_keys({"127.0.1.1:8080"})

    on_fake(tmp_path, body)


def test_fqdn_slices_and_unknown_ports_are_skipped(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        cluster.server.put_slice(
            cluster.namespace,
            endpoint_slice("fqdn", SVC, [endpoint("db.example.test")], address_type="FQDN"),
        )
        await cluster.create_endpoints(SVC, ["127.0.1.1"], ports=(("grpc", 7000),))
        await cluster.create_endpoints(SVC, ["127.0.1.2"])
        rec = Recorder()
        async with running(resolver(cluster, "http"), rec):
            await rec.wait_for_deltas(1)
        assert rec.keys == keys("127.0.1.2")

    on_fake(tmp_path, body)


def test_nil_conditions_mean_what_the_api_says(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        raw = {
            "metadata": {"name": "raw", "labels": {"kubernetes.io/service-name": SVC}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["127.0.1.1"]},  # no conditions at all
                {"addresses": ["127.0.1.2"], "conditions": {}},  # ready nil: ready
                {"addresses": ["127.0.1.3"], "conditions": {"terminating": True}},  # serving nil
                {"addresses": ["127.0.1.4"], "conditions": {"ready": False}},
                {"addresses": ["127.0.1.5", "127.0.1.6"], "hostname": "pod-5", "zone": "z1"},
            ],
        }
        cluster.server.put_slice(cluster.namespace, raw)
        rec = Recorder()
        async with running(resolver(cluster), rec):
            await rec.wait_for_deltas(1)
        assert rec.deltas == [
            Reset(
                (
                    Endpoint("127.0.1.1", 8080),
                    Endpoint("127.0.1.2", 8080),
                    Endpoint("127.0.1.3", 8080, ready=True, terminating=True),
                    Endpoint("127.0.1.4", 8080, ready=False),
                    Endpoint("127.0.1.5", 8080, hostname="pod-5", zone="z1"),  # first address
                )
            )
        ]

    on_fake(tmp_path, body)


def test_changes_nobody_can_see_emit_nothing(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        await cluster.create_endpoints(SVC, ["127.0.1.1"], slice_name="pay-a")
        rec = Recorder()
        async with running(resolver(cluster), rec):
            await rec.wait_for_deltas(1)
            await cluster.scale(SVC, ["127.0.1.1"])  # MODIFIED, same content
            cluster.server.bookmark()
            await cluster.create_endpoints(SVC, ["127.0.1.1"], slice_name="pay-dup")
            await cluster.create_endpoints("other", ["127.0.1.7"])
            await cluster.scale(SVC, ["127.0.1.1", "127.0.1.2"], slice_name="pay-a")
            await rec.wait_for_keys(keys("127.0.1.1", "127.0.1.2"))
        assert len(rec.deltas) == 2  # the first list, then the one real change

    on_fake(tmp_path, body)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_dropped_watch_resumes_from_its_resource_version(
    tmp_path: Path, loop_factory: Any
) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        async with running(resolver(cluster), rec):
            await rec.wait_for_deltas(1)
            await server.wait_for_watches(1)
            await cluster.scale(SVC, ["127.0.1.1", "127.0.1.2"])
            await rec.wait_for_keys(keys("127.0.1.1", "127.0.1.2"))
            seen = str(server.resource_version)
            server.drop_watches()
            await cluster.scale(SVC, ["127.0.1.2"])  # made while no watch is open
            await rec.wait_for_keys(keys("127.0.1.2"))
        watches = server.watch_requests()
        assert len(watches) == 2
        assert watches[1].query["resourceVersion"] == seen  # resumed, not relisted
        assert len(server.list_requests()) == 1

    on_fake(tmp_path, body, loop_factory)


def test_bookmarks_move_the_resume_point(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        async with running(resolver(cluster), rec):
            await server.wait_for_watches(1)
            await cluster.create_endpoints("other", ["127.0.1.7"])  # moves the version only
            bookmarked = str(server.resource_version)
            server.bookmark()
            server.end_watches()  # after the bookmark, like a timeoutSeconds end
            second = await server.wait_for_requests(
                lambda req: req.watch and req is not server.watch_requests()[0]
            )
        assert second.query["resourceVersion"] == bookmarked
        assert server.watch_requests()[0].query["allowWatchBookmarks"] in ("True", "true")
        assert len(rec.deltas) == 1


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_an_in_stream_410_leads_to_a_fresh_list(tmp_path: Path, loop_factory: Any) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        r = resolver(cluster)
        async with running(r, rec):
            await server.wait_for_watches(1)
            await cluster.scale(SVC, ["127.0.1.1", "127.0.1.2"])
            await rec.wait_for_keys(keys("127.0.1.1", "127.0.1.2"))
            server.expire_watches()
            await wait_until(lambda: len(server.list_requests()) == 2, what="a relist")
            await server.wait_for_watches(1)
            await cluster.scale(SVC, ["127.0.1.3"])
            await rec.wait_for_keys(keys("127.0.1.3"))
        assert r.stats.relists == 1
        assert sum(r.stats.errors.values()) == 0  # expiry is routine, not an error
        assert "resourceVersion" not in server.list_requests()[1].query

    on_fake(tmp_path, body, loop_factory)


def test_resuming_from_a_compacted_version_relists(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        r = resolver(cluster)
        async with running(r, rec):
            await server.wait_for_watches(1)
            await server.go_down()  # a long outage: the history is compacted meanwhile
            await cluster.scale(SVC, ["127.0.1.5"])
            server.compact()
            await server.come_back()
            await rec.wait_for_keys(keys("127.0.1.5"))
        assert r.stats.relists == 1
        assert r.stats.errors["connection"] >= 1

    on_fake(tmp_path, body)


@pytest.mark.parametrize("code", [401, 403])
def test_401_and_403_keep_the_last_endpoints_and_count(tmp_path: Path, code: int) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1", "127.0.1.2"])
        rec = Recorder()
        r = resolver(cluster)
        kind = {401: "unauthorized", 403: "forbidden"}[code]
        async with running(r, rec):
            await server.wait_for_watches(1)
            server.fail_requests(code)
            server.drop_watches()
            await cluster.scale(SVC, ["127.0.1.3"])  # happens, but cannot be seen
            await wait_until(lambda: r.stats.errors[kind] >= 3, what=f"{kind} errors")
            assert rec.keys == keys("127.0.1.1", "127.0.1.2")  # kept, nothing emitted
            assert len(rec.deltas) == 1
            server.fail_requests(None)
            await rec.wait_for_keys(keys("127.0.1.3"))
        # The dropped stream is one connection error; everything after it was the status code.
        assert {k for k, n in r.stats.errors.items() if n} <= {kind, "connection"}
        assert r.stats.errors["connection"] <= 1

    on_fake(tmp_path, body)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_the_api_server_down_for_a_while_then_back(tmp_path: Path, loop_factory: Any) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        r = resolver(cluster)
        async with running(r, rec):
            await server.wait_for_watches(1)
            await server.go_down()
            await wait_until(lambda: r.stats.errors["connection"] >= 3, what="refusals")
            assert rec.keys == keys("127.0.1.1")
            await cluster.scale(SVC, ["127.0.1.1", "127.0.1.2"])
            await server.come_back()
            await rec.wait_for_keys(keys("127.0.1.1", "127.0.1.2"))
            assert len(rec.deltas) == 2

    on_fake(tmp_path, body, loop_factory)


def test_a_hung_api_server_times_out_instead_of_waiting_forever(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        r = resolver(cluster, request_timeout=0.3)
        async with running(r, rec):
            await rec.wait_for_deltas(1)
            await server.wait_for_watches(1)
            server.stall_requests()
            server.drop_watches()
            await wait_until(lambda: r.stats.errors["timeout"] >= 1, what="a timeout")
            server.stall_requests(False)
            await cluster.scale(SVC, ["127.0.1.2"])
            await rec.wait_for_keys(keys("127.0.1.2"))

    on_fake(tmp_path, body)


def test_watches_are_recycled_by_timeout_seconds(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        r = resolver(cluster, watch_timeout=1)
        async with running(r, rec):
            await wait_until(lambda: r.stats.watch_restarts >= 1, within=10, what="a restart")
            await cluster.scale(SVC, ["127.0.1.2"])
            await rec.wait_for_keys(keys("127.0.1.2"))
        timeouts = {int(w.query["timeoutSeconds"]) for w in server.watch_requests()}
        assert timeouts and all(1 <= t < 2 for t in timeouts)
        assert sum(r.stats.errors.values()) == 0 and len(server.list_requests()) == 1

    on_fake(tmp_path, body)


def test_a_rotated_token_is_used_at_once(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        r = resolver(cluster)
        async with running(r, rec):
            await server.wait_for_watches(1)
            server.rotate_token("token-1")  # the old one is revoked with it
            await cluster.scale(SVC, ["127.0.1.2"])  # the open stream still delivers
            await rec.wait_for_keys(keys("127.0.1.2"))
            # A clean end (no error, so the same client) and a new watch: the token file was
            # re-read before that request, not after a 401.
            server.end_watches()
            await server.wait_for_requests(lambda req: req.watch and req.token == "token-1")
            await cluster.scale(SVC, ["127.0.1.3"])
            await rec.wait_for_keys(keys("127.0.1.3"))
        assert [w.token for w in server.watch_requests()] == ["token-0", "token-1"]
        assert sum(r.stats.errors.values()) == 0

    on_fake(tmp_path, body)


def test_a_token_revoked_before_the_file_changes_recovers_on_rotation(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        r = resolver(cluster)
        async with running(r, rec):
            await server.wait_for_watches(1)
            server.rotate_token("token-1", write_file=False)
            server.drop_watches()
            await wait_until(lambda: r.stats.errors["unauthorized"] >= 2, what="401s")
            assert rec.keys == keys("127.0.1.1")
            server.token_path.write_text("token-1\n")  # kubelet catches up
            await cluster.scale(SVC, ["127.0.1.2"])
            await rec.wait_for_keys(keys("127.0.1.2"))
        assert server.requests[-1].token == "token-1"

    on_fake(tmp_path, body)


def test_missing_credentials_count_as_config_errors_until_they_appear(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        token = server.token_path.read_text()
        server.token_path.unlink()
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        rec = Recorder()
        r = resolver(cluster)
        async with running(r, rec):
            await wait_until(lambda: r.stats.errors["config"] >= 2, what="config errors")
            assert rec.deltas == [] and r.stats.last_success is None
            server.token_path.write_text(token)
            await rec.wait_for_keys(keys("127.0.1.1"))

    on_fake(tmp_path, body)


# -- how a caller builds one ---------------------------------------------------------------------


def test_default_api_takes_the_in_cluster_path_in_a_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("POD_NAMESPACE", cluster.namespace)
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        api = default_api(token_path=str(server.token_path), ca_path=str(server.ca_path))
        r = KubernetesResolver(SVC, None, "http", api=api, **FAST)
        assert r.namespace == cluster.namespace
        rec = Recorder()
        async with running(r, rec):
            await rec.wait_for_keys(keys("127.0.1.1"))

    on_fake(tmp_path, body)


def test_kubeconfig_path_outside_a_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(cluster: FakeCluster) -> None:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(cluster.server.write_kubeconfig()))
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        for api in (default_api(), kubeconfig()):
            rec = Recorder()
            async with running(KubernetesResolver(SVC, "shop", "http", api=api, **FAST), rec):
                await rec.wait_for_keys(keys("127.0.1.1"))

    on_fake(tmp_path, body)


def test_pod_namespace_comes_from_env_then_the_service_account_file(tmp_path: Path) -> None:
    ns_file = tmp_path / "namespace"
    assert pod_namespace({"POD_NAMESPACE": "env-ns"}, str(ns_file)) == "env-ns"
    assert pod_namespace({}, str(ns_file)) == "default"
    ns_file.write_text("file-ns\n")
    assert pod_namespace({}, str(ns_file)) == "file-ns"
    assert pod_namespace({"POD_NAMESPACE": ""}, str(ns_file)) == "file-ns"


def test_termination_grace_period_of_a_pod(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        cluster.server.put_pod("shop", "app-0", termination_grace_period_seconds=45)
        api = cluster.api()
        assert await termination_grace_period("app-0", "shop", api=api) == 45
        assert await termination_grace_period("missing", "shop", api=api) is None
        await cluster.server.go_down()
        assert await termination_grace_period("app-0", "shop", api=api) is None

    on_fake(tmp_path, body)


def test_stats_object_is_the_callers(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        stats = DiscoveryStats()
        await cluster.create_endpoints(SVC, ["127.0.1.1"])
        r = KubernetesResolver(SVC, "shop", "http", api=cluster.api(), stats=stats, **FAST)
        assert r.stats is stats
        rec = Recorder()
        async with running(r, rec):
            await rec.wait_for_deltas(1)
        assert stats.updates == 1

    on_fake(tmp_path, body)


def test_in_cluster_factory_builds_a_client_for_the_fake(tmp_path: Path) -> None:
    async def body(cluster: FakeCluster) -> None:
        server = cluster.server
        api_client = await in_cluster(
            token_path=str(server.token_path), ca_path=str(server.ca_path), environ=server.env()
        )()
        try:
            assert api_client.target.host == server.url
            listed = await api_client.get_json(
                "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
                {},
                connect_timeout=5,
                total=5,
            )
            assert listed["kind"] == "EndpointSliceList"
        finally:
            await api_client.close()

    on_fake(tmp_path, body)
