"""Pure routing (SPEC section 5): fixed cluster, routes by host/suffix/path, forward proxy with
allowed_hosts globs and port pins, CONNECT, refusal of loops to our own listener, 404/403."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.config import ListenerConfig
from sidecar.downstream.router import ForwardTarget, RouteTable, route, split_authority
from sidecar.errors import HostNotAllowed, NoRoute, ProtocolError

OWN = frozenset({("127.0.0.1", 15001)})


def table(own: frozenset[tuple[str, int]] = OWN, **listener: Any) -> RouteTable:
    """A table built the way app.py builds it: from a validated listener config."""
    cfg = ListenerConfig.model_validate({"name": "egress", "address": "127.0.0.1:15001",
                                         **listener})
    return RouteTable.from_config(cfg, own)


def fwd(allowed: list[str], connect: bool = True, **listener: Any) -> RouteTable:
    return table(forward_proxy={"enabled": True, "allowed_hosts": allowed, "connect": connect},
                 **listener)


ROUTES = [
    {"match": {"host": "payments"}, "cluster": "payments"},
    {"match": {"host": "api.example.com", "path_prefix": "/v2/"}, "cluster": "api-v2"},
    {"match": {"host": "api.example.com"}, "cluster": "api"},
    {"match": {"host_suffix": ".svc.cluster.local"}, "cluster": "mesh"},
    {"match": {"path_prefix": "/static/"}, "cluster": "cdn"},
]


def test_fixed_cluster_wins_over_everything() -> None:
    t = table(cluster="payments", routes=ROUTES,
              forward_proxy={"enabled": True, "allowed_hosts": ["*"]})
    assert route(t, b"api.example.com", b"/v2/x", False) == "payments"
    assert route(t, b"", b"/", False) == "payments"  # HTTP/1.0 without Host
    assert route(t, b"db:5432", b"db:5432", True) == "payments"


@pytest.mark.parametrize(("authority", "path", "cluster"), [
    (b"payments", b"/", "payments"),
    (b"PAYMENTS:8080", b"/x", "payments"),  # case-insensitive, the port does not matter
    (b"api.example.com", b"/v2/users", "api-v2"),  # first match wins, in order
    (b"api.example.com", b"/v1/users", "api"),
    (b"api.example.com", b"/v2", "api"),  # a prefix is a prefix
    (b"orders.shop.svc.cluster.local:80", b"/", "mesh"),
    (b"anything", b"/static/app.js", "cdn"),
])
def test_routes_match_host_suffix_and_path_in_order(
    authority: bytes, path: bytes, cluster: str
) -> None:
    assert route(table(routes=ROUTES), authority, path, False) == cluster


def test_no_route_is_404() -> None:
    with pytest.raises(NoRoute) as info:
        route(table(routes=ROUTES), b"unknown.example", b"/", False)
    assert (info.value.status, info.value.code) == (404, "no_route")


def test_routes_come_before_the_forward_proxy() -> None:
    t = fwd(["*"], routes=ROUTES)
    assert route(t, b"payments", b"/", False) == "payments"
    assert route(t, b"other:8080", b"/", False) == ForwardTarget("other", 8080)


@pytest.mark.parametrize(("authority", "connect", "target"), [
    (b"orders.svc.cluster.local", False, ForwardTarget("orders.svc.cluster.local", 80)),
    (b"a.b.svc.cluster.local:9000", False, ForwardTarget("a.b.svc.cluster.local", 9000)),
    (b"api.example.com:8443", False, ForwardTarget("api.example.com", 8443)),
    (b"api.example.com:8443", True, ForwardTarget("api.example.com", 8443)),
    (b"10.1.2.3:80", False, ForwardTarget("10.1.2.3", 80)),
    (b"[::1]:8080", False, ForwardTarget("::1", 8080)),
    (b"[fd00::5]", False, ForwardTarget("fd00::5", 80)),
])
def test_forward_proxy_allows_globs_and_pinned_ports(
    authority: bytes, connect: bool, target: ForwardTarget
) -> None:
    t = fwd(["*.svc.cluster.local", "api.example.com:8443", "10.*", "[::1]:8080", "[fd00::5]"])
    assert route(t, authority, authority if connect else b"/", connect) == target


@pytest.mark.parametrize(("authority", "connect"), [
    (b"evil.example", False),
    (b"svc.cluster.local", False),  # "*." needs a label before the suffix
    (b"api.example.com", False),  # pinned to 8443; this is port 80
    (b"api.example.com:443", True),  # CONNECT defaults to 443, still not 8443
    (b"11.0.0.1", False),
    (b"[::1]:80", False),  # the [v6]:port pin is a port pin, not a character class
    (b"1:80", False),
])
def test_forward_proxy_refuses_other_hosts_with_403(authority: bytes, connect: bool) -> None:
    t = fwd(["*.svc.cluster.local", "api.example.com:8443", "10.*", "[::1]:8080"])
    with pytest.raises(HostNotAllowed) as info:
        route(t, authority, authority if connect else b"/", connect)
    assert (info.value.status, info.value.code) == (403, "host_not_allowed")


def test_star_allows_any_host_ip_literals_included() -> None:
    t = fwd(["*"])
    assert route(t, b"example.org", b"/", False) == ForwardTarget("example.org", 80)
    assert route(t, b"192.0.2.7:81", b"/", False) == ForwardTarget("192.0.2.7", 81)
    assert route(t, b"[2001:db8::1]:443", b"[2001:db8::1]:443", True).cluster == (
        "[2001:db8::1]:443")


def test_connect_needs_connect_enabled() -> None:
    off = fwd(["*"], connect=False)
    assert route(off, b"h:80", b"/", False) == ForwardTarget("h", 80)
    with pytest.raises(HostNotAllowed):
        route(off, b"h:443", b"h:443", True)
    assert route(fwd(["*"]), b"h:443", b"h:443", True) == ForwardTarget("h", 443)


def test_without_forward_proxy_an_unrouted_connect_is_404() -> None:
    with pytest.raises(NoRoute):
        route(table(routes=ROUTES), b"h:443", b"h:443", True)


@pytest.mark.parametrize("authority", [
    b"127.0.0.1:15001", b"localhost:15001", b"127.0.0.2:15001", b"[::1]:15001",
    b"0.0.0.0:15001", b"LOCALHOST:15001",
])
def test_forwarding_to_our_own_listener_is_refused(authority: bytes) -> None:
    with pytest.raises(HostNotAllowed, match="own listener"):
        route(fwd(["*"]), authority, b"/", False)


def test_own_listener_on_the_wildcard_address_is_reached_through_loopback() -> None:
    t = fwd(["*"], own=frozenset({("0.0.0.0", 15001)}))
    with pytest.raises(HostNotAllowed):
        route(t, b"127.0.0.1:15001", b"/", False)
    assert route(t, b"127.0.0.1:15002", b"/", False) == ForwardTarget("127.0.0.1", 15002)


def test_other_ports_on_loopback_are_fine() -> None:
    assert route(fwd(["*"]), b"127.0.0.1:8080", b"/", False) == ForwardTarget("127.0.0.1", 8080)


@pytest.mark.parametrize(("authority", "expected"), [
    (b"Host", ("host", 80)),
    (b"host:8080", ("host", 8080)),
    (b"host:", ("host", 80)),
    (b"[::1]", ("::1", 80)),
    (b"[::1]:9", ("::1", 9)),
    (b" spaced.example ", ("spaced.example", 80)),
])
def test_split_authority(authority: bytes, expected: tuple[str, int]) -> None:
    assert split_authority(authority, 80) == expected


@pytest.mark.parametrize("authority", [b"", b"h:0", b"h:65536", b"h:http", b"[::1", b"h:-1"])
def test_bad_authorities_are_protocol_errors(authority: bytes) -> None:
    with pytest.raises(ProtocolError):
        split_authority(authority, 80)
    with pytest.raises(ProtocolError):
        route(fwd(["*"]), authority, b"/", False)


def test_forward_target_names_its_dynamic_cluster() -> None:
    assert ForwardTarget("h", 8080).cluster == "h:8080"
    assert ForwardTarget("::1", 80).cluster == "[::1]:80"
