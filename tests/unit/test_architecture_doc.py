"""docs/architecture.md stays true where that is cheap to check: its module table names every
module of the package, and the import-linter contracts it says keep the layers exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def _named() -> set[str]:
    """What the module table names: `path.py` and `folder/` entries."""
    text = DOC.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return {m for row in rows for m in re.findall(r"`([\w/.]+)`", row.split("|")[1])}


def test_every_module_is_in_the_module_table() -> None:
    named = _named()
    missing = []
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        module = path.relative_to(ROOT / "sidecar").as_posix()
        parents = Path(module).parents
        covered = module in named or any(
            # A folder may be named as a whole (`policy/`), or by the module it was split
            # from (`config.py` for a `config/` package).
            f"{p.as_posix()}/" in named or f"{p.as_posix()}.py" in named
            for p in parents if p.as_posix() != "."
        )
        if not covered:
            missing.append(module)
    assert not missing, f"docs/architecture.md's module table lacks {missing}"


def test_the_named_import_contracts_exist() -> None:
    text = DOC.read_text()
    claimed = re.findall(r'^- "(.+)"', text, flags=re.MULTILINE)
    assert len(claimed) >= 3
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    names = {c["name"] for c in contracts["contracts"]}
    assert not set(claimed) - names, f"named in the doc, not in pyproject: {set(claimed) - names}"
    containers = {
        c.get("containers", [None])[0] for c in contracts["contracts"] if c["type"] == "layers"
    }
    assert {"sidecar.downstream", "sidecar.upstream"} <= containers
