"""Addresses (`host:port`, `[v6]:port`), host names and names: the field types and their checks."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

from sidecar.config.units import _kind

_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


def split_address(text: str) -> tuple[str, int]:
    """(host, port) from "host:port" or "[v6]:port", host without brackets. Port 0 is allowed
    (bind an ephemeral port, as tests do); raises ValueError with a readable message."""
    if not isinstance(text, str):
        raise ValueError(f"expected an address like 127.0.0.1:15001; got {_kind(text)}")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"address {text!r} must look like [::1]:15001")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"address {text!r} has no port: use host:port, e.g. 127.0.0.1:15001")
        if ":" in host:
            raise ValueError(f"address {text!r}: IPv6 addresses need brackets, e.g. [::1]:15001")
        if not host:
            raise ValueError(f"address {text!r} has no host: use e.g. 127.0.0.1{text}")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"address {text!r}: {host!r} is not a valid host name or IP")
    if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
        raise ValueError(f"address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def join_address(host: str, port: int) -> str:
    """(host, port) -> "host:port", bracketing IPv6 literals: the inverse of `split_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for "localhost", 127.0.0.0/8, ::1 (and ::ffff:127.x). Other names are not: we will
    not resolve DNS to decide whether a listener may bind."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _check_address(text: str) -> str:
    split_address(text)
    return text


Address = Annotated[str, AfterValidator(_check_address)]


def _check_endpoint(text: str) -> str:
    if split_address(text)[1] == 0:
        raise ValueError(f"endpoint {text!r}: port must be from 1 to 65535")
    return text


def _check_host(text: str) -> str:
    """A DNS name or an IP literal (IPv6 without brackets): what discovery and SNI take."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not _HOSTNAME.fullmatch(text):
            raise ValueError(f"{text!r} is not a valid host name or IP address") from None
    return text


def _check_name(text: str) -> str:
    # Names become metric labels and log fields: keep them printable and unambiguous.
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"name {text!r} must be non-empty without spaces")
    return text


def _empty_to_none(value: object) -> object:
    # `sni: ${SNI:-}` should mean "not set", not an empty SNI.
    return None if value == "" else value


Name = Annotated[str, AfterValidator(_check_name)]
OptionalPath = Annotated[str | None, BeforeValidator(_empty_to_none)]
