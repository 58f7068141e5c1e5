"""What discovery tests do to a cluster: a fake one (our API server) and a real one (KUBECONFIG)."""

from __future__ import annotations

import contextlib
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config

from sidecar.discovery.kubernetes import ApiFactory, in_cluster, kubeconfig
from tests.k8s.fake_apiserver import FakeApiServer, endpoint, endpoint_slice

# Tests speak in endpoints of a Service: create, scale, delete, mark terminating. Both
# implementations turn that into EndpointSlice writes, built from kubernetes-asyncio's models:
#
# - `FakeCluster` writes into a `FakeApiServer` (which also offers the faults a real cluster can't);
# - `RealCluster` creates EndpointSlices directly in a fresh namespace of the cluster named by
#   `SIDECAR_E2E_KUBECONFIG` (kind, k3d, minikube) and deletes the namespace afterwards. The slices
#   carry their own `endpointslice.kubernetes.io/managed-by`, so no controller touches them, and no
#   Service or pod is needed. See e2e/README-discovery.md.
#
# `open_cluster(kind, tmp_path)` gives either, as an async context manager; `CLUSTER_KINDS` is the
# pytest parametrization (the real one skipped, with the reason, unless the variable is set).

E2E_ENV = "SIDECAR_E2E_KUBECONFIG"
MANAGED_BY = "sidecar-e2e"
HTTP = (("http", 8080),)

CLUSTER_KINDS = [
    pytest.param("fake", id="fake"),
    pytest.param(
        "real",
        id="real",
        marks=pytest.mark.skipif(
            not os.environ.get(E2E_ENV),
            reason=f"opt-in: set {E2E_ENV} to a kubeconfig for a real cluster "
            "(see e2e/README-discovery.md)",
        ),
    ),
]


@dataclass
class _Endpoint:
    ready: bool = True
    serving: bool | None = None
    terminating: bool | None = None


@dataclass
class _Slice:
    service: str
    ports: tuple[tuple[str, int], ...]
    address_type: str
    endpoints: dict[str, _Endpoint] = field(default_factory=dict)


class Cluster(ABC):
    """Endpoint operations on a Service, as EndpointSlice writes in `self.namespace`."""

    namespace: str

    def __init__(self) -> None:
        self._slices: dict[str, _Slice] = {}

    # Endpoint addresses are data here: nothing connects to them. The fake gets loopback ones
    # (tests keep to 127.0.0.0/8 throughout); a real API server refuses loopback endpoint IPs
    # (ValidateEndpointIP), so a real cluster gets the documentation ranges, never routed either.
    @abstractmethod
    def ip(self, n: int) -> str:
        """The n-th IPv4 endpoint address (1..254)."""

    @abstractmethod
    def ip6(self, n: int) -> str:
        """The n-th IPv6 endpoint address."""

    @abstractmethod
    def api(self) -> ApiFactory:
        """How a resolver under test reaches this cluster."""

    @abstractmethod
    async def _write(self, body: client.V1EndpointSlice, *, create: bool) -> None: ...

    @abstractmethod
    async def _remove(self, name: str) -> None: ...

    async def create_endpoints(
        self,
        service: str,
        ips: Iterable[str],
        *,
        slice_name: str | None = None,
        ports: Iterable[tuple[str, int]] = HTTP,
        address_type: str = "IPv4",
        ready: bool = True,
    ) -> str:
        """A new EndpointSlice of `service` with `ips`; returns its name."""
        name = slice_name or f"{service}-{secrets.token_hex(3)}"
        assert name not in self._slices, name
        self._slices[name] = _Slice(
            service, tuple(ports), address_type, {ip: _Endpoint(ready) for ip in ips}
        )
        await self._write(self._body(name), create=True)
        return name

    async def scale(
        self, service: str, ips: Iterable[str], *, slice_name: str | None = None
    ) -> None:
        """The slice (the service's first, unless named) now holds exactly `ips`; endpoints it
        already had keep their conditions."""
        name = slice_name or self._slice_names(service)[0]
        sl = self._slices[name]
        sl.endpoints = {ip: sl.endpoints.get(ip, _Endpoint()) for ip in ips}
        await self._write(self._body(name), create=False)

    async def mark_terminating(
        self, service: str, ip: str, *, serving: bool = True, slice_name: str | None = None
    ) -> None:
        """What the controller writes when the pod behind `ip` gets its deletion timestamp."""
        for name in [slice_name] if slice_name else self._slice_names(service):
            ep = self._slices[name].endpoints.get(ip)
            if ep is not None:
                ep.ready, ep.serving, ep.terminating = False, serving, True
                await self._write(self._body(name), create=False)
                return
        raise KeyError(ip)

    async def set_ready(self, service: str, ip: str, ready: bool) -> None:
        for name in self._slice_names(service):
            ep = self._slices[name].endpoints.get(ip)
            if ep is not None:
                ep.ready, ep.serving = ready, ready
                await self._write(self._body(name), create=False)
                return
        raise KeyError(ip)

    async def delete_endpoints(self, service: str, *, slice_name: str | None = None) -> None:
        """Delete one slice of `service`, or all of them (the Service is gone)."""
        for name in [slice_name] if slice_name else self._slice_names(service):
            del self._slices[name]
            await self._remove(name)

    def _slice_names(self, service: str) -> list[str]:
        names = [n for n, sl in self._slices.items() if sl.service == service]
        if not names:
            raise KeyError(service)
        return names

    def _body(self, name: str) -> client.V1EndpointSlice:
        sl = self._slices[name]
        return endpoint_slice(
            name,
            sl.service,
            [
                endpoint(ip, ready=ep.ready, serving=ep.serving, terminating=ep.terminating)
                for ip, ep in sl.endpoints.items()
            ],
            sl.ports,
            address_type=sl.address_type,
            managed_by=MANAGED_BY,
        )


