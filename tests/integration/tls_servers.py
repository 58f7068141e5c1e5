"""TLS upstreams on 127.0.0.1 for integration tests: a trustme PKI, an aiohttp server and nginx."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

SERVER_NAMES = ("upstream.test", "alt.test", "localhost", "127.0.0.1")
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


# --- certificates ------------------------------------------------------------------------------
@dataclass
class CertFiles:
    cert: Path
    key: Path


@dataclass
class Pki:
    """A trustme CA with its PEM on disk, and a server certificate for `SERVER_NAMES`."""

    dir: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server = self.issue("server", *SERVER_NAMES)

    def issue(
        self,
        name: str,
        *identities: str,
        common_name: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        into: Path | None = None,
    ) -> CertFiles:
        """Issue a leaf (server or client: trustme sets both EKUs) and write cert + key files."""
        leaf = self.ca.issue_cert(
            *(identities or (name,)),
            common_name=common_name or name,
            not_before=not_before,
            not_after=not_after,
        )
        where = into or self.dir
        where.mkdir(parents=True, exist_ok=True)
        files = CertFiles(where / f"{name}.crt", where / f"{name}.key")
        leaf.cert_chain_pems[0].write_to_path(str(files.cert))
        leaf.private_key_pem.write_to_path(str(files.key))
        return files

    def self_signed(self, name: str = "selfsigned") -> CertFiles:
        """A self-signed certificate (another CA's own root), trusted by nobody."""
        other = trustme.CA()
        files = CertFiles(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        other.cert_pem.write_to_path(str(files.cert))
        other.private_key_pem.write_to_path(str(files.key))
        return files


def server_context(
    cert: CertFiles, *, version: str | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """A server context; `version` pins min and max to one TLS version; `client_ca` = mTLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert.cert), str(cert.key))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca))
    return ctx


class KubeSecretDir:
    """A directory laid out like a mounted Kubernetes secret: `tls.crt -> ..data/tls.crt`,
    `..data -> ..<timestamp>`; `update()` swaps `..data` atomically as the kubelet does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.generation = 0
        self.cert = root / "tls.crt"
        self.key = root / "tls.key"

    def update(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.generation += 1
        version = self.root / f"..{self.generation:04d}_version"
        version.mkdir()
        (version / "tls.crt").write_bytes(cert_pem)
        (version / "tls.key").write_bytes(key_pem)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")
        for name in ("tls.crt", "tls.key"):
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")


# --- an aiohttp upstream -----------------------------------------------------------------------
class AiohttpTlsUpstream:
    """aiohttp on 127.0.0.1 over TLS, `Connection: close` on every response.

    The upstream side of resumption: `reused` records `session_reused` per request as the server
    saw it. The body is JSON with the TLS version and the client certificate's common name.
    """

    def __init__(self, context: ssl.SSLContext, *, ports: int = 1) -> None:
        self.context = context
        self.nports = ports
        self.ports: list[int] = []
        self.reused: list[bool] = []
        self._runners: list[web.AppRunner] = []

    async def _handle(self, request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        sslobj = transport.get_extra_info("ssl_object")
        self.reused.append(bool(sslobj.session_reused))
        peer = sslobj.getpeercert() or {}
        cn = next((v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"), None)
        body = {"version": sslobj.version(), "reused": sslobj.session_reused, "client_cn": cn}
        response = web.Response(text=json.dumps(body), content_type="application/json")
        response.force_close()
        return response

    async def __aenter__(self) -> AiohttpTlsUpstream:
        for _ in range(self.nports):
            app = web.Application()
            app.router.add_get("/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            self._runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.context)
            await site.start()
            self.ports.append(runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()


# --- a blocking stdlib server: sends TLS alerts the way OpenSSL servers do --------------------
class ThreadedTlsUpstream:
    """A one-thread `ssl`-socket server with the aiohttp upstream's behaviour and body.

    Why a third server: asyncio's server side (aiohttp) drops the connection on a failed
    handshake without flushing OpenSSL's alert, and nginx answers client-certificate problems
    with HTTP 400; this one lets the client see the real alert (protocol version, certificate
    required) that a failed handshake with a typical upstream produces.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.reused: list[bool] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tls-upstream", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        self._answer(tls)
                except (OSError, ssl.SSLError) as exc:
                    self.errors.append(exc)

    def _answer(self, tls: ssl.SSLSocket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(4096)
            if not chunk:
                return
            head += chunk
        self.reused.append(tls.session_reused)
        peer = tls.getpeercert() or {}
        cn = next((v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"), None)
        body = json.dumps({"version": tls.version(), "reused": tls.session_reused, "client_cn": cn})
        tls.sendall(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        tls.unwrap()

    def __enter__(self) -> ThreadedTlsUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()


# --- nginx -------------------------------------------------------------------------------------
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


from tests.harness import free_port, require_tool  # noqa: E402  (outside the ephemeral range)

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {prefix}/tmp_body;
    proxy_temp_path {prefix}/tmp_proxy;
    fastcgi_temp_path {prefix}/tmp_fastcgi;
    uwsgi_temp_path {prefix}/tmp_uwsgi;
    scgi_temp_path {prefix}/tmp_scgi;
    log_format tls '$ssl_session_reused $ssl_protocol $server_port "$ssl_client_s_dn" $status';
    access_log {prefix}/access.log tls;
    keepalive_timeout 0;
    server {{
{listens}
        server_name {server_name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols {version};
        ssl_session_cache shared:SSL:1m;
        ssl_session_tickets on;
        ssl_session_timeout 10m;
{client_auth}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@dataclass
class NginxLogLine:
    reused: bool
    protocol: str
    port: int
    client_dn: str
    status: int


class NginxTlsUpstream:
    """nginx from apt as a foreground single process, session cache and tickets on.

    `$ssl_session_reused` lands in the access log: the upstream's own word on resumption.
    Stopped by its PID. `start()` can be called again after `stop()` (new ticket keys, new
    session cache, same ports): a server that forgot every session.
    """

    def __init__(
        self,
        workdir: Path,
        cert: CertFiles,
        *,
        version: str,
        ports: int = 1,
        client_ca: Path | None = None,
        server_name: str = "upstream.test",
    ) -> None:
        self.prefix = workdir
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.cert = cert
        self.version = version
        self.nports = ports
        self.client_ca = client_ca
        self.server_name = server_name
        self.ports: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def _write_conf(self) -> Path:
        client_auth = ""
        if self.client_ca is not None:
            client_auth = (
                f"        ssl_client_certificate {self.client_ca};\n        ssl_verify_client on;"
            )
        conf = _NGINX_CONF.format(
            prefix=self.prefix,
            listens="\n".join(f"        listen 127.0.0.1:{p} ssl;" for p in self.ports),
            server_name=self.server_name,
            cert=self.cert.cert,
            key=self.cert.key,
            version=self.version,
            client_auth=client_auth,
        )
        path = self.prefix / "nginx.conf"
        path.write_text(conf)
        return path

    def start(self, timeout: float = 10.0) -> NginxTlsUpstream:
        require_tool(NGINX, "apt-get install nginx-light")  # missing: the test fails
        for attempt in range(3):  # a free port can be taken by someone else before nginx binds
            if not self.ports or attempt:
                self.ports = [free_port() for _ in range(self.nports)]
            conf = self._write_conf()
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "err")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"nginx did not start: {self._errors()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                    pending.pop(0)
            except OSError:
                time.sleep(0.05)
        return not pending

    def _errors(self) -> str:
        out = []
        for name in ("err", "error.log"):
            path = self.prefix / name
            if path.exists():
                out.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> NginxTlsUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_lines(self) -> list[NginxLogLine]:
        if not self.access_log.exists():
            return []
        lines = []
        for raw in self.access_log.read_text().splitlines():
            reused, protocol, port, rest = raw.split(" ", 3)
            dn, status = rest.rsplit(" ", 1)
            lines.append(
                NginxLogLine(reused == "r", protocol, int(port), dn.strip('"'), int(status))
            )
        return lines

    def wait_log_lines(self, count: int, timeout: float = 5.0) -> list[NginxLogLine]:
        """The access log once it holds `count` lines (nginx writes each at request end)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines()
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)


def cn_of(dn: str) -> str | None:
    """The CN of an nginx `$ssl_client_s_dn` (RFC 2253: `CN=x,O=y`)."""
    for part in dn.split(","):
        key, _, value = part.partition("=")
        if key.strip() == "CN":
            return value
    return None


def summary(flags: Sequence[bool]) -> dict[str, Any]:
    return {"total": len(flags), "resumed": sum(flags)}
