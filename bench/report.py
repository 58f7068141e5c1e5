"""Turning result rows into ratios, goal checks, a terminal table and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

Row = dict[str, Any]

# (kind, numerator target, denominator target, what is compared)
RATIOS = (
    ("throughput", "sidecar", "envoy", "rps"),
    ("throughput", "sidecar", "direct", "rps"),
    ("throughput", "envoy", "direct", "rps"),
    ("throughput", "sidecar-fwd", "pproxy", "rps"),
    ("tls_naive", "sidecar-tls", "direct-tls", "rps"),
    ("tls_naive", "envoy-tls", "direct-tls", "rps"),
    ("tls_naive", "sidecar-tls", "direct-tls-full", "rps"),
    ("tls_naive", "direct-tls", "direct-tls-full", "rps"),
    ("tls_handshake", "sidecar-tls reuse", "sidecar-tls no-reuse", "rps"),
)


# (section title, result file glob) of the benchmarks with scripts of their own.
OTHER_BENCHMARKS = (
    ("Discovery at scale (bench/discovery_scale.py)", "discovery-*.json"),
    ("Upstream TLS handshakes (bench/tls_handshake.py)", "tls-handshake-*.json"),
    ("HTTP/2: h2load through the sidecar and Envoy (bench/h2load.py)", "h2load-*.json"),
    ("HTTP/2: the sidecar's memory under h2load (bench/h2load.py --memory)", "h2mem-*.json"),
    ("Memory: at rest, per connection, per pool entry (bench/memory.py)", "memory-*.json"),
    ("Memory at rest: what the floor is made of (bench/import_floor.py)", "import-floor-*.json"),
)


def _ok(row: Row | None) -> bool:
    return row is not None and not row.get("error") and bool(row.get("rps"))


def find(rows: list[Row], kind: str, case: str, target: str) -> Row | None:
    for row in rows:
        if row["kind"] == kind and row["case"] == case and row["target"] == target:
            return row
    return None


def compute_ratios(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    cases: dict[str, list[str]] = {}
    for row in rows:
        cases.setdefault(row["kind"], [])
        if row["case"] not in cases[row["kind"]]:
            cases[row["kind"]].append(row["case"])
    for kind, num, den, field in RATIOS:
        for case in cases.get(kind, []):
            a, b = find(rows, kind, case, num), find(rows, kind, case, den)
            if not (_ok(a) and _ok(b)):
                continue
            assert a is not None and b is not None
            if a.get(field) is None or not b.get(field):
                continue
            out.append({"kind": kind, "case": case, "ratio": f"{num}/{den}", "of": field,
                        "value": round(a[field] / b[field], 3)})
    return out


def _get(rows: list[Row], kind: str, case: str, target: str, field: str) -> float | None:
    row = find(rows, kind, case, target)
    if not _ok(row):
        return None
    assert row is not None
    value = row.get(field)
    return None if value is None else float(value)


def goal_checks(rows: list[Row], memory: list[dict[str, Any]] | None = None
                ) -> list[dict[str, Any]]:
    """The targets stated in issues 2, 4 and 17, checked against this run (None: not
    measured). `memory`: the run's per-target memory (`memory_rows`)."""

    def ratio(kind: str, case: str, a: str, b: str) -> float | None:
        x, y = _get(rows, kind, case, a, "rps"), _get(rows, kind, case, b, "rps")
        return x / y if x is not None and y else None

    sidecar_hwm = [r["proxy"]["hwm_kib"] / 1024 for r in rows
                   if r["target"] == "sidecar" and r.get("proxy") and not r.get("error")]
    # The forward-proxy target has the embedded default's shape: one listener, no cluster.
    idle = [m["idle_rss_kib"] / 1024 for m in memory or []
            if m["target"] == "sidecar-fwd" and m.get("idle_rss_kib")]
    checks = [
        ("sidecar rps / Envoy rps, 64 conns, 100 B", ratio("throughput", "c64-100B", "sidecar",
                                                           "envoy"), ">=", 1.5, "x"),
        ("sidecar rps, 64 conns, 16 KiB", _get(rows, "throughput", "c64-16KiB", "sidecar", "rps"),
         ">=", 25000, "rps"),
        ("sidecar added p50 at 2 000 req/s", _get(rows, "fixed_rate", "rate2000-100B", "sidecar",
                                                  "added_p50_ms"), "<=", 0.3, "ms"),
        ("sidecar added p99 at 2 000 req/s", _get(rows, "fixed_rate", "rate2000-100B", "sidecar",
                                                  "added_p99_ms"), "<=", 1.0, "ms"),
        ("sidecar peak RSS under load", max(sidecar_hwm) if sidecar_hwm else None, "<=", 50,
         "MiB"),
        ("sidecar-fwd idle RSS after start", idle[0] if idle else None, "<=", 35, "MiB"),
        ("naive TLS app: through sidecar / direct", ratio("tls_naive", "c16-close-100B",
                                                          "sidecar-tls", "direct-tls"),
         ">=", 5, "x"),
    ]
    out = []
    for name, value, op, goal, unit in checks:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"goal": name, "value": None if value is None else round(value, 3),
                    "unit": unit, "want": f"{op} {goal:g} {unit}", "met": met})
    return out


