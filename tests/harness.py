"""Test harness: a real sidecar process on free loopback ports, and small real upstreams.

`Sidecar(config_dict)` writes the config to a temp file, starts `python -m sidecar run` (with
`--loop uvloop` or `--loop asyncio`), waits until the admin `/readyz` answers 200, and stops
the process by its PID (SIGTERM: a drain; a config naming no `drain` gets TEARDOWN_DRAIN, so
that the stop takes no longer than the work left). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import yaml

LOOPS = ("uvloop", "asyncio")
# The drain of a config that names none (see Sidecar): what stop() waits for.
TEARDOWN_DRAIN = {"grace": "2s", "accept_period": "0s"}


def run_loop(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """`main()` to its end on a new event loop of kind `loop` (one of LOOPS)."""
    import uvloop

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


@contextlib.asynccontextmanager
async def app_in_process(cluster: dict[str, Any]) -> AsyncIterator[tuple[Any, int]]:
    """The sidecar's `App` in this process, on the running loop, for a test that must reach
    inside it: one `protocol: http` listener ("l") in front of `cluster` (named "up"), admin
    and status on free ports, no access log. Yields (app, the listener's port); shuts down."""
    from sidecar.app import App
    from sidecar.config import parse_config

    config = parse_config(json.dumps({
        "admin": {"address": "127.0.0.1:0"},
        "status": {"address": "127.0.0.1:0"},
        "access_log": False,
        "listeners": [{"name": "l", "address": "127.0.0.1:0", "protocol": "http",
                       "cluster": "up"}],
        "clusters": [{"name": "up", **cluster}],
    }))
    app = App(config)
    await app.start()
    try:
        yield app, app.listeners["l"].port
    finally:
        await app.shutdown()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = f.read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
_rng = random.Random(os.getpid() ^ int(time.time() * 1000))
_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port *outside* the kernel's ephemeral range. A port from `bind(0)` is
    ephemeral: between our releasing it and a server binding it, any outgoing connection of
    the test run may be given it as its local port (seen: 20 tests failing on one port).
    Ports below the range are never handed out implicitly."""
    lo = 10000
    hi = _EPHEMERAL[0] if _EPHEMERAL[0] > lo + 1000 else 30000
    if len(_handed_out) > (hi - lo) // 2:
        _handed_out.clear()
    for _ in range(200):
        port = _rng.randrange(lo, hi)
        # Never the same port twice in a run: two calls for one config (admin and a listener)
        # must not collide, and neither bound yet, so bind() alone cannot tell.
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def http_get(url: str, timeout: float = 5.0, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Sidecar:
    """A running sidecar. `.port(name)` is a listener's port; `.admin` / `.status` URLs."""

    def __init__(
        self,
        config: dict[str, Any],
        loop: str = "uvloop",
        env: dict[str, str] | None = None,
        ready_timeout: float = 15.0,
        wait_ready: bool = True,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-test-"))
        config = dict(config)
        self.admin_port = free_port()
        self.status_port = free_port()
        config.setdefault("admin", {"address": f"127.0.0.1:{self.admin_port}"})
        config.setdefault("status", {"address": f"127.0.0.1:{self.status_port}"})
        config.setdefault("access_log", False)
        # Stopping the process is a drain: with the defaults (accept_period 5 s, grace 25 s)
        # every test's teardown waited out accept_period for nothing, and one holding a
        # connection was killed at 10 s. A test of the drain gives its own `drain`.
        config.setdefault("drain", dict(TEARDOWN_DRAIN))
        self.ports: dict[str, int] = {}
        for listener in config.get("listeners", []):
            if "address" not in listener:
                port = free_port()
                listener["address"] = f"127.0.0.1:{port}"
            self.ports[listener["name"]] = int(str(listener["address"]).rsplit(":", 1)[1])
        self.config = config
        self.config_path = self.dir / "config.yaml"
        self.write_config(config)
        self.log_path = self.dir / "sidecar.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(self.config_path),
             "--loop", loop],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.proc.pid
        if wait_ready:
            self.wait_ready(ready_timeout)

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        os.replace(tmp, self.config_path)

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def status(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    def port(self, listener: str) -> int:
        return self.ports[listener]

    def url(self, listener: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}:\n{self.logs()}")
            try:
                status, _ = http_get(f"{self.admin}/readyz", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"sidecar not ready within {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def metrics(self) -> str:
        return http_get(f"{self.admin}/metrics")[1].decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total

    def clusters(self) -> dict[str, Any]:
        body = http_get(f"{self.admin}/clusters")[1]
        return {c["name"]: c for c in json.loads(body)["clusters"]}

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadedServer:
    """Runs an aiohttp `web.Application` on its own loop in a thread, on 127.0.0.1."""

    def __init__(self, app: Any, port: int | None = None, ssl_context: Any = None) -> None:
        import asyncio

        from aiohttp import web

        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._app = app
        self._runner: web.AppRunner | None = None
        self._ssl = ssl_context
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("upstream did not start")

    def _run(self) -> None:
        import asyncio

        from aiohttp import web

        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl)
            await site.start()
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def call(self, fn: Any) -> None:
        self._loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        import asyncio

        async def cleanup() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        fut = asyncio.run_coroutine_threadsafe(cleanup(), self._loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


NGINX_EXE = "/usr/sbin/nginx"  # Debian's nginx-light, as scripts/check installs it


def require_tool(path: str, install: str) -> str:
    """`path` if that executable exists; else the test FAILS, saying how to install it. Inside
    the test command a missing tool is a failure, not a skip: a run without nginx must not pass
    green with its nginx tests unrun. `bash scripts/check` installs every tool the tests use."""
    if not os.access(path, os.X_OK):
        import pytest

        pytest.fail(
            f"{path} is missing ({install}; `bash scripts/check` installs it): the tests that "
            "drive it fail rather than skip",
            pytrace=False,
        )
    return path


@contextlib.contextmanager
def nginx(conf_body: str, port: int | None = None) -> Iterator[int]:
    """nginx from apt in the foreground with `conf_body` inside `http {}`; `{port}` is replaced.
    Stopped by its PID."""
    exe = require_tool(NGINX_EXE, "apt-get install nginx-light")
    port = port or free_port()
    d = Path(tempfile.mkdtemp(prefix="sidecar-nginx-"))
    (d / "logs").mkdir()
    conf = d / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  {conf_body.replace("{port}", str(port))}
}}
"""
    )
    proc = subprocess.Popen([exe, "-p", str(d), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None:
                raise RuntimeError((d / "logs" / "error.log").read_text())
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class SilentListener:
    """A TCP listener on 127.0.0.1 that accepts connections and never reads or answers: a
    blackhole upstream, or somewhere for prewarmed pool connections to land. `port`: where
    (default: a free one). Stopped with `close()`."""

    def __init__(self, port: int | None = None, backlog: int = 64) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", free_port() if port is None else port))
        self.sock.listen(backlog)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():  # bounded by close(): the accept times out every 0.1 s
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def still_open(self) -> int:
        """Accepted connections whose peer (the sidecar) has not closed them."""
        n = 0
        for conn in self.accepted:
            if conn.fileno() < 0:
                continue
            try:
                data = conn.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            except BlockingIOError:
                n += 1
                continue
            except OSError:
                continue
            if data:  # request bytes, unread: still open unless an EOF follows
                with contextlib.suppress(OSError):
                    conn.recv(65536, socket.MSG_DONTWAIT)
                n += 1
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()
