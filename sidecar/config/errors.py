"""Config problems: `ConfigIssue` / `ConfigError` (`FILE:LINE: path.to.field: message`), and
the translation of pydantic's errors into located problems (see the package doc, points 3-4)."""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from sidecar.config.units import _kind

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]

_PROBLEMS = "config_problems"


def _raise_problems(problems: Sequence[Problem]) -> None:
    """Raise one pydantic error that carries several located problems (see the package doc)."""
    if problems:
        text = "; ".join(f"{_format_path(loc) or 'here'}: {msg}" for loc, msg in problems)
        raise PydanticCustomError(_PROBLEMS, "{summary}", {"summary": text, "problems": problems})


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: `file`, the 1-based `line` of the offending key (0: no line, e.g. the file
    cannot be read), the dotted `path` (`listeners[0].limits.header_timeout`) and `message`."""

    file: str
    line: int
    path: str
    message: str

    def format(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class ConfigError(Exception):
    """A config that cannot be used. `issues` holds every problem found, in file order."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__(self.format())

    def format(self) -> str:
        """One line per issue, `FILE:LINE: path: message`, as `sidecar check` prints them."""
        return "\n".join(issue.format() for issue in self.issues)


def _format_path(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _data_loc(loc: Sequence[str | int], data: Any) -> Loc:
    """A pydantic error location -> the path in the data: drops the union tags pydantic inserts
    (`discovery.dns.host` -> `discovery.host`); keeps a last element that is absent (missing)."""
    path: list[str | int] = []
    cursor = data
    for index, part in enumerate(loc):
        present = isinstance(cursor, Mapping) and part in cursor
        if present or isinstance(cursor, list) and isinstance(part, int) and part < len(cursor):
            cursor = cursor[part]
        elif index == len(loc) - 1 and isinstance(cursor, Mapping):
            cursor = None
        else:
            continue
        path.append(part)
    return tuple(path)


def _unwrap(annotation: Any, value: Any) -> Any:
    """A field's annotation -> the model class the value is validated as, or None."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = get_args(annotation)
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            tag = value.get("type") if isinstance(value, Mapping) else None
            chosen = [
                m
                for m in models
                if len(models) == 1 or tag in get_args(m.model_fields["type"].annotation)
            ]
            if not chosen:
                return None
            annotation = chosen[0]
        else:
            return annotation


def _known_keys(loc: Loc, data: Any, root: type[BaseModel]) -> list[str]:
    """The keys the mapping at `loc` may hold, for "did you mean" hints (`root`: the model of
    the whole file)."""
    annotation: Any = root
    cursor = data
    for part in loc:
        annotation = _unwrap(annotation, cursor)
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if isinstance(part, int) and get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
            cursor = cursor[part] if isinstance(cursor, list) else None
        elif isinstance(part, str) and is_model and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
            cursor = cursor.get(part) if isinstance(cursor, Mapping) else None
        else:
            return []
    annotation = _unwrap(annotation, cursor)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _issues_from(
    exc: ValidationError, data: Any, root: type[BaseModel]
) -> tuple[list[Problem], set[Loc]]:
    """Pydantic's errors -> located problems, and the locations of the models whose own
    cross-field checks ran and failed."""
    problems: list[Problem] = []
    checked: set[Loc] = set()
    for error in exc.errors(include_url=False):
        loc = _data_loc(error["loc"], data)
        kind = error["type"]
        if kind == _PROBLEMS:
            checked.add(loc)
            problems.extend(((*loc, *rel), msg) for rel, msg in error["ctx"]["problems"])
            continue
        message = str(error["msg"])
        if kind == "extra_forbidden":
            known = _known_keys(loc[:-1], data, root)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("union_tag_not_found", "union_tag_invalid"):
            loc = (*loc, "type")
            message = "type must be one of static, dns, kubernetes" + (
                f", not {error['ctx']['tag']!r}" if kind == "union_tag_invalid" else ""
            )
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"must be a mapping, not {_kind(error['input'])}"
        elif kind == "list_type":
            message = f"must be a list, not {_kind(error['input'])}"
        else:
            message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if message.startswith("Input should be"):
                message = "must be" + message.removeprefix("Input should be")
        problems.append((loc, message))
    return problems, checked


def _locate(loc: Loc, lines: Mapping[Loc, int]) -> int:
    """The line of the key at `loc`, or of its nearest present ancestor (a missing key)."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1
