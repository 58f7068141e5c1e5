"""Start pproxy under a current uvloop event loop.

pproxy 2.7.9 installs uvloop then calls `asyncio.get_event_loop()`, which uvloop >= 0.21
refuses when no loop is set ("There is no current event loop"). This shim makes pproxy's
`uvloop.install()` also create and set the loop, then runs pproxy's own `main()` unchanged.
"""

import asyncio
import sys

import uvloop


def _install_and_set_loop() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())


if __name__ == "__main__":
    uvloop.install = _install_and_set_loop
    from pproxy.server import main

    sys.exit(main())