# -- formatting ---------------------------------------------------------------------------


def _num(value: Any, fmt: str = "{:,.0f}") -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def _ms(value: Any) -> str:
    return _num(value, "{:.3f}")


def _mib(row: Row) -> str:
    proxy = row.get("proxy") or {}
    if not proxy:
        return "-"
    return f"{proxy['rss_kib'] / 1024:.1f} / {proxy['hwm_kib'] / 1024:.1f}"


def _cpu(row: Row) -> str:
    proxy = row.get("proxy") or {}
    return _num(proxy.get("cpu_pct"), "{:.0f}%") if proxy else "-"


def _other(row: Row) -> str:
    """CPU used on the proxy's core by anything but the proxy: the noise of this row."""
    return _num((row.get("cores") or {}).get("other_on_proxy_core_pct"), "{:.0f}%")


def _status(row: Row) -> str:
    if row.get("error"):
        return "ERROR: " + str(row["error"]).replace("|", "/").replace("\n", " ")[:160]
    notes = list(row.get("warnings", []))
    if row.get("rounds_rps"):
        rounds = ", ".join("-" if v is None else f"{v:,}" for v in row["rounds_rps"])
        notes.insert(0, f"median of rounds: {rounds}")
    return "; ".join(notes)


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for each kind of case present, shared by terminal and markdown."""
    rows: list[Row] = result["rows"]
    out = []
    thr = [r for r in rows if r["kind"] == "throughput"]
    if thr:
        out.append((
            "Throughput (wrk, keep-alive, closed loop)",
            ["case", "target", "rps", "p50 ms", "p99 ms", "vs direct", "proxy CPU",
             "other CPU on core", "RSS / peak MiB", "notes"],
            [[r["case"], r["target"], _num(r.get("rps")), _ms(r.get("p50_ms")),
              _ms(r.get("p99_ms")), _ratio_cell(rows, r, "direct"), _cpu(r), _other(r),
              _mib(r), _status(r)] for r in thr],
        ))
    fixed = [r for r in rows if r["kind"] == "fixed_rate"]
    if fixed:
        out.append((
            "Latency at a fixed rate (bench/loadgen.py, open loop)",
            ["case", "target", "achieved rps", "p50 ms", "p99 ms", "p99.9 ms",
             "added p50 ms", "added p99 ms", "p99 incl. queue", "proxy CPU",
             "other CPU on core", "RSS / peak MiB", "notes"],
            [[r["case"], r["target"], _num(r.get("rps")), _ms(r.get("p50_ms")),
              _ms(r.get("p99_ms")), _ms(r.get("p999_ms")), _ms(r.get("added_p50_ms")),
              _ms(r.get("added_p99_ms")), _ms(r.get("p99_incl_queue_ms")), _cpu(r), _other(r),
              _mib(r), _status(r)] for r in fixed],
        ))
    naive = [r for r in rows if r["kind"] == "tls_naive"]
    if naive:
        out.append((
            "Naive TLS app: a new connection per request (wrk -H 'Connection: close')",
            ["case", "target", "rps", "p50 ms", "p99 ms", "vs direct-tls", "proxy CPU", "notes"],
            [[r["case"], r["target"], _num(r.get("rps")), _ms(r.get("p50_ms")),
              _ms(r.get("p99_ms")), _ratio_cell(rows, r, "direct-tls"), _cpu(r), _status(r)]
             for r in naive],
        ))
    hs = [r for r in rows if r["kind"] == "tls_handshake"]
    if hs:
        out.append((
            "Upstream TLS handshakes: nginx closes after every response",
            ["case", "target", "rps = handshakes/s", "resumed (metrics)", "resumption ratio",
             "p50 ms", "p99 ms", "proxy CPU", "notes"],
            [[r["case"], r["target"], _num(r.get("rps")),
              _num(r.get("handshakes", {}).get("resumed_fraction"), "{:.0%}"),
              _num(r.get("tls_resumption_ratio"), "{:.2f}"),
              _ms(r.get("p50_ms")), _ms(r.get("p99_ms")), _cpu(r), _status(r)] for r in hs],
        ))
    memory = result.get("memory") or []
    if memory:
        out.append((
            "Memory (RSS, MiB): idle after start, after the c64-100B case, peak over the run",
            ["target", "idle after start", "after c64-100B", "peak (VmHWM)", "notes"],
            [[m["target"], _kib_as_mib(m.get("idle_rss_kib")),
              _kib_as_mib(m.get("loaded_rss_kib")), _kib_as_mib(m.get("peak_hwm_kib")), ""]
             for m in memory],
        ))
    return out


def memory_rows(rows: list[Row], idle: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """Per target with a process: RSS after start, before any request (`idle`, from the
    runner), RSS at the end of the c64-100B case, and the peak (VmHWM) over the whole run."""
    out = []
    for target, figures in idle.items():
        mine = [r for r in rows if r["target"] == target and r.get("proxy")]
        loaded = next((r["proxy"]["rss_kib"] for r in mine
                       if r["kind"] == "throughput" and r["case"] == "c64-100B"), None)
        peaks = [r["proxy"]["hwm_kib"] for r in mine] + [figures.get("hwm_kib", 0)]
        out.append({"target": target, "idle_rss_kib": figures.get("rss_kib"),
                    "loaded_rss_kib": loaded, "peak_hwm_kib": max(peaks)})
    return out


def _kib_as_mib(value: Any) -> str:
    return _num(None if value is None else value / 1024, "{:.1f}")


def _ratio_cell(rows: list[Row], row: Row, base: str) -> str:
    if row["target"] == base or not _ok(row):
        return "-"
    other = find(rows, row["kind"], row["case"], base)
    if not _ok(other):
        return "-"
    assert other is not None
    return f"{row['rps'] / other['rps']:.2f}x"


def _text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=False)]
    # the notes column can be long: don't pad it
    widths[-1] = 0
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * max(w, len(h)) for h, w in zip(header, widths, strict=True)))
    for row in body:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def terminal(result: dict[str, Any]) -> str:
    meta = result["meta"]
    load = meta.get("loadavg", {})
    parts = [f"load average {load.get('start', '-')} -> {load.get('end', '-')}; other CPU on the "
             f"proxy core, mean {_num(meta.get('other_on_proxy_core_pct'), '{:.0f}%')}"]
    for title, header, body in tables(result):
        parts.append(f"\n== {title}\n" + _text_table(header, body))
    if result.get("ratios"):
        body = [[r["kind"], r["case"], r["ratio"], r["of"], f"{r['value']:.2f}"]
                for r in result["ratios"]]
        parts.append("\n== Ratios\n" + _text_table(["kind", "case", "ratio", "of", "value"],
                                                     body))
    if result.get("goals"):
        parts.append("\n== Goals (issues 2, 4 and 17)\n" + "\n".join(
            f"  [{_met(g['met'])}] {g['goal']}: {_goal_value(g)} (want {g['want']})"
            for g in result["goals"]))
    return "\n".join(parts)


def _goal_value(goal: dict[str, Any]) -> str:
    fmt = {"x": "{:.2f} x", "rps": "{:,.0f} rps", "ms": "{:.3f} ms", "MiB": "{:.1f} MiB"}
    return _num(goal["value"], fmt.get(goal.get("unit", ""), "{:,.3f}"))


def _met(met: bool | None) -> str:
    return {True: "met", False: "NOT MET", None: "n/a"}[met]


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# The columns of the earlier-runs table: (heading, case, target); rps of each.
HISTORY_COLUMNS = (
    ("direct c64-100B", "c64-100B", "direct"),
    ("sidecar c64-100B", "c64-100B", "sidecar"),
    ("Envoy c64-100B", "c64-100B", "envoy"),
    ("sidecar c64-16KiB", "c64-16KiB", "sidecar"),
    ("Envoy c64-16KiB", "c64-16KiB", "envoy"),
)


def history(results_dir: Path, limit: int = 10) -> list[list[str]]:
    """The latest full runs kept in `results_dir` (10 s cases, all of direct, sidecar and
    Envoy), newest first: rps per HISTORY_COLUMNS and the sidecar/Envoy ratios. The VM's
    speed moves from day to day; the direct and Envoy columns show how much, the ratios are
    what stays."""
    rows = []
    for path in sorted(results_dir.glob("2*.json"), reverse=True):
        try:
            result = json.loads(path.read_text())
            meta = result["meta"]
            if meta["params"].get("duration_s", 0) < 10:
                continue
            values = [_get(result["rows"], "throughput", case, target, "rps")
                      for _, case, target in HISTORY_COLUMNS]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found = [v for v in values if v]
        if len(found) < len(values):
            continue
        _, side100, envoy100, side16, envoy16 = found
        rows.append([meta["date"], *(_num(v) for v in found),
                     f"{side100 / envoy100:.2f} x", f"{side16 / envoy16:.2f} x"])
        if len(rows) == limit:
            break
    return rows


def other_benchmarks(results_dir: Path) -> list[str]:
    """Sections for the benchmarks that bench/run.py does not run itself, each from its newest
    result file in `results_dir` (each script writes the Markdown it wants shown as `markdown`
    in its JSON): discovery at scale, the keep-alive race, the soak."""
    sections = []
    for title, pattern in OTHER_BENCHMARKS:
        found = sorted(results_dir.glob(pattern))
        if not found:
            continue
        try:
            text = json.loads(found[-1].read_text()).get("markdown")
        except (OSError, ValueError):
            continue
        if text:
            sections += [f"## {title}", "", f"From `bench/results/{found[-1].name}`:", "",
                         text.rstrip(), ""]
    return sections


def markdown(result: dict[str, Any], earlier: list[list[str]] | None = None,
             others: list[str] | None = None) -> str:
    meta = result["meta"]
    machine = meta["machine"]
    load = meta.get("loadavg", {})
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py`; do not edit by hand. What the cases measure and how to read",
        "them: [bench/README.md](../bench/README.md). Raw figures: `bench/results/latest.json`.",
        "",
        f"- **Date:** {meta['date']}",
        f"- **Command:** `{meta['command']}`",
        f"- **Machine:** {machine['nproc']} CPUs, {machine['cpu_model']}, "
        f"Linux {machine['kernel']}, {machine['mem_total_mib']:,} MiB RAM",
        f"- **Pinning:** proxy under test on core {meta['pinning']['proxy_core']}; wrk, "
        f"bench/loadgen.py and nginx (1 worker) on core {meta['pinning']['load_core']}",
        f"- **Load average** at start / end: {load.get('start', '-')} / {load.get('end', '-')} "
        "(other work on the machine makes the figures noisy; compare rows of one run)",
        f"- **Other CPU on the proxy core** during the cases (other processes, steal), mean: "
        f"{_num(meta.get('other_on_proxy_core_pct'), '{:.0f}%')}; per row in the tables",
        f"- **Per case:** {meta['params']['warmup_s']:g} s warm-up, then "
        f"{meta['params']['duration_s']:g} s measured; wrk -t{meta['params']['wrk_threads']}; "
        f"proxy core kept awake (--keep-awake): "
        f"{'yes' if meta['params'].get('keep_awake') else 'no'}; "
        f"nice {meta['params'].get('priority', 0)}; "
        f"rounds per throughput case: {meta['params'].get('rounds', 1)} (the median is shown)",
        "- **Versions:** " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "",
    ]
    if result.get("goals"):
        lines += ["## Goals", "", _md_table(
            ["goal", "this run", "want", ""],
            [[g["goal"], _goal_value(g), g["want"], _met(g["met"])]
             for g in result["goals"]]), ""]
    for title, header, body in tables(result):
        lines += [f"## {title}", "", _md_table(header, body), ""]
    if result.get("ratios"):
        lines += ["## Ratios", "", _md_table(
            ["kind", "case", "ratio", "of", "value"],
            [[r["kind"], r["case"], r["ratio"], r["of"], f"{r['value']:.2f}"]
             for r in result["ratios"]]), ""]
    notes = meta.get("notes", [])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if earlier:
        lines += [
            "## Earlier runs (`bench/results/`)", "",
            "Absolute figures follow the VM's speed, which moves from day to day on the same "
            "machine kind: the direct and Envoy columns show by how much. The ratios are the "
            "figures to compare across runs; each row measured the sidecar of its day.", "",
            _md_table(["date", *(h for h, _, _ in HISTORY_COLUMNS),
                       "sidecar/Envoy 100B", "sidecar/Envoy 16KiB"], earlier), ""]
    lines += others or []
    return "\n".join(lines)


def rewrite_docs(results_dir: Path, docs: Path) -> None:
    """docs/benchmarks.md again from the newest full run and the other benchmarks' newest
    results: what a script other than bench/run.py calls after recording its own run."""
    latest = results_dir / "latest.json"
    result = json.loads(latest.read_text())
    docs.write_text(markdown(result, history(results_dir), other_benchmarks(results_dir)))


RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def result_path(kind: str, out: Path | None) -> Path:
    """Where a benchmark other than bench/run.py records a run: `out` when given, else
    bench/results/<kind>-<UTC stamp>.json."""
    return out or RESULTS / f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """A script's arguments as JSON can hold them (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def record_run(out: Path, record: dict[str, Any], chosen: bool) -> None:
    """Write `record` to `out`; unless the caller chose `out` (`chosen`: a scratch run),
    docs/benchmarks.md is regenerated with it, once a full run of bench/run.py is on record."""
    out.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {out}")
    if not chosen and (RESULTS / "latest.json").exists():
        rewrite_docs(RESULTS, DOCS)
        print("docs:  docs/benchmarks.md")
