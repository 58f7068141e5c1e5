"""The fake API server itself: real schemas, the real client's view of it, and each fault."""

from __future__ import annotations

import asyncio
import json
import ssl
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from referencing import Registry, Resource

from sidecar.discovery.kubernetes import in_cluster
from tests.k8s.cluster_iface import RealCluster
from tests.k8s.fake_apiserver import FakeApiServer, endpoint, endpoint_slice, parse_selector
from tests.k8s.support import run

K8S_VERSION = "1.33"
NS = "shop"


def pay_slice(name: str = "pay-a", *ips: str) -> Any:
    return endpoint_slice(
        name,
        "payments",
        [endpoint(ip, pod=f"pod-{ip}") for ip in ips or ("127.0.1.1",)],
        (("https", 8443), ("metrics", 9090)),
    )


def validate_meta(obj: dict[str, Any], kind: str) -> None:
    """Status is a meta/v1 kind served as apiVersion "v1", which kubernetes-validate cannot
    route to its schema file; validate against that same file with jsonschema directly."""
    schemas = (
        files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    )
    schema = json.loads((schemas / f"{kind}-meta-v1.json").read_text())
    definitions = json.loads((schemas / "_definitions.json").read_text())
    registry = Resource.from_contents(schema) @ (Resource.from_contents(definitions) @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)


async def real_client(fake: FakeApiServer) -> Any:
    """kubernetes-asyncio's own ApiClient through its in-cluster loader, pointed at the fake:
    the fake must speak the protocol the unmodified client expects (the sidecar reads the same
    API as JSON, `sidecar/discovery/kubeapi.py`)."""
    from kubernetes_asyncio import config

    configuration = client.Configuration()
    config.load_incluster_config(  # type: ignore[no-untyped-call]
        client_configuration=configuration,
        try_refresh_token=False,
        token_filename=str(fake.token_path),
        cert_filename=str(fake.ca_path),
        environ=fake.env(),
    )
    return client.ApiClient(configuration)


async def raw_get(fake: FakeApiServer, path: str, token: str | None = "token-0") -> Any:
    ctx = ssl.create_default_context(cafile=str(fake.ca_path))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(fake.url + path, ssl=ctx, headers=headers) as resp,
    ):
        return resp.status, resp.headers, await resp.read()


def test_served_objects_validate_against_the_real_schemas(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path) as fake:
            served = fake.put_slice(NS, pay_slice("pay-a", "127.0.1.1", "127.0.1.2"))
            terminating = endpoint("127.0.1.3", ready=False, serving=True, terminating=True)
            served_t = fake.put_slice(NS, endpoint_slice("pay-b", "payments", [terminating]))
            pod = fake.put_pod(NS, "app-0", termination_grace_period_seconds=45)
            for obj in (served, served_t, pod):
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            status, _, body = await raw_get(
                fake, f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
            )
            assert status == 200
            listed = json.loads(body)
            assert listed["kind"] == "EndpointSliceList"
            assert listed["metadata"]["resourceVersion"] == str(fake.resource_version)
            kubernetes_validate.validate(listed, K8S_VERSION, strict=True)
            # Watch lines: WatchEvents ({type, object} and nothing else; the schema file of that
            # meta/v1 kind has no kind/apiVersion to find it by), each object an EndpointSlice.
            status, _, body = await raw_get(
                fake,
                f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
                "?watch=true&timeoutSeconds=1",
            )
            lines = body.decode().splitlines()
            assert status == 200 and len(lines) == 2
            for line in lines:
                event = json.loads(line)
                assert set(event) == {"type", "object"} and event["type"] == "ADDED"
                kubernetes_validate.validate(event["object"], K8S_VERSION, strict=True)
            assert served["addressType"] == "IPv4"
            assert served["endpoints"][0]["conditions"] == {"ready": True, "serving": True}
            assert served["endpoints"][0]["targetRef"] == {"kind": "Pod", "name": "pod-127.0.1.1"}
            assert served["ports"][0] == {"name": "https", "port": 8443, "protocol": "TCP"}
            assert pod["spec"]["terminationGracePeriodSeconds"] == 45

    run(main)


