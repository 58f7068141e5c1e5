"""What the fuzz targets run on one input: the request parser, and the whole app-side protocol.

Both targets are plain functions of the input bytes, shared by the atheris entry points
(`fuzz_parser.py`, `fuzz_protocol.py`) and by the corpus replay in `test_fuzz.py`. Every
property violation raises `Finding` (an AssertionError); any other exception escaping the
sidecar is a finding by itself. Everything the target varies besides the bytes (where reads
split, how the upstream answers, cold or warm pool, which listener) is drawn from a PRNG seeded
with the input's CRC, so an input always replays the same way.

Target (a), `run_parser`: `RequestParser` fed the input whole, in a random split and (short
inputs) byte by byte. Properties: only `ProtocolError` (and its subclasses) escape; the events
(heads, merged body bytes, ends, upgrade rest) and the error class do not depend on the split;
with a 256-byte head limit, what the parser holds of an unfinished head stays within the limit
plus its slack plus the read in progress (no unbounded buffer).

Target (b), `run_protocol`: a real `DownstreamProtocol` with a real `ListenerContext`, route
table, `ClusterSet`, clusters, policies, pools and `UpstreamConnection`s, on a real asyncio
event loop. The transports are fakes, and that is deliberate (the one mock of this harness):
a fuzzer must run thousands of inputs a second, deterministically, and must see exactly what
the sidecar wrote on each upstream connection, which sockets cannot give it (two cores shared by
the whole test run, timing-dependent splits). The loop's clock is ours too (time passes only
when the driver says so, to fire deadlines once the input is spent), and its
`create_connection` hands the pool a fake transport at once instead of dialling. On the other
side of each upstream transport sits an *origin*: an h11 server that parses what the sidecar
forwards and answers (after the request's end, or as soon as its head arrives: both are legal).

Properties of (b):
- nothing but what the sidecar handles itself escapes `data_received`, a loop callback or a
  task (the loop's exception handler records the rest);
- bounded work: at most `_MAX_STEPS` loop turns per input and `_WATCHDOG` seconds;
- bounded buffers: what the protocol holds (pipelined events, the replay copy of a body,
  corked output, upgrade bytes) never exceeds `_MAX_REPLAY` plus two reads;
- framing: a request the sidecar considers wholly sent must be complete at the origin, and a
  connection never carries a request while the previous one on it is unfinished there;
- nothing leaks: once the app's connection is gone, no request is counted in flight;
- differential (see `compare`): every request the sidecar forwards parses under h11 to the
  same request that h11 makes of the app's original bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11

from sidecar import config as cfgmod
from sidecar.discovery.endpoints import Endpoint, Reset
from sidecar.downstream.context import Limits, ListenerContext
from sidecar.downstream.protocol import DownstreamProtocol
from sidecar.downstream.router import RouteTable
from sidecar.errors import ProtocolError
from sidecar.http.headers import HOP_BY_HOP, Headers
from sidecar.http.parser import RequestHead, RequestParser, RequestSink
from sidecar.observe.stats import Stats
from sidecar.policy.resilience import ClusterPolicies
from sidecar.streams import CarrierState as State
from sidecar.timers import Wheel
from sidecar.upstream.cluster import Cluster
from sidecar.upstream.connection import UpstreamConnection
from sidecar.upstream.registry import ClusterSet


class Finding(AssertionError):
    """A property of the front door does not hold for this input. `known`: the open issue
    that reported it already (the atheris entry points do not stop on those: see KNOWN)."""

    def __init__(self, text: str, known: str = "") -> None:
        super().__init__(text)
        self.known = known


# Findings that issue 18 reported and another branch is fixing, recognised by their shape so
# that a fuzz pass can go on past them (test_fuzz.py replays the corpus inputs showing each,
# as strict xfails). When those fixes merge and the xfails turn red, remove these too.
UPGRADE_BODY = "issue 18 #1: Upgrade request with a body"
TRAILERS = "issue 18 #2: trailers dropped on a new connection"
ESCAPES = "issue 18 #3: an exception escapes the request path"
IPV6 = "issue 18 #7: IPv6 authority without brackets"
CL_INT64 = "issue 18 #5: a Content-Length beyond int64 is forwarded"
_INT64_MAX = (1 << 63) - 1
# Found by this fuzzer, not fixed (see tests/fuzz/README.md): llhttp takes a run of spaces
# between the request line's parts as one (RFC 9112 3 asks for single SP; h11 refuses).
LINE_SPACES = "fuzz finding: runs of SP in the request line accepted"
# Found by this fuzzer, not fixed here (tests/integration/test_pipelined_refusals.py): a request
# in flight, then two pipelined requests refused at once, loop for ever in _run_queue.
QUEUE_LOOP = "fuzz finding: pipelined refusals loop for ever in DownstreamProtocol._run_queue"
_ESCAPING_IN = frozenset({"split_authority", "dynamic_cluster"})  # where #3's exceptions rise


def known_escape(exc: BaseException) -> str:
    """ESCAPES when `exc` (not ours) was raised where issue 18 #3 found it, else ""."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _ESCAPING_IN:
            return ESCAPES
        tb = tb.tb_next
    return ""


