"""The fuzzed front door: the corpus replayed through both targets, then a bounded atheris pass.

`driver.py` says what each target checks. Here:

- every file of `corpus/request/` (the smuggling seeds, inputs the fuzzer kept, and the
  `h18-*.bin` cases of issue 18) goes through the parser target and through the protocol
  target in every mode (listener, warm or cold pool, origin answering early or late, whole,
  byte-by-byte or random reads), on whichever build is installed (compiled in `scripts/check`);
- the inputs that show issue 18's open findings are expected to fail, strictly: once a fix
  merges, the test turns red until its entry below is removed;
- one bounded coverage-guided pass of each target with atheris (`SIDECAR_FUZZ_SECONDS`, 60 s by
  default in all; 0 skips it), on the .py sources, which is what atheris can instrument. A
  crash fails the test with the input written out and the command that replays it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.driver import Mode, run_parser, run_protocol

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus" / "request"
SECONDS = float(os.environ.get("SIDECAR_FUZZ_SECONDS", "60"))
# A fixed seed in the test command: the same code explores the same inputs, so a red run means
# the change under test, not the dice. `SIDECAR_FUZZ_SEED=0` asks libFuzzer for a random one
# (what the longer runs of README.md do).
SEED = int(os.environ.get("SIDECAR_FUZZ_SEED", "13"))

KNOWN: dict[str, str] = {
    "request-line-double-space.bin": "fuzz finding (issue 13): llhttp accepts runs of SP in the "
                                     "request line, h11 refuses them",
}

# The smuggling shapes issue 13 asks the corpus to start from: they must stay in it.
SEEDS = (
    "cl-te", "te-cl", "cl-te-smuggle-classic", "te-cl-smuggle-classic", "te-obs-fold",
    "te-space-before-colon", "te-twice", "cl-duplicate-same", "cl-duplicate-differ", "cl-list",
    "obs-fold", "bare-lf-request-line", "bare-lf-header", "bare-lf-chunk", "bare-cr-header",
    "bare-cr-value", "nul-header-value", "nul-header-name", "chunk-size-overflow", "chunk-ext",
    "trailers", "upgrade-with-body-cl", "upgrade-with-body-chunked", "absolute-form-ipv6",
    "cl-huge-int64", "cl-huge-digits",
)


def _corpus() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file())


def _params(known: bool) -> list[object]:
    out: list[object] = []
    for path in _corpus():
        marks = []
        if known and path.name in KNOWN:
            marks.append(pytest.mark.xfail(reason=KNOWN[path.name], strict=True))
        out.append(pytest.param(path, id=path.name, marks=marks))
    return out


def test_the_corpus_keeps_the_smuggling_seeds() -> None:
    names = {p.name for p in _corpus()}
    assert {f"{s}.bin" for s in SEEDS} <= names
    assert set(KNOWN) <= names, "a known case names a file that is not in the corpus"


@pytest.mark.parametrize("path", _params(known=False))
def test_corpus_parser(path: Path) -> None:
    run_parser(path.read_bytes())


@pytest.mark.parametrize("path", _params(known=True))
def test_corpus_protocol(path: Path) -> None:
    data = path.read_bytes()
    failures = []
    for mode in Mode.all():
        try:
            run_protocol(data, mode)
        except Exception as exc:  # any exception is the finding; collect every mode's
            failures.append(f"{mode}: {type(exc).__name__}: {exc}")
    assert not failures, f"{len(failures)} of {len(Mode.all())} modes fail:\n" + "\n".join(
        failures[:4])


def _fuzz(target: str, seconds: int, work: Path) -> tuple[str, list[Path]]:
    """One atheris run; returns its output and the crash files it wrote."""
    found = work / f"{target}-corpus"  # what the run adds: not the repo's corpus
    found.mkdir()
    artifacts = work / f"{target}-artifacts"
    artifacts.mkdir()
    cmd = [
        sys.executable, str(HERE / f"fuzz_{target}.py"),
        f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=1536", "-max_len=8192",
        f"-dict={HERE / 'http.dict'}", f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
        f"-seed={SEED}", str(found), str(CORPUS),
    ]
    env = {**os.environ, "SIDECAR_PURE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                          timeout=seconds * 3 + 120, check=False)
    output = proc.stdout + proc.stderr
    crashes = sorted(artifacts.iterdir())
    if proc.returncode != 0 and not crashes:
        pytest.fail(f"atheris {target} exited {proc.returncode} without a crash file:\n"
                    f"{output[-4000:]}")
    return output, crashes


@pytest.mark.skipif(SECONDS <= 0, reason="SIDECAR_FUZZ_SECONDS=0")
@pytest.mark.timeout(int(SECONDS * 3) + 300)
def test_fuzz_pass(tmp_path: Path) -> None:
    # The protocol target costs ~50x more per input than the parser's: it gets 3/4 of the time.
    budget = {"parser": max(1, round(SECONDS / 4)), "protocol": max(1, round(SECONDS * 3 / 4))}
    report = []
    for target, seconds in budget.items():
        output, crashes = _fuzz(target, seconds, tmp_path)
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", output)
        cov = re.findall(r"cov: (\d+) ft: (\d+)", output)
        report.append(f"{target}: {runs[-1] if runs else '?'} inputs in {seconds}s, "
                      f"cov/ft {cov[-1] if cov else '?'}")
        if crashes:
            keep = Path(os.environ.get("SIDECAR_FUZZ_ARTIFACTS", tmp_path))
            keep.mkdir(parents=True, exist_ok=True)
            saved = [shutil.copy(c, keep / c.name) for c in crashes]
            first = Path(saved[0]).read_bytes()
            pytest.fail(
                f"atheris {target}: {len(crashes)} crashing input(s), written to {saved}.\n"
                f"first input: {first[:600]!r}\n"
                f"replay: SIDECAR_PURE=1 PYTHONPATH=. python tests/fuzz/fuzz_{target}.py "
                f"{saved[0]}\n--- output ---\n{output[-6000:]}")
    print("; ".join(report))
