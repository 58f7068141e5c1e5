"""The configuration of SPEC section 4: pydantic models, YAML loading with line numbers, `${VAR}`.

Theory of operation
-------------------
`load_config` / `parse_config` turn YAML text into a frozen `Config` or raise `ConfigError`
holding *every* problem found, each as `FILE:LINE: path.to.field: message` (SPEC section 2).

1. The text is composed (not constructed) into a YAML node tree, so every key keeps its line.
   The resolver is YAML 1.2's core schema, not PyYAML's YAML 1.1 one: with 1.1, the key `on`
   of `retry.on` would become the boolean True, `1:30` an integer and `no` a boolean.
2. The node tree is converted to plain dicts/lists by hand, recording path -> line of the key,
   expanding `${VAR}` / `${VAR:-default}` / `$$` in string scalars, reporting duplicate keys.
3. Pydantic validates the plain data. Single-field rules live on the fields; rules that involve
   several fields live in `model_validator`s that raise one `config_problems` error carrying a
   list of (relative path, message), so each problem points at the key at fault.
4. Pydantic does not run a model's own validator when one of its fields failed. So that a file
   with a bad duration *and* a dangling cluster reference reports both, the listener-, cluster-
   and config-level checks are plain functions over mappings, re-run on the raw data in that case.

Defaults: every section has them, and they are the embedded default of SPEC section 4. An
omitted `listeners` key means the default egress listener (127.0.0.1:15001, forward proxy for
every host, CONNECT on), so an empty file equals `default_config()` and "the smallest useful
file names one cluster" holds. An explicit `listeners: []` is an error: it would proxy nothing.
File paths (tls.ca_file, ...) are not checked for existence here: `sidecar check` often runs
where the secrets are not mounted; the TLS layer reports them when it loads them.

Layout (import-linter keeps these layers, top to bottom; everything is re-exported here)
------
- `loader`: YAML 1.2 nodes -> plain data with line numbers, `${VAR}`, `parse_config`/`load_config`.
  `redaction`: showing a config (`/config`, `config-dump`): secrets redacted, warnings, summary.
- `root`: `Config`, `drain`, and the checks across listeners and clusters.
- `listeners` (admin, status, listeners, limits, routes, forward proxy); `clusters` (discovery,
  TLS, pool, HTTP/2, timeouts, `ClusterConfig`).
- `policies`: health checks, outlier detection, circuit breaker, retry (`grpc_on` included).
- `base`: the frozen model base and derived-default helpers.
- `addresses` and `errors` (`ConfigIssue`, `ConfigError`, pydantic errors -> located problems).
- `units`: durations and sizes.
Only `loader` imports yaml.
"""

from sidecar.config.addresses import Address, is_loopback, join_address, split_address
from sidecar.config.clusters import (
    ALPN_FOR,
    Alpn,
    ClusterConfig,
    DnsDiscovery,
    Http2Config,
    KubernetesDiscovery,
    LoadBalancer,
    PoolConfig,
    StaticDiscovery,
    TimeoutsConfig,
    TlsConfig,
    UpstreamProtocol,
    dynamic_cluster,
)
from sidecar.config.errors import ConfigError, ConfigIssue
from sidecar.config.listeners import (
    AdminConfig,
    ForwardProxyConfig,
    ListenerConfig,
    ListenerLimits,
    RouteConfig,
    RouteMatch,
    StatusConfig,
)
from sidecar.config.loader import expand_env, load_config, parse_config
from sidecar.config.policies import (
    GRPC_STATUS_CODES,
    BackoffConfig,
    BudgetConfig,
    CircuitBreakerConfig,
    HealthCheckConfig,
    OutlierConfig,
    RetryConfig,
)
from sidecar.config.redaction import config_warnings, redact_secrets, redacted, summary
from sidecar.config.root import Config, DrainConfig, default_config
from sidecar.config.units import (
    Duration,
    Size,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "ALPN_FOR",
    "GRPC_STATUS_CODES",
    "Address",
    "AdminConfig",
    "Alpn",
    "BackoffConfig",
    "BudgetConfig",
    "CircuitBreakerConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DnsDiscovery",
    "DrainConfig",
    "Duration",
    "ForwardProxyConfig",
    "HealthCheckConfig",
    "Http2Config",
    "KubernetesDiscovery",
    "ListenerConfig",
    "ListenerLimits",
    "LoadBalancer",
    "OutlierConfig",
    "PoolConfig",
    "RetryConfig",
    "RouteConfig",
    "RouteMatch",
    "Size",
    "StaticDiscovery",
    "StatusConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "UpstreamProtocol",
    "config_warnings",
    "default_config",
    "dynamic_cluster",
    "expand_env",
    "format_duration",
    "format_size",
    "is_loopback",
    "join_address",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "redact_secrets",
    "redacted",
    "split_address",
    "summary",
]