def _rng(data: bytes) -> random.Random:
    return random.Random(zlib.crc32(data))


def _cuts(rng: random.Random, size: int) -> list[int]:
    if size < 2:
        return []
    return sorted({rng.randrange(1, size) for _ in range(rng.randrange(0, 9))})


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


# === (a) the request parser ===================================================================
_HEAD_SLACK = 1024  # sidecar.http.parser._HEAD_SLACK: what llhttp may buffer past the limit


class _Recorder(RequestSink):
    """Records what a RequestParser reports; adjacent body pieces are merged."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.pending = 0  # bytes fed since the last event

    def on_request_head(self, head: RequestHead) -> None:
        self.pending = 0
        self.events.append((
            "head", head.method, head.target, head.version, head.authority, head.absolute,
            head.host, head.keep_alive, head.upgrade, head.content_length, head.chunked,
            tuple(head.forward),
        ))

    def on_request_body(self, data: bytes) -> None:
        self.pending = 0
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def on_request_end(self, trailers: Headers | None) -> None:
        self.pending = 0
        self.events.append(("end", tuple(trailers) if trailers else None))

    def on_upgrade(self, rest: bytes) -> None:
        self.pending = 0
        self.events.append(("upgrade", rest))


def feed_parser(data: bytes, cuts: list[int], max_head: int = 65536) -> tuple[list[Any], str]:
    """Events and the class name of the error that ended parsing ("" for none)."""
    rec = _Recorder()
    parser = RequestParser(rec, max_head)
    largest = 0
    for piece in pieces(data, cuts):
        if parser.upgraded:
            kind, rest = rec.events[-1]
            rec.events[-1] = (kind, rest + piece)
            continue
        largest = max(largest, len(piece))
        rec.pending += len(piece)
        try:
            parser.feed(piece)
        except ProtocolError as exc:
            return rec.events, type(exc).__name__
        if parser.in_head and rec.pending > max_head + _HEAD_SLACK + 2 * largest:
            raise Finding(f"parser holds {rec.pending} bytes of an unfinished head "
                          f"(limit {max_head} + slack, reads of at most {largest})")
    return rec.events, ""


def run_parser(data: bytes) -> None:
    rng = _rng(data)
    whole = feed_parser(data, [])
    splits = [_cuts(rng, len(data))]
    if len(data) <= 512:
        splits.append(list(range(1, len(data))))
    for cuts in splits:
        got = feed_parser(data, cuts)
        if got != whole:
            raise Finding(f"parser events depend on the split {cuts}:\n{whole}\n{got}")
    feed_parser(data, _cuts(rng, len(data)), max_head=256)


# === (b) the app-side protocol ================================================================
_MAX_STEPS = 4000  # loop turns per input, besides a few per read
_MAX_REPLAY = 64 * 1024  # sidecar.downstream.exchange._MAX_REPLAY
_H11_MAX = 1 << 20  # h11's own head limit (16 KiB) is below ours (64 KiB): not a disagreement
_ENDPOINT = Endpoint("127.0.0.1", 9)  # never dialled: the loop's create_connection is fake
_CONTROL = frozenset({b"host", b"x-sidecar-timeout-ms", b"x-sidecar-retry-attempts",
                      b"x-sidecar-deadline-ms"})

_CONFIG = cfgmod.parse_config(
    "listeners:\n"
    "  - name: fixed\n    address: 127.0.0.1:1\n    cluster: up\n"
    "  - name: routed\n    address: 127.0.0.1:2\n"
    "    routes: [{match: {host: up}, cluster: up}, {match: {path_prefix: /api}, cluster: up}]\n"
    "    forward_proxy: {enabled: true, allowed_hosts: ['*'], connect: true}\n"
    "clusters:\n"
    "  - name: up\n    discovery: {type: static, endpoints: ['127.0.0.1:9']}\n"
)


class FuzzLoop(asyncio.SelectorEventLoop):
    """A real event loop whose clock moves only when told, and whose connects succeed at once
    onto an origin (see the top of this module for why)."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.t = 1000.0
        self.world = world

    def time(self) -> float:
        return self.t

    def now(self) -> float:  # the sidecar's Clock protocol, for the policies
        return self.t

    async def create_connection(self, protocol_factory: Any, host: Any = None, port: Any = None,
                                **kwargs: Any) -> Any:
        protocol = protocol_factory()
        origin = Origin(self.world)
        transport = FakeTransport(self, protocol, origin.received)
        origin.transport = transport
        self.world.origins.append(origin)
        protocol.connection_made(transport)
        return transport, protocol


