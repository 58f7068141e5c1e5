"""docs/configuration.md is what scripts/gen_config_docs.py writes from sidecar/config/: every
key documented, none stale, and its examples accepted by the sidecar's own loader."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import get_args

import pytest
from pydantic import BaseModel

from sidecar.config import Config, default_config, parse_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_config_docs.py"
DOC = REPO / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_what_the_models_say(gen: ModuleType) -> None:
    assert DOC.read_text(encoding="utf-8") == gen.render(), (
        "docs/configuration.md is stale: run `python scripts/gen_config_docs.py` and commit it"
    )


def test_check_mode_agrees(gen: ModuleType) -> None:
    assert gen.main(["--check"]) == 0


def test_every_key_has_a_description(gen: ModuleType) -> None:
    missing = gen.undocumented()
    assert not missing, (
        f"config keys without a meaning: {', '.join(missing)}; add Field(description=...) in "
        "sidecar/config/, then run `python scripts/gen_config_docs.py`"
    )


def test_every_model_field_has_a_row() -> None:
    # The tables name each key in backticks at the start of a row; count them per model.
    text = DOC.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \|", text, re.M)
    seen: set[type] = set()

    def fields(model: type) -> list[str]:
        if model in seen:
            return []
        seen.add(model)
        out = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            out.append(name)
            for arg in _models(field.annotation):
                out += fields(arg)
        return out

    assert sorted(rows) == sorted(fields(Config))


def _models(annotation: object) -> list[type]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def test_the_yaml_in_the_reference_is_accepted_and_the_default_round_trips() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 3  # smallest file, fuller example, embedded default
    for block in blocks:
        parse_config(block, source="docs/configuration.md")
    assert parse_config(blocks[-1]) == default_config()


def test_a_stale_reference_is_reported_with_the_command(
    gen: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(DOC.read_text(encoding="utf-8").replace("`10000`", "`9999`"))
    monkeypatch.setattr(gen, "OUTPUT", stale)
    monkeypatch.setattr(gen, "REPO", tmp_path)
    assert gen.main(["--check"]) == 1
    assert "python scripts/gen_config_docs.py" in capsys.readouterr().err