def test_the_real_client_lists_typed_objects_and_reads_pods(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path) as fake:
            fake.put_slice(NS, pay_slice("pay-a", "127.0.1.1"))
            fake.put_slice(NS, endpoint_slice("other", "other", [endpoint("127.0.2.1")]))
            fake.put_slice("elsewhere", pay_slice("pay-x", "127.0.3.1"))
            fake.put_pod(NS, "app-0", termination_grace_period_seconds=45)
            api_client = await real_client(fake)
            async with api_client:
                api = client.DiscoveryV1Api(api_client)
                got = await api.list_namespaced_endpoint_slice(
                    NS, label_selector="kubernetes.io/service-name=payments"
                )
                assert isinstance(got, client.V1EndpointSliceList)
                assert [s.metadata.name for s in got.items] == ["pay-a"]
                assert got.items[0].endpoints[0].addresses == ["127.0.1.1"]
                assert got.metadata.resource_version == str(fake.resource_version)
                pod = await client.CoreV1Api(api_client).read_namespaced_pod("app-0", NS)
                assert pod.spec.termination_grace_period_seconds == 45
                with pytest.raises(ApiException) as missing:
                    await client.CoreV1Api(api_client).read_namespaced_pod("nope", NS)
                assert missing.value.status == 404
            assert fake.requests[0].token == "token-0"

    run(main)


def test_watch_replays_after_a_version_then_streams_live_changes(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path) as fake:
            first = fake.put_slice(NS, pay_slice("pay-a", "127.0.1.1"))
            fake.put_slice(NS, pay_slice("pay-a", "127.0.1.1", "127.0.1.2"))
            api_client = await real_client(fake)
            seen: list[tuple[str, str]] = []
            async with api_client, watch.Watch() as w:
                stream = w.stream(
                    client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice,
                    NS,
                    label_selector="kubernetes.io/service-name=payments",
                    resource_version=first["metadata"]["resourceVersion"],
                    allow_watch_bookmarks=True,
                    timeout_seconds=5,
                )
                async with asyncio.timeout(10):
                    async for event in stream:
                        seen.append((event["type"], event["raw_object"]["metadata"].get("name")))
                        if len(seen) == 1:
                            assert isinstance(event["object"], client.V1EndpointSlice)
                            fake.bookmark()
                            fake.delete_slice(NS, "pay-a")
                            fake.put_slice(NS, endpoint_slice("o", "other", []))  # not selected
                        if len(seen) == 3:
                            fake.end_watches()
            assert seen == [("MODIFIED", "pay-a"), ("BOOKMARK", None), ("DELETED", "pay-a")]
            assert w.resource_version == str(fake.resource_version - 1)
            (request,) = fake.watch_requests()
            assert request.query["watch"] in ("True", "true", "1")
            assert request.query["allowWatchBookmarks"] in ("True", "true")
            assert request.query["timeoutSeconds"] == "5"

    run(main)


def test_a_label_change_is_deleted_for_the_old_selector_and_added_for_the_new(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path) as fake:
            api_client = await real_client(fake)
            types: list[str] = []
            async with api_client, watch.Watch() as w:
                fn = client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice
                stream = w.stream(fn, NS, label_selector="kubernetes.io/service-name=payments")
                await fake_put_soon(fake, pay_slice("s", "127.0.1.1"))
                async with asyncio.timeout(10):
                    async for event in stream:
                        types.append(event["type"])
                        if len(types) == 1:
                            fake.put_slice(NS, endpoint_slice("s", "renamed", []))
                        else:
                            break
            assert types == ["ADDED", "DELETED"]

    run(main)


async def fake_put_soon(fake: FakeApiServer, body: Any) -> None:
    async def later() -> None:
        await fake.wait_for_watches(1)
        fake.put_slice(NS, body)

    task = asyncio.create_task(later())
    task.add_done_callback(lambda t: t.result())


def test_a_watch_from_a_compacted_version_gets_an_in_stream_410(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path) as fake:
            old = fake.put_slice(NS, pay_slice("pay-a"))["metadata"]["resourceVersion"]
            fake.put_slice(NS, pay_slice("pay-a", "127.0.1.2"))
            fake.compact()
            api_client = await real_client(fake)
            async with api_client, watch.Watch() as w:
                fn = client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice
                with pytest.raises(ApiException) as expired:
                    async with asyncio.timeout(10):
                        async for _ in w.stream(fn, NS, resource_version=old, timeout_seconds=5):
                            pass
            assert expired.value.status == 410
            assert "Expired" in str(expired.value.reason)
            assert fake.watch_requests()[0].status == 200  # the 410 came in the stream

    run(main)


def test_status_bodies_for_401_403_and_unknown_paths(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path) as fake:
            path = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
            status, headers, body = await raw_get(fake, path, token=None)
            assert status == 401 and headers["Content-Type"].startswith("application/json")
            assert json.loads(body)["reason"] == "Unauthorized"
            status, _, body = await raw_get(fake, path, token="wrong")
            assert status == 401
            fake.fail_requests(403)
            status, _, body = await raw_get(fake, path)
            validate_meta(json.loads(body), "status")
            assert (status, json.loads(body)["code"], json.loads(body)["kind"]) == (
                403,
                403,
                "Status",
            )
            fake.fail_requests(None)
            status, _, body = await raw_get(fake, "/apis/nothing.here/v1/things")
            assert status == 404 and json.loads(body)["reason"] == "NotFound"
            validate_meta(json.loads(body), "status")
            fake.fail_requests(401)
            validate_meta(json.loads((await raw_get(fake, path))[2]), "status")

    run(main)