class FakeTransport(asyncio.Transport):
    """An in-memory transport: what is written goes to `sink`; close and abort report the
    connection lost on the next loop turn, as socket transports do."""

    def __init__(self, loop: FuzzLoop, protocol: Any, sink: Any) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.sink = sink
        self.closing = False
        self.lost = False
        self.paused = False
        self.eof_written = False
        self.written = 0

    def get_protocol(self) -> Any:
        return self.protocol

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def write(self, data: Any) -> None:
        if self.lost or self.eof_written:
            return
        data = bytes(data)
        if data:
            self.written += len(data)
            self.loop.world.progress += 1
            self.sink(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.world.progress += 1
            self.loop.call_soon(self.connection_lost)

    def abort(self) -> None:
        self.close()

    def connection_lost(self) -> None:
        if not self.lost:
            self.lost = True
            self.closing = True
            self.protocol.connection_lost(None)


@dataclass
class Req:
    """One request as h11 parsed it (from the app's bytes, or from what reached an origin)."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] | None = None
    complete: bool = False
    owner: Any = None  # the exchange that sent it (origins only)
    tunnel: bytes = b""  # CONNECT (reference only): the bytes after the head

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


def _req(event: h11.Request) -> Req:
    return Req(event.method, event.target, event.http_version,
               [(bytes(n), bytes(v)) for n, v in event.headers])


class Origin:
    """The server end of one upstream connection: h11 parses what the sidecar wrote."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.transport: FakeTransport | None = None
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=_H11_MAX)
        self.requests: list[Req] = []
        self.current: Req | None = None
        self.owner: Any = None  # the exchange whose request is being received
        self.answered = 0  # responses sent
        self.broken = False
        self.tunnel = False
        self.closed = False
        self.to_deliver = b""
        self.raw = b""  # what went through a tunnel

    @property
    def conn(self) -> Any:
        return self.transport.protocol if self.transport is not None else None

    def received(self, data: bytes) -> None:
        """Called from the sidecar's write: parse only; answers come from the driver."""
        conn = self.conn
        if self.tunnel or not isinstance(conn, UpstreamConnection) \
                or conn.state in (State.TUNNEL, State.CLOSED):
            self.tunnel = True  # a CONNECT tunnel: raw bytes, no HTTP
            self.raw += data
            return
        if self.broken or self.closed:
            return
        owner = conn.user
        h = self.h
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()  # answered and read: the next bytes begin a new request
        if h.their_state is h11.IDLE and not h.trailing_data[0]:
            self.owner = owner
        elif owner is not self.owner:
            cur = self.current
            self.world.finding(
                f"a request of another exchange was written onto an upstream connection whose "
                f"request is unfinished there ({h.their_state}): the origin reads it as part of "
                f"{cur and cur.method!r} {cur and cur.target!r}")
        h.receive_data(data)
        self.parse()

    def parse(self) -> None:
        h = self.h
        for _ in range(10000):
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                self.broken = True
                self.world.finding(f"the sidecar forwarded bytes h11 rejects: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.current = _req(event)
                self.current.owner = self.owner
                self.requests.append(self.current)
            elif isinstance(event, h11.Data):
                assert self.current is not None
                self.current.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert self.current is not None
                self.current.complete = True
                self.current.trailers = [(bytes(n), bytes(v)) for n, v in event.headers]
                if self.current.method == b"CONNECT":
                    self.tunnel = True
                    return
            else:
                return  # ConnectionClosed

    def step(self, early: bool, body: bytes) -> None:
        """Answer the request in progress when it is due; deliver what is waiting."""
        transport = self.transport
        if transport is None or transport.lost or self.tunnel:
            return
        h = self.h
        cur = self.current
        due = cur is not None and len(self.requests) > self.answered and (
            cur.complete or early) and h.our_state is h11.SEND_RESPONSE
        if due and cur is not None:
            self.answered = len(self.requests)
            head = cur.method == b"HEAD"
            out = h.send(h11.Response(status_code=200, headers=[
                ("content-length", str(len(body))), ("content-type", "text/plain")]))
            if body and not head:
                out += h.send(h11.Data(data=body))
            out += h.send(h11.EndOfMessage())
            self.to_deliver += out
        if self.to_deliver and not transport.paused and not transport.lost:
            data, self.to_deliver = self.to_deliver, b""
            self.world.progress += 1
            transport.protocol.data_received(data)
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            self.parse()  # bytes of a next request may already be buffered
        elif h.our_state is h11.MUST_CLOSE and not self.to_deliver and not transport.closing:
            self.closed = True
            transport.protocol.eof_received()
            transport.close()


@dataclass
class World:
    """Everything of one run of target (b)."""

    origins: list[Origin] = field(default_factory=list)
    findings: list[tuple[str, str]] = field(default_factory=list)  # (text, known)
    progress: int = 0
    heads: list[RequestHead] = field(default_factory=list)

    def finding(self, text: str, known: str = "") -> None:
        self.findings.append((text, known))


class _Tap(RequestSink):
    """Sits between the protocol's parser and the protocol, numbering the heads in order (the
    exchange keeps its head, so a forwarded request is traced to the app's request it was)."""

    def __init__(self, world: World, proto: DownstreamProtocol) -> None:
        self.world = world
        self.proto = proto

    def on_request_head(self, head: RequestHead) -> None:
        self.world.heads.append(head)
        self.proto.on_request_head(head)

    def on_request_body(self, data: bytes) -> None:
        self.proto.on_request_body(data)

    def on_request_end(self, trailers: Headers | None) -> None:
        self.proto.on_request_end(trailers)

    def on_upgrade(self, rest: bytes) -> None:
        self.proto.on_upgrade(rest)


def _build(loop: FuzzLoop, fixed: bool, warm: bool) -> tuple[DownstreamProtocol, ClusterSet]:
    wheel = Wheel(loop)
    stats = Stats()

    def cluster(cc: Any) -> Cluster:
        c = Cluster(cc, loop, wheel, stats.cluster(cc.name))
        # The policies read the same clock as the loop (in the sidecar both are monotonic).
        c.policies = ClusterPolicies(cc.name, cc, c.stats, loop, c.refresh)
        c.apply(Reset((_ENDPOINT,)))  # discovery answered: the one (fake) endpoint
        if warm:
            pool = c.pools[f"{_ENDPOINT.ip}:{_ENDPOINT.port}"]
            pool.settings = _warm(pool.settings)
            pool.prewarm()  # connects through FuzzLoop.create_connection once the loop runs
        return c

    def build_dynamic(host: str, port: int) -> Cluster:
        # What app.py does for a forward-proxy destination (validation included), except
        # that discovery answers at once with the fake endpoint instead of asking DNS.
        return cluster(cfgmod.dynamic_cluster(host, port))

    clusters = ClusterSet(loop, build_dynamic, lambda c: None)
    clusters.static["up"] = cluster(_CONFIG.clusters[0])
    lc = _CONFIG.listeners[0 if fixed else 1]
    ctx = ListenerContext(
        name=lc.name, table=RouteTable.from_config(lc, frozenset()), clusters=clusters,
        stats=stats.listener(lc.name), limits=Limits(), loop=loop, wheel=wheel,
    )
    proto = DownstreamProtocol(ctx)
    return proto, clusters


def _warm(settings: Any) -> Any:
    from dataclasses import replace

    return replace(settings, min_idle=1)


def _held(proto: DownstreamProtocol) -> int:
    """Bytes the protocol holds for later: pipelined events, a body's replay copy, output."""
    held = sum(len(p) for p in proto._out)  # noqa: SLF001 (a property of the fuzz harness)
    held += len(proto._upgrade_rest)  # noqa: SLF001
    for kind, value in proto.queue or ():
        if kind in ("body", "upgrade"):
            held += len(value)
    ex = proto.exchange
    if ex is not None:
        held += sum(len(p) for p in ex.body or ())
    return held


class _Caught(logging.Handler):
    """An exception the sidecar caught with a catch-all and logged is a finding too."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(f"logged by {record.name}: {record.getMessage()}: "
                               f"{record.exc_info[1]!r}")


@dataclass(frozen=True)
class Mode:
    """How one run of target (b) goes, besides the bytes."""

    fixed: bool = False  # the listener with a fixed cluster, else routes + forward proxy
    warm: bool = True  # a pooled connection is ready, else the request waits for a connect
    early: bool = False  # the origin answers at the request head, else after its end
    body: bytes = b"ok"  # the origin's response body
    split: str = "random"  # "whole", "bytes" or "random" (seeded by the input)

    @classmethod
    def drawn(cls, data: bytes) -> Mode:
        """The mode the fuzzer uses for an input: drawn from the input's CRC."""
        rng = _rng(data)
        return cls(rng.random() < 0.25, rng.random() < 0.75, rng.random() < 0.3,
                   rng.choice([b"", b"ok", b"x" * 300]),
                   "bytes" if len(data) <= 256 and rng.random() < 0.2 else "random")

    @classmethod
    def all(cls) -> list[Mode]:
        """Every mode (the corpus replay runs each file in each)."""
        return [cls(fixed, warm, early, b"ok", split) for fixed in (False, True)
                for warm in (True, False) for early in (False, True)
                for split in ("whole", "bytes", "random")]

    def cuts(self, data: bytes) -> list[int]:
        if self.split == "whole":
            return []
        if self.split == "bytes":
            return list(range(1, len(data)))
        return _cuts(_rng(b"split" + data), len(data))


_WATCHDOG = 5.0  # seconds one input may take (most take a few ms)


class Hang(Finding):
    """The watchdog fired: one input ran for `_WATCHDOG` seconds."""


@contextlib.contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    """Turn a hang into a Finding, with the stack it hung in. SIGALRM interrupts Python code
    only: on the .py sources (the atheris runs) it catches any hang; a loop inside compiled
    code is caught by libFuzzer's -timeout instead (and pytest-timeout's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        known = QUEUE_LOOP if "_run_queue" in names else ""
        raise Hang(f"one input ran for {seconds}s; stack: {' < '.join(names[:12])}", known)

    # pytest-timeout (signal method) keeps its own SIGALRM timer: leave it running if it is due
    # first, else restore it afterwards with what is left of it.
    pending, interval = signal.getitimer(signal.ITIMER_REAL)
    if pending and pending <= seconds:
        yield
        return
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:
            left = pending - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, left if left > 0 else 0.001, interval)


def run_protocol(data: bytes, mode: Mode | None = None) -> World:
    """Drive one app connection with `data`; raise Finding if a property fails."""
    mode = mode or Mode.drawn(data)
    fixed, warm, early, body = mode.fixed, mode.warm, mode.early, mode.body
    cuts = mode.cuts(data)
    world = World()
    loop = FuzzLoop(world)
    errors: list[str] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(
        f"{context.get('message')}: {context.get('exception')!r}"))
    caught = _Caught(errors)
    root = logging.getLogger("sidecar")
    root.addHandler(caught)
    try:
        with _watchdog(_WATCHDOG):
            proto, clusters = loop.run_until_complete(_drive(loop, world, data, cuts, fixed,
                                                             warm, early, body, errors))
    except Finding:
        raise
    except Exception as exc:
        known = known_escape(exc)
        if known:
            raise Finding(f"{type(exc).__name__} escaped: {exc}", known) from exc
        raise
    finally:
        root.removeHandler(caught)
        loop.close()
    if errors:
        hung = [e for e in errors if "Hang" in e]
        raise Finding("exception in a loop callback or task: " + "; ".join(errors),
                      QUEUE_LOOP if hung and all(QUEUE_LOOP in e for e in hung) else "")
    if world.findings:
        known = {k for _, k in world.findings}
        raise Finding("\n".join(t for t, _ in world.findings),
                      known.pop() if len(known) == 1 else "")
    ctx = proto.ctx
    if ctx.stats.inflight or ctx.stats.downstream_connections:
        raise Finding(f"app connection gone, yet inflight={ctx.stats.inflight} "
                      f"connections={ctx.stats.downstream_connections}")
    for c in clusters.all():
        for pool in c.pools.values():
            if pool.inflight:
                raise Finding(f"pool {pool!r} still counts {pool.inflight} requests in flight")
    compare(data, world)
    return world


async def _drive(loop: FuzzLoop, world: World, data: bytes, cuts: list[int], fixed: bool,
                 warm: bool, early: bool, body: bytes, errors: list[str]
                 ) -> tuple[DownstreamProtocol, ClusterSet]:
    proto, clusters = _build(loop, fixed, warm)
    app = FakeTransport(loop, proto, lambda _data: None)
    proto.connection_made(app)
    proto.parser = RequestParser(_Tap(world, proto), proto.ctx.limits.max_header_bytes)
    steps = 0
    largest = 0
    chunks = pieces(data, cuts)
    bound = _MAX_STEPS + 4 * len(chunks)  # every read gets a turn or two of its own

    ready = loop._ready  # noqa: SLF001 (the loop's queue of callbacks due now)

    async def pump() -> None:
        """Turn the loop and let the origins answer, until nothing moves (bounded)."""
        nonlocal steps
        while True:
            before = world.progress
            for origin in list(world.origins):
                origin.step(early, body)
            await asyncio.sleep(0)
            steps += 1
            if steps > bound:
                raise Finding(f"still busy after {bound} loop turns: a livelock")
            _check_sent(world)
            if world.progress == before and not ready:
                return

    await pump()  # prewarmed connections are made
    for piece in chunks:
        for wait in (0.0, 1.0, 5.0, 400.0):
            if not app.paused or app.closing:
                break
            loop.t += wait  # let a deadline free it (pool, header, request timeouts)
            await pump()
        if app.closing or app.paused:
            break  # closed, or still paused: a real transport would not read on
        largest = max(largest, len(piece))
        # After an upgrade the app's bytes belong to whoever owns the transport now.
        app.protocol.data_received(piece)
        if _held(proto) > _MAX_REPLAY + 2 * largest + 4096:
            raise Finding(f"the protocol holds {_held(proto)} bytes (reads of at most {largest})")
        await pump()
    await pump()
    # The input is spent: let every deadline pass (header, request, pool, idle), then the app
    # goes away, and everything must be released.
    for _ in range(3):
        loop.t += 400.0
        await pump()
    if not app.lost:
        app.close()
    await pump()
    for origin in world.origins:
        t = origin.transport
        if t is not None and not t.lost:
            t.close()
    await pump()
    return proto, clusters


def _check_sent(world: World) -> None:
    """A request the sidecar holds for wholly sent must be whole at the origin: otherwise the
    origin waits for the rest, and reads the next request on the connection as part of it."""
    for origin in world.origins:
        t = origin.transport
        conn = origin.conn
        if t is None or t.lost or origin.tunnel or origin.broken \
                or not isinstance(conn, UpstreamConnection):
            continue
        h = origin.h
        if conn.state is State.IDLE and (
                h.their_state not in (h11.IDLE, h11.DONE) or h.trailing_data[0]):
            cur = origin.current
            owner = cur.owner if cur is not None else None
            world.finding(
                f"a connection went back to the pool while the origin is still reading "
                f"{cur and cur.method!r} {cur and cur.target!r} ({h.their_state}): the next "
                f"request on it, from any app connection, would be read as part of that one",
                UPGRADE_BODY if owner is not None and owner.head.upgrade is not None else "")
            origin.broken = True
            continue
        ex = conn.user
        # Wholly sent: the exchange has the request's end and this connection's stream.
        if (ex is None or not getattr(ex, "request_done", False) or ex.stream is not conn
                or ex.head.method == b"CONNECT"):
            continue
        cur = origin.current
        if cur is None or cur.owner is not ex or not cur.complete:
            state = "nothing" if cur is None or cur.owner is not ex else (
                f"{cur.method!r} {cur.target!r} with {len(cur.body)} body bytes")
            world.finding(
                f"the sidecar holds request {ex.head.method!r} {ex.head.target!r} for wholly "
                f"sent, but the origin has {state} of it and waits for more "
                f"({origin.h.their_state}): its next bytes would be read as this request's",
                UPGRADE_BODY if ex.head.upgrade is not None else "")
            origin.broken = True


# === the reference and the comparison =========================================================
@dataclass
class Reference:
    requests: list[Req]
    error: str = ""  # h11's refusal, if it refused the app's bytes
    refused: bytes = b""  # the bytes from the start of the request h11 refused
    stopped: str = ""  # why h11 stopped otherwise (need data, close, tunnel)


def _lenient_chunk_header() -> Any:
    """h11's chunk-size pattern taking leading zeros. h11 refuses a chunk size of more than 20
    hex digits, leading zeros included; RFC 9112 (chunk-size = 1*HEXDIG) and llhttp do not. Not
    a disagreement that matters: the sidecar re-frames the body, so the origin only ever sees the
    size it computed. Used by the reference only (swapped in and out around it), and this fails
    loudly if h11 renames what it patches."""
    from h11 import _readers

    pattern = _readers.chunk_header_re.pattern
    wanted = rb"(?P<chunk_size>([0-9A-Fa-f]){1,20})"
    if wanted not in pattern:
        raise RuntimeError(f"h11's chunk header pattern changed: {pattern!r}")
    return re.compile(pattern.replace(wanted, rb"0*" + wanted))


_H11_CHUNK_HEADER = _lenient_chunk_header()


def reference(data: bytes) -> Reference:
    """What h11, as the server, makes of the app's bytes, answering each request so that the
    next pipelined one is read. Each request is read by a fresh h11 connection on the bytes
    the previous one left, for two differences that are not disagreements: empty lines before
    a request line are skipped (RFC 9112 2.2 says a server SHOULD; llhttp does, h11 does not),
    and an HTTP/1.0 request that asked for keep-alive is followed by more requests (h11 does
    not do 1.0 keep-alive; RFC 9112 9.3 allows it, and the sidecar does it)."""
    from h11 import _readers

    strict = _readers.chunk_header_re
    _readers.chunk_header_re = _H11_CHUNK_HEADER
    try:
        return _reference(data)
    finally:
        _readers.chunk_header_re = strict


def _reference(data: bytes) -> Reference:
    ref = Reference([])
    rest = data
    for _ in range(len(data) + 1):
        rest = rest.lstrip(b"\r\n")
        if not rest:
            ref.stopped = ref.stopped or "need data"
            return ref
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=_H11_MAX)
        h.receive_data(rest)
        if not _reference_one(h, ref):
            ref.refused = rest if ref.error else b""
            with_host = _host_from_target(rest) if ref.error.startswith("Missing mandatory Host") \
                else None
            if with_host is None:
                return ref
            ref.error = ""
            h = h11.Connection(h11.SERVER, max_incomplete_event_size=_H11_MAX)
            h.receive_data(with_host)
            if not _reference_one(h, ref):
                return ref
        rest = h.trailing_data[0]
    return ref


_ABSOLUTE_LINE = re.compile(
    rb"(?:[!-~]+ http://([^/?# \r\n]+)[^ \r\n]*|CONNECT ([^ \r\n]+)) HTTP/1\.1\r?\n",
    re.IGNORECASE)


def _host_from_target(data: bytes) -> bytes | None:
    """`data` with a Host field made from its target's authority, if it has one (absolute-form
    or CONNECT). h11 refuses such an HTTP/1.1 request without Host (RFC 9112 3.2 says a server
    MUST); the sidecar takes the target's authority, which a proxy must prefer to Host anyway
    (3.2.2), so nothing is ambiguous and this is not a disagreement that matters."""
    match = _ABSOLUTE_LINE.match(data)
    if match is None:
        return None
    authority = (match.group(1) or match.group(2)).rpartition(b"@")[2]
    end = match.end()
    return data[:end] + b"Host: " + authority + b"\r\n" + data[end:]


def _reference_one(h: h11.Connection, ref: Reference) -> bool:
    """Read one request; True when another may follow on the same connection."""
    cur: Req | None = None
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            ref.error = str(exc) or type(exc).__name__
            return False
        if event is h11.NEED_DATA:
            ref.stopped = "need data"
            return False
        if isinstance(event, h11.Request):
            cur = _req(event)
            ref.requests.append(cur)
        elif isinstance(event, h11.Data):
            assert cur is not None
            cur.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert cur is not None
            cur.complete = True
            cur.trailers = [(bytes(n), bytes(v)) for n, v in event.headers]
            if cur.method == b"CONNECT":
                h.send(h11.Response(status_code=200, headers=[]))
                cur.tunnel = h.trailing_data[0]
                ref.stopped = "tunnel"
                return False
            h.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            h.send(h11.EndOfMessage())
            if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                tokens = {t.strip().lower() for n, v in cur.headers if n == b"connection"
                          for t in v.split(b",")}
                if cur.version == b"1.0" and b"keep-alive" in tokens:
                    return True
                ref.stopped = "close"
                return False
            return True
        else:
            ref.stopped = str(event)
            return False


# Names the sidecar reads or strips in a request head. A name with underscores whose `-`
# spelling is one of these (`Transfer_Encoding`) is dropped on purpose (docs/http.md: an origin
# that maps `_` to `-` must never see a second framing field); any other is forwarded.
_LOOKALIKE_OF = HOP_BY_HOP | _CONTROL | frozenset({
    b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect",
    b"idempotency-key", b"http2-settings",
})


def _read_in_head(name: bytes) -> bool:
    """A field the sidecar reads or strips in a head, or an underscore lookalike of one."""
    return name in _LOOKALIKE_OF or (
        b"_" in name and name.replace(b"_", b"-") in _LOOKALIKE_OF
    )


def _forwarded_trailers(trailers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Trailer fields a proxy forwards: what it reads or strips in a head (framing,
    hop-by-hop, Host, its own) never travels in trailers either (RFC 9110 6.5.1)."""
    return [(n, v) for n, v in trailers if not _read_in_head(n)]


