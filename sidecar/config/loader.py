"""YAML text -> `Config`: the YAML 1.2 core schema, line numbers of every key, `${VAR}`
expansion, and every problem reported at once (see the package doc, points 1, 2 and 4)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from sidecar.config.base import _mappings
from sidecar.config.clusters import _cluster_problems
from sidecar.config.errors import ConfigError, ConfigIssue, Loc, _format_path, _issues_from, _locate
from sidecar.config.listeners import _listener_problems
from sidecar.config.root import Config, _config_problems
from sidecar.config.units import _kind


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars (see the package doc, point 1)."""

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}


for _tag, _regex, _first in (
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", ["<"]),
):
    _Loader.add_implicit_resolver(_tag, re.compile(_regex), _first)

_TAG = "tag:yaml.org,2002:"
_MAX_NODES = 100_000  # aliases can expand a small file enormously ("billion laughs")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_env(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand `${VAR}`, `${VAR:-default}` (default when unset or empty) and `$$` (a literal
    `$`); any other `$` is kept. Returns the text and the problems (unset variables, ...)."""
    out: list[str] = []
    errors: list[str] = []
    i = 0
    while i < len(text):
        dollar = text.find("$", i)
        if dollar < 0:
            out.append(text[i:])
            break
        out.append(text[i:dollar])
        follower = text[dollar + 1 : dollar + 2]
        if follower == "$":
            out.append("$")
            i = dollar + 2
            continue
        if follower != "{":
            out.append("$")
            i = dollar + 1
            continue
        end = text.find("}", dollar + 2)
        if end < 0:
            errors.append(f"unterminated ${{ in {text!r} (write $$ for a literal $)")
            out.append(text[dollar:])
            break
        body = text[dollar + 2 : end]
        name, has_default, default = body.partition(":-")
        if not _ENV_NAME.fullmatch(name):
            errors.append(f"invalid reference ${{{body}}}: use ${{NAME}} or ${{NAME:-default}}")
        elif has_default:
            out.append(environ.get(name) or default)
        elif name in environ:
            out.append(environ[name])
        else:
            errors.append(f"environment variable {name} is not set (use ${{{name}:-default}})")
        i = end + 1
    return "".join(out), errors


class _Reader:
    """Node tree -> plain data, recording the line of every key and the problems met."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.lines: dict[Loc, int] = {(): 1}
        self.problems: list[tuple[Loc, int, str]] = []
        self._nodes = 0
        self._active: set[int] = set()  # nodes being read: a recursive alias would loop forever

    def read(self, node: yaml.Node, loc: Loc, line: int) -> Any:
        self._nodes += 1
        if self._nodes > _MAX_NODES:
            raise _TooLarge
        if id(node) in self._active:
            self.problems.append((loc, line, "recursive alias"))
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc, line)
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _TAG + "seq":
                    self.problems.append((loc, line, f"unsupported YAML tag {node.tag}"))
                    return None
                items = []
                for index, item in enumerate(node.value):
                    item_line = item.start_mark.line + 1
                    self.lines[(*loc, index)] = item_line
                    items.append(self.read(item, (*loc, index), item_line))
                return items
            return self._scalar(node, loc, line)
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, loc: Loc, line: int) -> Any:
        if node.tag != _TAG + "map":
            self.problems.append((loc, line, f"unsupported YAML tag {node.tag}"))
            return None
        result: dict[str, Any] = {}
        merges: list[yaml.Node] = []
        explicit: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                is_list = isinstance(value_node, yaml.SequenceNode)
                merges.extend(value_node.value if is_list else [value_node])
            else:
                explicit.append((key_node, value_node))
        # `<<: [*a, *b]`: explicit keys win over merged ones, earlier sources over later ones.
        for source in reversed(merges):
            merged = self.read(source, loc, source.start_mark.line + 1)
            if isinstance(merged, dict):
                result.update(merged)
            else:
                self.problems.append((loc, source.start_mark.line + 1, "<< needs a mapping"))
        seen: dict[str, int] = {}
        for key_node, value_node in explicit:
            key_line = key_node.start_mark.line + 1
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key_node.tag != _TAG + "str" or not isinstance(key, str):
                self.problems.append((loc, key_line, "keys must be strings"))
                continue
            if key in seen:
                message = f"duplicate key (first at line {seen[key]})"
                self.problems.append(((*loc, key), key_line, message))
            seen[key] = key_line
            self.lines[(*loc, key)] = key_line
            result[key] = self.read(value_node, (*loc, key), key_line)
        return result

    def _scalar(self, node: yaml.Node, loc: Loc, line: int) -> Any:
        tag, text = node.tag, node.value
        try:
            if tag == _TAG + "str":
                value, errors = expand_env(text, self.environ)
                self.problems.extend((loc, line, e) for e in errors)
                return value
            if tag == _TAG + "null":
                return None
            if tag == _TAG + "bool":
                if text.lower() not in ("true", "false"):
                    raise ValueError(f"invalid boolean {text!r}")
                return text.lower() == "true"
            if tag == _TAG + "int":
                if text.startswith(("0x", "0o")):
                    return int(text[2:], 16 if text[1] == "x" else 8)
                return int(text, 10)
            if tag == _TAG + "float":
                return float(text.replace("inf", "Inf").replace("Inf", "inf").lower())
        except ValueError as exc:
            self.problems.append((loc, line, str(exc)))
            return None
        self.problems.append((loc, line, f"unsupported YAML tag {tag}"))
        return None


