"""atheris entry point: the request parser (target (a) of driver.py).

    SIDECAR_PURE=1 python tests/fuzz/fuzz_parser.py -max_total_time=60 tests/fuzz/corpus/request

Run it on the .py sources (SIDECAR_PURE=1): atheris measures coverage by instrumenting Python
bytecode, and a mypyc-compiled module has none. Any exception is a crash: libFuzzer writes the
input to crash-<sha1> (see -artifact_prefix) and replays it with the file as argument.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports(include=["sidecar"]):
    from tests.fuzz.driver import run_parser


def main() -> None:
    atheris.Setup(sys.argv, run_parser)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