def _end_to_end(req: Req) -> list[tuple[bytes, bytes]]:
    """The fields a proxy forwards unchanged: not hop-by-hop, not named by Connection, not the
    Host (compared apart), not the sidecar's own control fields, and not an underscore
    lookalike of a field it reads (see _LOOKALIKE_OF)."""
    named: set[bytes] = set()
    for name, value in req.headers:
        if name == b"connection":
            named |= {t.strip().lower() for t in value.split(b",")}
    # HTTP2-Settings is connection-specific (RFC 9113 3.2.1) whether or not Connection names
    # it: the sidecar never forwards an h2c upgrade, so it never forwards this field either.
    drop = HOP_BY_HOP | _CONTROL | named | {b"http2-settings"}
    return [
        (n, v) for n, v in req.headers
        if n not in drop and not (b"_" in n and n.replace(b"_", b"-") in _LOOKALIKE_OF)
    ]


def _expected_target_and_host(ref: Req) -> tuple[bytes, bytes | None]:
    """The origin-form target and the Host the sidecar must send for the app's request."""
    target = ref.target
    if ref.method == b"CONNECT" or target[:1] == b"/" or target == b"*":
        return target, ref.header(b"host") or None  # empty: no authority, like none at all
    # By hand, not urlsplit (which refuses some hosts the sidecar's parser takes): scheme://
    # authority, then the path and query up to any fragment.
    rest = target.partition(b"://")[2]
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        at = rest.find(stop)
        if 0 <= at < end:
            end = at
    authority, remainder = rest[:end].rpartition(b"@")[2], rest[end:].partition(b"#")[0]
    path, _, query = remainder.partition(b"?")
    origin_form = (path or b"/") + (b"?" + query if query else b"")
    if authority.startswith(b"["):
        host, _, port = authority.partition(b"]")
        host, port = host + b"]", port[1:]
    else:
        host, _, port = authority.partition(b":")
    if port.isdigit():
        host += b":%d" % int(port)
    return origin_form, host


