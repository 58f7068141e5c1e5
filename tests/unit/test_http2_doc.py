"""docs/http2.md stays true where that is cheap to check: its gRPC error table is
sidecar/grpc.py's mapping, its abuse table names every kind the metric counts, and its
metrics exist (docs/metrics.md lists them)."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.grpc import error_status
from sidecar.grpc_status import name
from sidecar.observe.stats import HTTP2_ABUSE_KINDS

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "http2.md").read_text(encoding="utf-8")


def section(heading: str) -> str:
    found = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", DOC, re.M | re.S)
    assert found, f"docs/http2.md has no section {heading!r}"
    return found.group(1)


def test_grpc_error_table_is_the_mapping_of_sidecar_grpc() -> None:
    rows = re.findall(r"^\| (.+?) \| (\d+) `(\w+)` \|$",
                      section("Errors the sidecar makes for a gRPC request"), re.M)
    assert rows
    named = set()
    for codes, number, status in rows:
        assert name(int(number)) == status
        for code in re.findall(r"`(\w+)`", codes):
            named.add(code)
            assert error_status(code) == int(number), code
    # Codes the table names under "every other code" are unavailable too.
    assert {"upstream_timeout", "no_route", "host_not_allowed", "bad_upstream_response",
            "protocol_mismatch", "connect_failed"} <= named


def test_abuse_table_names_every_kind_counted() -> None:
    kinds = [k for k in re.findall(r"^\| `(\w+)` \|", section("Abuse handling"), re.M)
             if k != "kind"]  # the header row
    assert sorted(kinds) == sorted(HTTP2_ABUSE_KINDS)


def test_metrics_named_are_documented_metrics() -> None:
    metrics = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    names = re.findall(r"^\| `(sidecar_\w+)` \|", section("Metrics and dashboard"), re.M)
    assert len(names) == 3
    missing = [n for n in names if f"`{n}`" not in metrics]
    assert not missing