class FakeCluster(Cluster):
    """Writes into a running FakeApiServer; resolvers reach it through the in-cluster path."""

    def __init__(self, server: FakeApiServer, namespace: str = "shop") -> None:
        super().__init__()
        self.server = server
        self.namespace = namespace

    def ip(self, n: int) -> str:
        return f"127.0.1.{n}"

    def ip6(self, n: int) -> str:
        assert n == 1, "IPv6 has one loopback address"
        return "::1"

    def api(self) -> ApiFactory:
        return in_cluster(
            token_path=str(self.server.token_path),
            ca_path=str(self.server.ca_path),
            environ=self.server.env(),
        )

    async def _write(self, body: client.V1EndpointSlice, *, create: bool) -> None:
        self.server.put_slice(self.namespace, body)

    async def _remove(self, name: str) -> None:
        self.server.delete_slice(self.namespace, name)


class RealCluster(Cluster):
    """A throwaway namespace in the cluster of a kubeconfig; EndpointSlices written directly."""

    def __init__(self, kubeconfig_path: str, api_client: Any, namespace: str) -> None:
        super().__init__()
        self.kubeconfig_path = kubeconfig_path
        self.namespace = namespace
        self._client = api_client
        self._discovery = client.DiscoveryV1Api(api_client)

    @classmethod
    async def connect(cls, kubeconfig_path: str) -> RealCluster:
        configuration = client.Configuration()
        await config.load_kube_config(
            config_file=kubeconfig_path, client_configuration=configuration, persist_config=False
        )
        api_client = client.ApiClient(configuration)
        namespace = f"sidecar-e2e-{secrets.token_hex(4)}"
        try:
            await client.CoreV1Api(api_client).create_namespace(
                client.V1Namespace(
                    metadata=client.V1ObjectMeta(
                        name=namespace, labels={"app.kubernetes.io/created-by": MANAGED_BY}
                    )
                )
            )
        except BaseException:
            await api_client.close()
            raise
        return cls(kubeconfig_path, api_client, namespace)

    def ip(self, n: int) -> str:
        return f"192.0.2.{n}"  # TEST-NET-1, RFC 5737

    def ip6(self, n: int) -> str:
        return f"2001:db8::{n:x}"  # RFC 3849

    def api(self) -> ApiFactory:
        return kubeconfig(self.kubeconfig_path)

    async def _write(self, body: client.V1EndpointSlice, *, create: bool) -> None:
        if create:
            await self._discovery.create_namespaced_endpoint_slice(self.namespace, body)
        else:
            # An unconditional replace (no resourceVersion): we are the only writer.
            await self._discovery.replace_namespaced_endpoint_slice(
                body.metadata.name, self.namespace, body
            )

    async def _remove(self, name: str) -> None:
        await self._discovery.delete_namespaced_endpoint_slice(name, self.namespace)

    async def aclose(self) -> None:
        try:
            await client.CoreV1Api(self._client).delete_namespace(self.namespace)
        finally:
            await self._client.close()


@contextlib.asynccontextmanager
async def open_cluster(kind: str, workdir: Path) -> AsyncIterator[Cluster]:
    """A fresh cluster of `kind` ("fake" or "real") for one test."""
    if kind == "fake":
        async with FakeApiServer(workdir / "apiserver") as server:
            yield FakeCluster(server)
        return
    path = os.environ.get(E2E_ENV)
    if not path:
        pytest.skip(f"opt-in: {E2E_ENV} is not set")
    cluster = await RealCluster.connect(path)
    try:
        yield cluster
    finally:
        await cluster.aclose()