def compare(data: bytes, world: World) -> None:
    """The differential check: each request an origin received is the app's, per h11.

    Request k of the app is the k-th head the sidecar's parser reported; the exchange that sent
    an upstream request carries that head. Compared: the method; the target, the app's
    absolute-form made origin-form (path and query; the fragment is not sent); the Host (the
    absolute-form authority, else the app's Host; a request without one, or with an empty one
    (RFC 9112 3.2: the target has no authority), may get the cluster's name, as it does on a
    listener with a fixed cluster); the end-to-end fields in order (`_end_to_end`, by h11's
    normalisation: names lowercased, values stripped); the body bytes; and the trailers. The
    framing fields the sidecar writes itself (Content-Length / Transfer-Encoding),
    `Connection`/`Upgrade` and `x-sidecar-deadline-ms` are not compared: h11 reads the body
    by them, so a wrong one shows as a wrong body. A request cut short (the sidecar refused
    the rest of its body and reset the upstream connection) must agree as far as it went. A
    request the sidecar forwarded that h11 does not read is a finding too. tests/fuzz/README.md
    lists where the reference is adjusted for h11's own strictness."""
    ref = reference(data)
    index = {id(head): k for k, head in enumerate(world.heads)}
    for origin in world.origins:
        if origin.raw:
            # A CONNECT tunnel: the sidecar's last request; its bytes are what followed it.
            k = len(world.heads) - 1
            if k >= len(ref.requests) or ref.requests[k].method != b"CONNECT":
                raise Finding(f"a tunnel carried {origin.raw[:80]!r}, but h11 reads no CONNECT "
                              f"as request {k} (h11: {ref.error or ref.stopped})",
                              _line_spaces(ref, k))
            if not ref.requests[k].tunnel.startswith(origin.raw):
                raise Finding(f"tunnel bytes differ: h11 {ref.requests[k].tunnel[:80]!r}, "
                              f"origin {origin.raw[:80]!r}")
        for up in origin.requests:
            ex = up.owner
            k = index.get(id(ex.head)) if ex is not None else None
            if k is None:
                raise Finding(f"an upstream request no app request accounts for: {up}")
            _framing(k, up)
            if k >= len(ref.requests):
                raise Finding(
                    f"the sidecar forwarded request {k} ({up.method!r} {up.target!r}) that h11 "
                    f"does not read in the app's bytes (h11: {ref.error or ref.stopped})",
                    _line_spaces(ref, k))
            _same(k, ref.requests[k], up, ref)


