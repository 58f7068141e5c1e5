"""atheris entry point: the whole app-side protocol (target (b) of driver.py).

    SIDECAR_PURE=1 python tests/fuzz/fuzz_protocol.py -max_total_time=60 tests/fuzz/corpus/request

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
    from tests.fuzz.driver import Finding, run_protocol

# SIDECAR_FUZZ_STRICT=1: stop on the known findings too (driver.UPGRADE_BODY, TRAILERS,
# ESCAPES, IPV6, CL_INT64 of issue 18, LINE_SPACES and QUEUE_LOOP).
STRICT = os.environ.get("SIDECAR_FUZZ_STRICT") == "1"


def run_protocol_input(data: bytes) -> None:
    try:
        run_protocol(data)  # the mode (listener, pool, origin, split) is drawn from the input
    except Finding as exc:
        if STRICT or not exc.known:
            raise


def main() -> None:
    atheris.Setup(sys.argv, run_protocol_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
