"""freeze_heap (sidecar/app.py): what exists when the sidecar is ready is exempt from the cyclic
collector's scans, and garbage made before the call is collected, not frozen. Run in a child
interpreter: freezing pytest's own heap would outlive this test."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import gc, weakref
    from sidecar.app import freeze_heap

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return a

    garbage = weakref.ref(cycle())  # unreachable already, kept only by its cycle
    live = cycle()
    freeze_heap()
    assert garbage() is None, "garbage from before the call must be collected, not frozen"
    assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
    frozen = gc.get_freeze_count()
    assert gc.collect() == 0
    # A frozen cycle that becomes garbage later is let go by the next call (a config reload).
    later = weakref.ref(live)
    del live
    gc.collect()
    assert later() is not None, "frozen: a plain collection does not scan it"
    freeze_heap()
    assert later() is None
    assert abs(gc.get_freeze_count() - frozen) < frozen // 10
    print("ok")
""")


def test_freeze_heap_collects_first_then_freezes() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