def test_watch_timeout_seconds_ends_the_stream_cleanly(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path) as fake:
            api_client = await real_client(fake)
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with api_client, watch.Watch() as w:
                fn = client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice
                async with asyncio.timeout(10):
                    events = [e async for e in w.stream(fn, NS, timeout_seconds=1)]
            assert events == []
            assert 0.9 < loop.time() - started < 5
            assert fake.open_watches == 0

    run(main)


def test_drop_go_down_come_back_and_token_rotation(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeApiServer(tmp_path) as fake:
            fake.put_slice(NS, pay_slice())
            api_client = await real_client(fake)
            async with api_client:
                api = client.DiscoveryV1Api(api_client)
                async with watch.Watch() as w:
                    stream = w.stream(api.list_namespaced_endpoint_slice, NS, timeout_seconds=30)
                    async with asyncio.timeout(10):
                        assert (await stream.__anext__())["type"] == "ADDED"
                        fake.drop_watches()
                        with pytest.raises(aiohttp.ClientError):
                            await stream.__anext__()
                port = fake.port
                await fake.go_down()
                with pytest.raises(aiohttp.ClientConnectorError):
                    await api.list_namespaced_endpoint_slice(NS, _request_timeout=5)
                await fake.come_back()
                assert fake.port == port
                assert len((await api.list_namespaced_endpoint_slice(NS)).items) == 1

                fake.rotate_token("token-1")
                assert fake.token_path.read_text() == "token-1"
                # The sidecar's in-cluster client notices the new file before its next request.
                ours = await in_cluster(
                    token_path=str(fake.token_path), ca_path=str(fake.ca_path), environ=fake.env()
                )()
                try:
                    path = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
                    await ours.get_json(path, {}, connect_timeout=5, total=5)
                    assert fake.requests[-1].token == "token-1"
                    assert fake.requests[-1].status == 200
                    fake.rotate_token("token-2")
                    await ours.get_json(path, {}, connect_timeout=5, total=5)
                    assert fake.requests[-1].token == "token-2"
                    assert fake.requests[-1].status == 200
                finally:
                    await ours.close()

                fake.stall_requests()
                with pytest.raises(asyncio.TimeoutError):
                    await api.list_namespaced_endpoint_slice(NS, _request_timeout=(1, 0.2))
                fake.stall_requests(False)

    run(main)


def test_the_real_cluster_driver_works_against_the_fake(tmp_path: Path) -> None:
    """RealCluster only runs when a real cluster is given; this keeps its code honest meanwhile
    (the same client calls, through a kubeconfig, against our server's write endpoints)."""

    async def main() -> None:
        async with FakeApiServer(tmp_path) as fake:
            cluster = await RealCluster.connect(str(fake.write_kubeconfig()))
            ns = cluster.namespace
            assert fake.get("namespaces", "", ns) is not None
            name = await cluster.create_endpoints("payments", ["127.0.1.1", "127.0.1.2"])
            await cluster.scale("payments", ["127.0.1.2", "127.0.1.3"])
            await cluster.mark_terminating("payments", "127.0.1.3", serving=True)
            served = fake.get("endpointslices", ns, name)
            assert served is not None
            kubernetes_validate.validate(served, K8S_VERSION, strict=True)
            assert [e["addresses"][0] for e in served["endpoints"]] == ["127.0.1.2", "127.0.1.3"]
            assert served["endpoints"][1]["conditions"] == {
                "ready": False,
                "serving": True,
                "terminating": True,
            }
            assert served["metadata"]["labels"]["kubernetes.io/service-name"] == "payments"
            await cluster.delete_endpoints("payments")
            assert fake.get("endpointslices", ns, name) is None
            await cluster.aclose()
            assert fake.get("namespaces", "", ns) is None
            methods = [(r.method, r.status) for r in fake.requests]
            assert methods == [
                ("POST", 201),
                ("POST", 201),
                ("PUT", 200),
                ("PUT", 200),
                ("DELETE", 200),
                ("DELETE", 200),
            ]

    run(main)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=b", {"a": "b"}, True),
        ("a==b", {"a": "c"}, False),
        ("a!=b", {}, True),
        ("a,!c", {"a": "x"}, True),
        ("a,!c", {"a": "x", "c": ""}, False),
        ("a in (x, y),b notin (z)", {"a": "y", "b": "w"}, True),
        ("a in (x, y),b notin (z)", {"a": "y", "b": "z"}, False),
        ("", {"anything": "1"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector)(labels) is expected
