"""The Kubernetes API as discovery needs it: GET and watch, as plain JSON, over aiohttp.

Why not kubernetes-asyncio's generated client on the data-path process: importing any part of
`kubernetes_asyncio.client` runs its package `__init__`, which imports about 860 generated
modules (measured here: +40 MiB RSS and 0.3 s), and its watch turns every event into model
objects (about 6 ms for one slice of 100 endpoints, on the event loop). Discovery reads one
resource kind and four fields of it, so it reads the JSON.

What kubernetes-asyncio is still used for: parsing a kubeconfig (contexts, exec and OIDC
credential plugins, client certificates), imported lazily and only outside a pod. In a pod the
credentials are the service account's token and CA, read here, with the token re-read as soon
as the kubelet rotates it.

The watch protocol (client-go's reflector, kept small): a watch is a GET with `watch=true` whose
chunked body is one JSON event per line; an in-stream `ERROR` event carries a `Status` (410
Expired means the resourceVersion is compacted away), raised here as `ApiError`.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.clock import MONOTONIC

# A watch line is one object: a slice holds at most 1,000 endpoints (about 300 KB of JSON).
_MAX_LINE = 16 * 1024 * 1024

# client-go re-reads a service-account token file at least this often.
_TOKEN_REREAD_SECONDS = 60.0


class ApiError(Exception):
    """The API server answered with an error status (HTTP, or a watch's in-stream Status)."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}" if message else f"HTTP {status}")
        self.status = status
        self.reason = reason
        self.message = message


class BadResponse(Exception):
    """The API server's answer is not what the protocol promises."""


TokenSource = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True)
class ApiTarget:
    """Where the API server is and how to authenticate to it."""

    host: str  # "https://10.0.0.1:443"
    ssl: ssl.SSLContext | bool
    token: TokenSource  # the `Authorization` header's value, or None for none
    server_hostname: str | None = None  # TLS name to verify, when not the host's


