"""Showing a config: secrets redacted, suspicious settings as warnings, the one-line summary."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sidecar.config.addresses import is_loopback
from sidecar.config.root import Config

_SECRET_KEY = re.compile(r"token|passw|secret|credential|api[_-]?key|private", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_secrets(value: Any) -> Any:
    """A copy of JSON-like data with the value of every secret-looking key replaced. The
    config holds paths to key files, never their content; this guards fields to come."""
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


def config_warnings(config: Config) -> list[str]:
    """Valid but suspicious settings, for the log at start and for `/config`."""
    warnings: list[str] = []
    for listener in config.listeners:
        who = f"listener {listener.name}"
        if listener.allow_remote and not is_loopback(listener.host):
            warnings.append(f"{who}: {listener.address} accepts connections from outside the pod")
        if listener.protocol == "http":
            proxy = listener.forward_proxy
            if listener.cluster is None and not listener.routes and not proxy.enabled:
                warnings.append(f"{who}: no cluster, routes or forward_proxy: every request 404s")
            if listener.cluster is not None and (listener.routes or proxy.enabled):
                warnings.append(f"{who}: the fixed cluster takes every request: routes unused")
            if proxy.enabled and not proxy.allowed_hosts:
                warnings.append(f"{who}: forward_proxy has no allowed_hosts: every request 403s")
    for cluster in config.clusters:
        who = f"cluster {cluster.name}"
        tls = cluster.tls
        if tls.insecure_skip_verify:
            warnings.append(f"{who}: tls.insecure_skip_verify: upstream certificates not verified")
        if not tls.enabled and (tls.sni or tls.ca_file or tls.cert_file or tls.key_file):
            warnings.append(f"{who}: tls settings are ignored because tls.enabled is false")
        if cluster.protocol == "http1" and "http2" in cluster.model_fields_set:
            warnings.append(f"{who}: http2 settings are ignored because protocol is http1")
        if cluster.retry.per_try_timeout > cluster.timeouts.request:
            warnings.append(f"{who}: retry.per_try_timeout exceeds timeouts.request")
    return warnings


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as JSON-able data for `/config` and `sidecar config-dump`: durations
    and sizes as strings ("250ms", "64KiB"), secrets never, plus a top-level `warnings` list."""
    data: dict[str, Any] = redact_secrets(config.model_dump(mode="json"))
    data["warnings"] = config_warnings(config)
    return data


def summary(config: Config, source: str) -> str:
    """The line `sidecar check` prints for a valid file: `FILE: ok: 2 listeners, 3 clusters`."""

    def count(n: int, word: str) -> str:
        return f"{n} {word}" if n == 1 else f"{n} {word}s"

    listeners, clusters = len(config.listeners), len(config.clusters)
    return f"{source}: ok: {count(listeners, 'listener')}, {count(clusters, 'cluster')}"