class _TooLarge(Exception):
    pass


def parse_config(
    text: str, source: str = "<string>", environ: Mapping[str, str] | None = None
) -> Config:
    """YAML text -> `Config`, or `ConfigError` with every problem located (see the package doc)."""
    env = os.environ if environ is None else environ
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        where = f" (column {mark.column + 1})" if mark is not None else ""
        message = f"{exc.problem or exc.context or 'invalid YAML'}{where}"
        raise ConfigError([ConfigIssue(source, line, "<yaml>", message)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(source, 1, "<yaml>", str(exc))]) from None

    reader = _Reader(env)
    try:
        data: Any = {} if node is None else reader.read(node, (), 1)
    except _TooLarge:
        raise ConfigError(
            [ConfigIssue(source, 1, "<yaml>", "too many nodes after expanding aliases")]
        ) from None
    if data is None:  # a document that is only `~` or whose root failed to read
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue(source, 1, "<root>", f"must be a mapping of sections, not {_kind(data)}")]
        )

    located: list[tuple[Loc, int, str]] = list(reader.problems)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems, checked = _issues_from(exc, data, Config)
        # Pydantic skips the checks of a model when one of its fields failed: re-run those
        # of listeners, clusters and the whole config on the raw data, so one pass reports all
        # (a Config-level error means every field passed, the checks ran: nothing to re-run).
        for index, listener in _mappings(data.get("listeners")):
            here: Loc = ("listeners", index)
            failed = any(loc[:2] == here and len(loc) > 2 for loc, _ in problems)
            if failed and here not in checked:
                problems += [((*here, *rel), m) for rel, m in _listener_problems(listener)]
        for index, cluster in _mappings(data.get("clusters")):
            here = ("clusters", index)
            failed = any(loc[:2] == here and len(loc) > 2 for loc, _ in problems)
            if failed and here not in checked:
                problems += [((*here, *rel), m) for rel, m in _cluster_problems(cluster)]
        if () not in checked:
            problems += _config_problems(data)
        # A value the reader already complained about (an unset ${VAR}, say) was replaced:
        # further complaints about it would only be noise.
        blamed = [loc for loc, _, _ in reader.problems]
        for loc, message in problems:
            if not any(loc[: len(b)] == b for b in blamed):
                located.append((loc, _locate(loc, reader.lines), message))
    else:
        if not located:
            return config

    unique = dict.fromkeys((line, _format_path(loc) or "<root>", msg) for loc, line, msg in located)
    ordered = sorted(unique, key=lambda issue: issue[0])  # stable: file order, then found order
    raise ConfigError([ConfigIssue(source, line, path, msg) for line, path, msg in ordered])


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and parse a config file; an unreadable file is a `ConfigError` (line 0, `<file>`)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(path, 0, "<file>", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(path, 0, "<file>", f"cannot read: {exc}")]) from None
    return parse_config(text, source=path, environ=environ)
