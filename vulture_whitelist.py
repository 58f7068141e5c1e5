"""Names the dead-code gate (`python -m vulture`, configured in pyproject.toml) reports but that
are used where it cannot see: called by a library by name, or by the tests.

vulture only parses this file (nothing imports it): any name mentioned below counts as used,
wherever it is defined, so keep each entry to a name that really is used and say by whom.
pydantic's validators are exempted by decorator in pyproject.toml, not listed here.
"""

# ruff: noqa: B018  (every line below is an attribute access that only vulture reads)
from typing import Any

_: Any = None

# --- asyncio calls these on a Protocol (downstream/*, upstream/connection.py, tunnel, tcp) ----
_.connection_made
_.data_received
_.eof_received
_.connection_lost
_.pause_writing  # write-buffer flow control: the transport calls it above the high-water mark
_.resume_writing

# --- httptools (llhttp) calls these on the parser's protocol object (http/parser.py) ----------
_.on_message_begin
_.on_url
_.on_status
_.on_header
_.on_headers_complete
_.on_body
_.on_message_complete

# --- prometheus_client calls describe() on a registered Collector (observe/metrics.py) ---------
_.describe

# --- tenacity's stop/wait strategies read the RetryCallState we fill in (policy/retry.py,
# discovery/dns.py use tenacity as a pure policy object, never its retry loop) -----------------
_.attempt_number

# --- ruamel.yaml reads its settings from these attributes (inject/manifests.py) ---------------
_.preserve_quotes
_.width
_.explicit_start

# --- pydantic and PyYAML read these class attributes (config.py) ------------------------------
_.model_config  # pydantic BaseModel settings
_.yaml_implicit_resolvers  # yaml.SafeLoader's resolver table (_Loader's own copy)

# --- test seams: product code that exists so tests can drive or observe without sleeping -------
_.FakeClock  # clock.py: the Clock tests move by hand (test_outlier, test_breaker, test_min_idle)
_.advance  # FakeClock.advance
_.check_once  # policy/health.py: one round of checks, awaited (tests/integration/test_health.py)
_.build_registry  # observe/metrics.py: the reference registry the scrape is compared to
# (test_scrape.py), and the admin tests' /metrics (test_admin.py, test_metrics_names.py)
_.in_progress  # http/parser.py ResponseParser: a response begun, not ended (test_http_parser.py)
_.connecting_count  # upstream/pool.py: refills in flight (test_min_idle, test_terminating_endpoint)
_.send_window  # http/h2engine.py H2Session: the send window now (test_h2engine flow-control tests)
_.open_streams  # http/h2engine.py H2Session: streams open now (test_h2engine*, after a drain)
_.resumption_ratio  # upstream/tls.py TlsOrigin: its count against the client's (test_tls.py)

# --- the HTTP/2 engine (sidecar/http/h2engine.py), kept for good:
_.read_callback  # h2engine.py: a cffi struct field (nghttp2_data_provider), read by C
_.MODE  # http/_nghttp2.py: which binding loaded (api/abi); the Dockerfile and tests assert it
_.builder  # http/_nghttp2_cdef.py: the cffi FFI builder, loaded by path from setup.py

# --- the contract of sidecar/streams.py: the *Base classes are what interpreted code (the
# exchange tests' fake legs, HTTP/2 legs while they are not compiled) subclasses, since mypyc
# refuses interpreted subclasses of a compiled trait; the trait methods' parameters are the
# contract's names.
_.AppExchangeBase
_.AppStreamBase
_.EndpointStreamBase
_.EndpointUserBase
_.StreamWaiterBase
_.CarrierOwnerBase
_.CarrierBase
_.AttemptBase  # policy/resilience.py, the same for the policies' view of an attempt
_.carrier
_.capacity  # Carrier: what the HTTP/2 pool asks a multiplexed carrier (h2up)
_.stream_step  # streams.py: a step checked against STREAM_TRANSITIONS (the HTTP/2 legs)
_._nva_keep  # h2engine.py: holds the nghttp2_nv buffers across the submit call (compiled
# code frees a local after its last use; C reads them through a pointer)