def _framing(k: int, up: Req) -> None:
    """A forwarded Content-Length fits a signed 64-bit integer (SPEC section 5): a longer one
    is read differently by different servers (h11 refuses more than 20 digits)."""
    length = up.header(b"content-length")
    if length is not None and length.isdigit() and int(length) > _INT64_MAX:
        raise Finding(f"request {k}: Content-Length {length!r} forwarded", CL_INT64)


def _line_spaces(ref: Reference, k: int) -> str:
    """LINE_SPACES when h11 stopped at or before request k, refusing a run of spaces in a
    request line (every request after that one is unreadable to h11 too)."""
    line = ref.refused.split(b"\n", 1)[0]
    refused = k >= len(ref.requests) and ref.error.startswith("illegal request line")
    return LINE_SPACES if refused and b"  " in line else ""


def _same(k: int, ref: Req, up: Req, reference: Reference) -> None:
    def fail(what: str, want: Any, got: Any) -> None:
        known = ""
        if what == "Host" and want is not None and want[:1] == b"[":
            known = IPV6
        elif what.startswith(("body", "completeness")) and up.header(b"upgrade") is not None:
            known = UPGRADE_BODY
        elif what == "trailers" and _forwarded_trailers(ref.trailers or []) and not up.trailers:
            known = TRAILERS
        raise Finding(f"request {k}: {what} differs: h11 reads {want!r} from the app, the "
                      f"origin got {got!r}", known)

    if up.method != ref.method:
        fail("method", ref.method, up.method)
    target, host = _expected_target_and_host(ref)
    if up.target != target:
        fail("target", target, up.target)
    up_hosts = [v for n, v in up.headers if n == b"host"]
    if len(up_hosts) != 1:
        fail("Host count", 1, up_hosts)
    if host is not None and up_hosts[0].lower() != host.lower():
        fail("Host", host, up_hosts[0])
    if _end_to_end(up) != _end_to_end(ref):
        fail("end-to-end fields", _end_to_end(ref), _end_to_end(up))
    if up.complete:
        if not ref.complete:
            fail("completeness (h11: " + (reference.error or reference.stopped) + ")",
                 "incomplete", "complete")
        if up.body != ref.body:
            fail("body", ref.body, up.body)
        if (up.trailers or []) != _forwarded_trailers(ref.trailers or []):
            fail("trailers", _forwarded_trailers(ref.trailers or []), up.trailers)
    elif ref.body[: len(up.body)] != up.body[: len(ref.body)]:
        fail("body so far", ref.body, up.body)
