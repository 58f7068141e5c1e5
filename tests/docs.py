"""The project's own user documentation, read by the tests that keep it true (docs/*.md)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS_DOC = REPO / "docs" / "metrics.md"

# | `sidecar_name` | type | label, label | meaning |
_ROW = re.compile(r"^\| `(\w+)` \| (\w+) \| ([\w, ]*?) *\| .+ \|$")

Table = dict[str, tuple[str, frozenset[str]]]


def metrics_table(heading: str) -> Table:
    """{name: (type, label names)} of the table under `## {heading}` in docs/metrics.md."""
    text = METRICS_DOC.read_text(encoding="utf-8")
    found = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert found, f"docs/metrics.md has no section '## {heading}'"
    out: Table = {}
    for line in found.group(1).splitlines():
        row = _ROW.match(line)
        if row:
            labels = frozenset(x.strip() for x in row.group(3).split(",") if x.strip())
            out[row.group(1)] = (row.group(2), labels)
    assert out, f"docs/metrics.md: no metric rows under '## {heading}'"
    return out


def process_metrics() -> set[str]:
    """The `process_*` names docs/metrics.md promises."""
    return set(re.findall(r"`(process_\w+)`", METRICS_DOC.read_text(encoding="utf-8")))
