"""`sidecar inject`: Kubernetes YAML in, the same YAML out with the sidecar added to every pod
template. The pod change is `pod.inject` on plain dicts; the difference is computed as a
JSONPatch (`jsonpatch`, as the webhook does) and applied to ruamel.yaml's round-trip tree,
so that the user's comments, key order, quoting and untouched documents survive."""

from __future__ import annotations

import datetime
import io
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from sidecar.inject import pod as podlib

# kind -> the path of its pod template (metadata + spec) inside the object.
POD_PATHS: Final[dict[str, tuple[str, ...]]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class InputError(ValueError):
    """Input that is not Kubernetes YAML: `line` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Report:
    """One pod template seen: `Deployment/payments` (or `List/items[2]/...`), what was done."""

    where: str
    result: str
    reason: str


def to_plain(value: Any) -> Any:
    """ruamel's round-trip types -> plain JSON-like Python (dict, list, str, int, ...)."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, datetime.date | datetime.datetime):
        return value.isoformat()
    return str(value)


def _yaml(indent: tuple[int, int] = (2, 0)) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a user's long line
    mapping, offset = indent
    yaml.indent(mapping=mapping, sequence=mapping + offset, offset=offset)
    return yaml


def _guess_indent(text: str) -> tuple[int, int]:
    """The (mapping indent, sequence dash offset) the user wrote: `- ` under its key (kubectl's
    style, offset 0) or indented under it (offset 2), so that our additions look like theirs."""
    mapping, offset = 2, 0
    lines = text.splitlines()
    for previous, line in zip(lines, lines[1:], strict=False):
        stripped = line.lstrip(" ")
        prev = previous.rstrip()
        if not prev.endswith(":") or prev.lstrip().startswith("#"):
            continue
        depth = len(line) - len(stripped)
        parent = len(previous) - len(previous.lstrip(" "))
        if stripped.startswith("- "):
            offset = max(depth - parent, 0)
            return mapping, offset
        if stripped and depth > parent:
            mapping = depth - parent
    return mapping, offset


def split_documents(text: str) -> list[tuple[int, str]]:
    """The stream cut at its `---` lines: (0-based first line, text with its separator line).
    Each document is then parsed alone, so that one left unchanged is written back byte for
    byte (ruamel's round trip is close, not exact: flow styles and spacing can move)."""
    chunks: list[tuple[int, str]] = []
    lines = text.splitlines(keepends=True)
    start = 0
    for number, line in enumerate(lines):
        if number > start and _SEPARATOR.match(line):
            chunks.append((start, "".join(lines[start:number])))
            start = number
    chunks.append((start, "".join(lines[start:])))
    return chunks


_SEPARATOR: Final = re.compile(r"^---(\s|$)")


def inject_text(
    text: str, settings: podlib.Settings, log: Callable[[Report], None] | None = None
) -> str:
    """The whole `sidecar inject` transformation of one YAML stream. Raises InputError."""
    out: list[str] = []
    for first_line, chunk in split_documents(text):
        out.append(_inject_document(chunk, first_line, settings, log))
    return "".join(out)


def _inject_document(
    text: str, first_line: int, settings: podlib.Settings,
    log: Callable[[Report], None] | None,
) -> str:  # fmt: skip
    import jsonpatch
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    yaml = _yaml(_guess_indent(text))
    try:
        docs = list(yaml.load_all(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = first_line + (mark.line + 1 if mark is not None else 1)
        raise InputError(line, f"not YAML: {exc.problem or exc.context}") from exc
    except YAMLError as exc:
        raise InputError(first_line + 1, f"not YAML: {exc}") from exc
    changed = False
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, Mapping) or "kind" not in doc:
            line = first_line + _content_line(text, doc)
            raise InputError(line, "not a Kubernetes object (a mapping with a kind)")
        for where, template in _templates(doc, _name(doc)):
            before = to_plain(template)
            try:
                outcome = podlib.inject(before, settings)
            except podlib.Unsupported as exc:
                outcome = podlib.Outcome(before, podlib.ERROR, f"left unchanged: {exc}")
            if log is not None:
                log(Report(where, outcome.result, outcome.reason))
            patch = jsonpatch.make_patch(before, outcome.pod)
            if patch.patch:
                patch.apply(template, in_place=True)
                _init_containers_first(template, before)
                changed = True
    if not changed:
        return text  # byte for byte
    out = io.StringIO()
    if _SEPARATOR.match(text.lstrip()):
        yaml.explicit_start = True
    yaml.dump_all(docs, out)
    return out.getvalue()


def _content_line(text: str, doc: Any) -> int:
    """The 1-based line in `text` where `doc` starts (ruamel marks collections, not scalars)."""
    lc = getattr(doc, "lc", None)
    if lc is not None:
        return int(lc.line) + 1
    for number, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not _SEPARATOR.match(line):
            return number + 1
    return 1


def _init_containers_first(template: Any, before: Mapping[str, Any]) -> None:
    """A new `initContainers` goes where people write it, just before `containers` (the
    patch appended it after the last key of the spec)."""
    spec = template.get("spec")
    if "initContainers" in (before.get("spec") or {}) or "initContainers" not in spec:
        return
    if hasattr(spec, "insert") and "containers" in spec:
        value = spec.pop("initContainers")
        spec.insert(list(spec).index("containers"), "initContainers", value)


def _name(doc: Mapping[str, Any]) -> str:
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return f"{doc.get('kind')}/{name or '?'}"


def _templates(doc: Any, where: str) -> Iterator[tuple[str, Any]]:
    """The pod templates of one object (the live ruamel nodes, to be patched in place); a
    `kind: List` (what `kubectl get -o yaml` prints for several objects) is walked."""
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        for item in doc["items"]:
            if isinstance(item, Mapping):
                yield from _templates(item, _name(item))
        return
    path = POD_PATHS.get(str(kind))
    if path is None:
        return  # other kinds pass through untouched
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping):
        yield where, node