class TokenFile:
    """A bearer token from a file, re-read when the file changes.

    The kubelet rotates a projected service-account token by swapping the volume's `..data`
    symlink, so one stat per request (no read) notices the new file at once and the next request
    uses it before the old token is revoked; the periodic re-read stays as a backstop."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._read_at = float("-inf")
        self._value: str | None = None

    async def __call__(self) -> str | None:
        return self.current()

    def current(self) -> str | None:
        try:
            st = os.stat(self._path)  # follows the ..data symlink
        except OSError:
            return self._value  # keep the token we have; a 401 will say if it is no good
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        now = MONOTONIC.now()
        if stamp == self._stamp and now - self._read_at < _TOKEN_REREAD_SECONDS:
            return self._value
        try:
            token = Path(self._path).read_text().strip()
        except OSError:
            return self._value
        if token:
            self._value = f"Bearer {token}"
            self._stamp, self._read_at = stamp, now
        return self._value


def in_cluster_target(
    environ: dict[str, str], token_path: str, ca_path: str
) -> ApiTarget:
    """The in-cluster API server: `KUBERNETES_SERVICE_HOST`/`_PORT`, the service account's
    token and CA (what client-go's `rest.InClusterConfig` reads)."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise RuntimeError("not in a pod: KUBERNETES_SERVICE_HOST/_PORT are not set")
    if not Path(token_path).is_file():
        raise RuntimeError(f"service account token {token_path} does not exist")
    if not Path(ca_path).is_file():
        raise RuntimeError(f"service account CA {ca_path} does not exist")
    if ":" in host:
        host = f"[{host}]"
    context = ssl.create_default_context(cafile=ca_path)
    tokens = TokenFile(token_path)
    if tokens.current() is None:
        raise RuntimeError(f"service account token {token_path} is empty")
    return ApiTarget(f"https://{host}:{port}", context, tokens)


async def kubeconfig_target(files: str, context: str | None) -> ApiTarget:
    """A kubeconfig's current (or named) context, parsed by kubernetes-asyncio, which knows
    every credential kind (tokens, client certificates, exec and OIDC plugins). Imported here,
    lazily: only a sidecar running outside a pod pays for it."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=files,
        context=context,
        client_configuration=configuration,
        persist_config=False,  # never write back to the user's kubeconfig
    )
    verify: ssl.SSLContext | bool
    if configuration.verify_ssl:
        verify = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file:
            verify.load_cert_chain(configuration.cert_file, keyfile=configuration.key_file)
    else:
        verify = False

    async def token() -> str | None:
        if "BearerToken" not in configuration.api_key:
            return None
        value = await configuration.get_api_key_with_prefix("BearerToken")
        return str(value) if value else None

    return ApiTarget(
        str(configuration.host or "").rstrip("/"), verify, token,
        configuration.tls_server_name or None,
    )


class KubeApi:
    """One HTTP session to the API server; whoever builds it closes it (`close`)."""

    def __init__(self, target: ApiTarget) -> None:
        self.target = target
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Headers only: the JSON is parsed here, lines split here (see `watch`).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.target.ssl, limit=4),
                auto_decompress=True,
            )
        return self._session

    async def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = await self.target.token()
        if token:
            headers["Authorization"] = token
        return headers

    async def _request(
        self, path: str, params: dict[str, str], limits: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        kwargs: dict[str, Any] = {}
        if self.target.server_hostname:
            kwargs["server_hostname"] = self.target.server_hostname
        response = await self._client().get(
            self.target.host + path,
            params=params,
            headers=await self._headers(),
            timeout=limits,
            **kwargs,
        )
        if response.status >= 400:
            try:
                body = await response.read()
            finally:
                response.release()
            raise _status_error(response.status, response.reason or "", body)
        return response

    async def get_json(
        self, path: str, params: dict[str, str], *, connect_timeout: float, total: float
    ) -> dict[str, Any]:
        """GET `path` and return its JSON object."""
        response = await self._request(
            path, params, aiohttp.ClientTimeout(total=total, connect=connect_timeout)
        )
        try:
            body = await response.read()
        finally:
            response.release()
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise BadResponse(f"not JSON: {body[:200]!r}") from exc
        if not isinstance(value, dict):
            raise BadResponse(f"not a JSON object: {body[:200]!r}")
        return value

    async def watch(
        self,
        path: str,
        params: dict[str, str],
        *,
        connect_timeout: float,
        open_timeout: float,
        read_timeout: float,
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch stream, until the server ends it. `open_timeout` bounds the
        wait for the response's head (a healthy server sends it at once); `read_timeout` bounds
        each silence of the body (the server's `timeoutSeconds` plus a margin)."""
        limits = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        response = await asyncio.wait_for(
            self._request(path, {**params, "watch": "true"}, limits), open_timeout
        )
        try:
            pending = bytearray()
            async for chunk in response.content.iter_any():
                pending += chunk
                start = 0
                while True:
                    end = pending.find(b"\n", start)
                    if end < 0:
                        break
                    line = bytes(pending[start:end])
                    start = end + 1
                    if line.strip():
                        yield _event(line)
                del pending[:start]
                if len(pending) > _MAX_LINE:
                    raise BadResponse(f"a watch event over {_MAX_LINE} bytes")
            if pending.strip():
                yield _event(bytes(pending))
        finally:
            response.release()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


ApiFactory = Callable[[], Awaitable[KubeApi]]


def _event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise BadResponse(f"not a watch event: {line[:200]!r}") from exc
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise BadResponse(f"not a watch event: {line[:200]!r}")
    if event.get("type") == "ERROR":
        status = event["object"]
        code = status.get("code")
        raise ApiError(
            int(code) if isinstance(code, int) else 500,
            str(status.get("reason") or ""),
            str(status.get("message") or ""),
        )
    return event


def _status_error(status: int, reason: str, body: bytes) -> ApiError:
    message = ""
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            message = str(parsed.get("message") or "")
            reason = str(parsed.get("reason") or reason)
    except ValueError:
        message = body[:200].decode("utf-8", "replace")
    return ApiError(status, reason, message)
