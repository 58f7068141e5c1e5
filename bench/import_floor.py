"""What the sidecar's resident memory at rest is made of (a benchmark, not a test).

    python bench/import_floor.py [--pythonpath DIR] [--out FILE]

Issue 17 asked for an idle sidecar at 35 MiB or less; it idles at about 54 MiB. This shows
where that floor comes from: one fresh interpreter per step, each importing what the steps
before it imported plus its own modules, in the order the sidecar's start imports them, then
reporting VmRSS and the anonymous part of it (smaps_rollup: what only this process uses; the
rest maps files the page cache shares with the node's other processes). The difference between
two steps is what that step's imports cost. The last step is a real sidecar, started on the
embedded default (its addresses moved to free ports) and read once its figure has settled.

Each step runs `gc.collect()` and `malloc_trim(0)` before it reads, as the sidecar does after
start, so the figures compare with bench/memory.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402

# (label, modules this step adds): the order of the sidecar's own start (sidecar/cli.py, then
# sidecar/app.py's imports), each third-party library in the step that first loads it.
STEPS: list[tuple[str, list[str]]] = [
    ("interpreter", []),
    ("stdlib the sidecar uses (asyncio, ssl, json, logging, ipaddress)",
     ["asyncio", "ssl", "json", "logging", "ipaddress", "argparse"]),
    ("uvloop", ["uvloop"]),
    ("httptools", ["httptools"]),
    ("PyYAML", ["yaml"]),
    ("pydantic (the config models' library)", ["pydantic"]),
    ("sidecar.config (the models built)", ["sidecar.config"]),
    ("aiohttp.web (admin and status servers)", ["aiohttp.web"]),
    ("the sidecar's own modules (sidecar.app and what it imports)", ["sidecar.app"]),
]

_PROBE = r"""
import ctypes, gc, importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
gc.collect()
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except OSError:
    pass
out = {}
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        out["rss"] = int(line.split()[1]) / 1024
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("Anonymous:"):
        out["anon"] = int(line.split()[1]) / 1024
print(json.dumps(out))
"""


def probe(modules: list[str], env: dict[str, str]) -> dict[str, float]:
    """RSS of a fresh interpreter that imported `modules` (median of three, MiB)."""
    runs = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _PROBE, *modules], env=env, check=True,
                              capture_output=True, text=True, timeout=60)
        runs.append(json.loads(done.stdout))
    runs.sort(key=lambda r: r["rss"])
    return runs[1]


def started_sidecar(env: dict[str, str]) -> dict[str, float]:
    """A real sidecar on the embedded default, idle, read once settled (bench/memory.py)."""
    from bench import memory as mem
    from bench.procs import Procs

    args = argparse.Namespace(loop="uvloop", pythonpath=env.get("PYTHONPATH"), workdir=None)
    with tempfile.TemporaryDirectory(prefix="import-floor-") as tmp:
        procs = Procs(Path(tmp))
        try:
            result = asyncio.run(mem.idle_default(procs, args))
        finally:
            procs.stop_all()
    figure = result["idle"]
    return {"rss": figure["rss"], "anon": figure["anon"]}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`python bench/import_floor.py` ({result['date']}, python {result['python']}, "
             f"{result['build']}): one fresh "
             "interpreter per row, each importing what the rows above imported plus its own "
             "modules, in the order the sidecar's start loads them; RSS after gc and "
             "malloc_trim, median of three.", "",
             "| step | RSS MiB (anon) | added MiB (anon) |", "|---|---:|---:|"]
    for row in result["rows"]:
        added = "" if row["added"] is None else f"{row['added']:+.1f} ({row['added_anon']:+.1f})"
        lines.append(f"| {row['step']} | {row['rss']:.1f} ({row['anon']:.1f}) | {added} |")
    lines += ["", "What bounds the floor: the interpreter with the standard library the sidecar "
              "needs, and the libraries the brief mandates (pydantic for the config, aiohttp "
              "for the admin and status servers); the sidecar's own modules and its started "
              "state are the rows after them."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pythonpath", help="import the sidecar from this checkout")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/...)")
    args = parser.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = args.pythonpath or str(ROOT)
    rows = []
    modules: list[str] = []
    previous = None
    for label, adds in STEPS:
        modules = modules + adds
        figure = probe(modules, env)
        added = None if previous is None else figure["rss"] - previous["rss"]
        added_anon = None if previous is None else figure["anon"] - previous["anon"]
        rows.append({"step": label, "modules": adds, **figure,
                     "added": added, "added_anon": added_anon})
        previous = figure
        print(f"{label:<62} {figure['rss']:6.1f} MiB (anon {figure['anon']:5.1f})"
              + ("" if added is None else f"  +{added:5.1f} (anon +{added_anon:5.1f})"),
              flush=True)
    started = started_sidecar(env)
    rows.append({"step": "started on the embedded default, idle (listeners, pools, admin)",
                 "modules": [], **started, "added": started["rss"] - previous["rss"],
                 "added_anon": started["anon"] - previous["anon"]})
    print(f"{'started, idle':<62} {started['rss']:6.1f} MiB (anon {started['anon']:5.1f})")
    from bench import memory as mem

    build = mem.build(argparse.Namespace(pythonpath=env["PYTHONPATH"]))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "python": sys.version.split()[0], "build": build, "rows": rows}
    result["markdown"] = markdown(result)
    out = args.out or ROOT / "bench" / "results" / (
        "import-floor-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    report.rewrite_docs(ROOT / "bench" / "results", ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
