"""Processes of a benchmark run: free ports, CPU pinning, readiness, memory/CPU probes, stop by PID.

Every process the bench starts goes through `Procs.start`, which records it; `Procs.stop_all`
(called from a `finally`) stops each one by its PID: SIGTERM, wait, then SIGKILL. Children also
get PR_SET_PDEATHSIG so that a bench killed with SIGKILL does not leave proxies behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc: children just won't get a parent-death signal
    _LIBC = None

CLK_TCK = os.sysconf("SC_CLK_TCK")
_child_priority = 0  # nice value for every process the bench starts (see set_child_priority)


class BenchError(Exception):
    """A target or case could not be run; recorded as an error row, never fatal to the run."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_child_priority(nice: int) -> None:
    """Start every later child at this nice value (negative needs root): on a shared machine,
    `--priority -10` keeps other work from taking the proxy's core in the middle of a case."""
    global _child_priority
    _child_priority = nice


def _child_setup(cores: frozenset[int] | None, idle: bool = False) -> Callable[[], None]:
    """Runs in the child between fork and exec: pin to `cores`, set the nice value (or the
    SCHED_IDLE policy: runs only when nothing else wants the core), die with the parent."""
    nice = _child_priority

    def setup() -> None:
        if cores:
            os.sched_setaffinity(0, cores)
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        elif nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return setup


def pinned_run(
    cmd: Sequence[str], cores: frozenset[int] | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived tool (wrk, the load generator) pinned to `cores`; killed on timeout."""
    try:
        return subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_child_setup(cores),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{Path(cmd[0]).name} did not finish within {timeout:.0f}s") from exc


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat. Busy is user + nice + system + steal
    (another VM's work); irq and softirq time are left out, since the loopback traffic of the
    process pinned there is handled in softirq on its core."""
    out = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, values[:8])
                busy = user + nice + system + steal
                out[int(name[3:])] = (busy, busy + idle + iowait + irq + softirq)
    return out


def core_busy_pct(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                  core: int) -> float | None:
    if core not in before or core not in after:
        return None
    busy = after[core][0] - before[core][0]
    total = after[core][1] - before[core][1]
    return round(100 * busy / total, 1) if total > 0 else None


@dataclass
class Proc:
    """One long-lived process (upstream or proxy) and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    cores: frozenset[int] | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def describe_exit(self) -> str:
        last = " | ".join(line.strip() for line in self.tail(3).splitlines())
        return f"{self.name} exited with code {self.popen.returncode}: {last}"

    def pids(self) -> list[int]:
        """This process and its descendants (nginx workers, anything a proxy forks)."""
        seen: list[int] = []
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    todo.extend(int(p) for p in task.read_text().split())
        return seen

    def memory_kib(self) -> dict[str, int]:
        """VmRSS now and VmHWM (peak RSS since start), summed over the process tree."""
        rss = hwm = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        return {"rss_kib": rss, "hwm_kib": hwm}

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process tree so far."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / CLK_TCK

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM; after `timeout` SIGINT (a second signal makes the sidecar skip its drain);
        after `timeout` more, SIGKILL. Always reaps the child."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            if self.popen.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)


@dataclass
class Procs:
    """Starts processes, remembers them, stops them all (newest first)."""

    workdir: Path
    started: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        cores: frozenset[int] | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        idle: bool = False,
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                preexec_fn=_child_setup(cores, idle),
            )
        proc = Proc(name, popen, log_path, cores)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


@contextlib.contextmanager
def workspace(prefix: str, keep: Path | None = None) -> Iterator[Procs]:
    """A `Procs` working in `keep` (created if need be, and left in place), else in a temporary
    directory named `prefix`... that is removed at the end; every process started through it
    is stopped by its PID on the way out, whatever happened."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        procs = Procs(work)
        try:
            yield procs
        finally:
            procs.stop_all()


def wait_ready(
    proc: Proc, probe: Callable[[], bool], timeout: float = 15.0, what: str = "ready"
) -> None:
    """Poll `probe` until it returns True; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(proc.describe_exit())
        with contextlib.suppress(OSError, BenchError):
            if probe():
                return
        time.sleep(0.05)
    last = " | ".join(line.strip() for line in proc.tail(3).splitlines())
    raise BenchError(f"{proc.name} not {what} after {timeout:.0f}s: {last}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.create_connection((host, port), timeout=0.5):
        return True


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def http_request(
    port: int,
    target: str,
    *,
    method: str = "GET",
    host_header: str | None = None,
    extra_headers: dict[str, str] | None = None,
    timeout: float = 3.0,
) -> Response:
    """One HTTP/1.1 request on a fresh connection, Connection: close, read to EOF.

    Enough for readiness probes, metrics scrapes and the pre-case correctness check; the
    measurements themselves come from wrk and bench/loadgen.py.
    """
    headers = {"Host": host_header or f"127.0.0.1:{port}", "Connection": "close"}
    headers.update(extra_headers or {})
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + b"\r\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head_bytes, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise BenchError(f"incomplete HTTP response from port {port}: {raw[:80]!r}")
    lines = head_bytes.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError) as exc:
        raise BenchError(f"bad status line from port {port}: {lines[0]!r}") from exc
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if "chunked" in parsed.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    return Response(status, parsed, body)


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2 :]
    return b"".join(out)
