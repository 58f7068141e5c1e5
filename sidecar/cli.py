"""The command line: `sidecar run | check | drain | config-dump | wait-ready | inject | webhook`
(SPEC sections 2 and 12)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from sidecar import __version__

if TYPE_CHECKING:
    from sidecar.inject.pod import Settings

DEFAULT_ADMIN = "http://127.0.0.1:15000"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="The connection sidecar.")
    p.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", help="config file (default: $SIDECAR_CONFIG, else embedded)")
    run.add_argument("--log-format", choices=("json", "text"), default="json")
    run.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                     help=argparse.SUPPRESS)
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("--config", required=True)
    drain = sub.add_parser("drain", help="drain the local sidecar and wait (preStop hook)")
    drain.add_argument("--admin", default=DEFAULT_ADMIN)
    drain.add_argument("--timeout", type=float, default=25.0)
    dump = sub.add_parser("config-dump", help="print the running config (secrets redacted)")
    dump.add_argument("--admin", default=DEFAULT_ADMIN)
    wait = sub.add_parser("wait-ready", help="wait until the sidecar is ready (postStart hook)")
    wait.add_argument("--url", default="http://127.0.0.1:15020/readyz")
    wait.add_argument("--timeout", type=float, default=30.0)
    inject = sub.add_parser(
        "inject", help="add the sidecar to the pod templates of Kubernetes YAML (stdin -> stdout)"
    )
    inject.add_argument("-f", "--filename", default="-", help="a YAML file (default: stdin)")
    _injection_args(inject)
    webhook = sub.add_parser("webhook", help="run the mutating admission webhook (HTTPS)")
    webhook.add_argument("--cert", required=True, help="serving certificate (PEM)")
    webhook.add_argument("--key", required=True, help="its private key (PEM)")
    webhook.add_argument("--address", default="0.0.0.0:8443")
    webhook.add_argument("--shutdown-delay", type=float, default=5.0,
                         help="seconds to keep answering after SIGTERM (readyz 503)")
    webhook.add_argument("--log-format", choices=("json", "text"), default="json")
    webhook.add_argument("--cert-check-every", type=float, default=30.0, help=argparse.SUPPRESS)
    _injection_args(webhook)
    return p


def _injection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-map", help="the sidecar's config ConfigMap (default: embedded "
                   "config); a pod's connection-sidecar.io/config annotation wins")
    p.add_argument("--image", help="the sidecar image (default: the chart's)")
    p.add_argument("--classic", action="store_true",
                   help="a classic first container, not a native sidecar (Kubernetes < 1.29)")
    p.add_argument("--values", help="a values file of the Helm chart: image, nativeSidecar, "
                   "resources, probes, securityContext, tmpSizeLimit, extraEnv")


def _http(method: str, url: str, timeout: float) -> tuple[int, bytes]:
    # Imported here: `sidecar run` never needs an HTTP client (nor http.client, email, ...).
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback URL)
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _admin_ok(command: str, method: str, admin: str, path: str, timeout: float) -> bytes | None:
    """The body of the admin server's 200 answer; else None, having said why on stderr as
    `sidecar <command>: ...`."""
    try:
        status, body = _http(method, f"{admin}{path}", timeout)
    except OSError as exc:
        print(f"sidecar {command}: cannot reach {admin}: {exc}", file=sys.stderr)
        return None
    if status != 200:
        print(f"sidecar {command}: {status} {body.decode(errors='replace')}", file=sys.stderr)
        return None
    return body


def cmd_check(path: str) -> int:
    from sidecar import config

    try:
        cfg = config.load_config(path)
    except config.ConfigError as exc:
        print(exc.format(), file=sys.stderr)
        return 2
    print(config.summary(cfg, path))
    for warning in config.config_warnings(cfg):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    return 0


DRAIN_POLL = 0.2  # seconds between GET /drain polls
DRAIN_PROGRESS_EVERY = 1.0  # a progress line at least this often, and on every change
DRAIN_SETTLE = 2.0  # past --timeout, still wait for a sidecar whose own grace ends this soon


def _drain_line(info: dict[str, object]) -> str:
    fields = ("state", "inflight", "connections", "elapsed", "aborted")
    return json.dumps({k: info[k] for k in fields if k in info})


def cmd_drain(admin: str, timeout: float) -> int:
    """The preStop hook: POST /drain, then poll GET /drain and print progress (one JSON line
    per change, at least one a second) until the sidecar reports `drained` or is gone (it exits
    once drained): 0. Not drained within `timeout`: 1.

    The chart gives `--timeout` the pod's grace period minus 5 s, and `drain.grace: auto` gives
    the sidecar the same deadline, counted from a moment later (when our POST arrives): when
    `timeout` passes while the sidecar says its own deadline is at most DRAIN_SETTLE seconds
    away, we wait for it instead of failing a hook that is about to succeed."""
    deadline = time.monotonic() + timeout
    if _admin_ok("drain", "POST", admin, "/drain", max(0.5, min(5.0, timeout))) is None:
        return 1
    last_key: tuple[object, ...] | None = None
    last_print = 0.0
    settle_until: float | None = None
    while True:
        now = time.monotonic()
        try:
            status, body = _http("GET", f"{admin}/drain", 2.0)
        except OSError as exc:
            if isinstance(getattr(exc, "reason", exc), ConnectionError):
                print("sidecar drain: the sidecar has exited (drained)", flush=True)
                return 0  # refused or reset: the sidecar exits once drained
            body = b"{}"  # slow to answer (a busy loop): not a reason to give up early
        try:
            info = json.loads(body)
        except ValueError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        key = (info.get("state"), info.get("inflight"), info.get("connections"))
        if info and (key != last_key or now - last_print >= DRAIN_PROGRESS_EVERY):
            print(_drain_line(info), flush=True)
            last_key, last_print = key, now
        if info.get("state") == "drained":
            return 0
        if now >= deadline:
            if settle_until is None:
                left = _sidecar_left(info)
                if left is None or left > DRAIN_SETTLE:
                    break
                settle_until = now + left + 1.0  # its deadline, and a second to answer
            if now >= settle_until:
                break
        time.sleep(DRAIN_POLL)
    print(f"sidecar drain: not drained within {timeout:g}s", file=sys.stderr)
    return 1


def _sidecar_left(info: dict[str, object]) -> float | None:
    """Seconds until the sidecar's own drain deadline, from its GET /drain answer."""
    grace, elapsed = info.get("grace"), info.get("elapsed")
    if isinstance(grace, int | float) and isinstance(elapsed, int | float):
        return max(0.0, float(grace) - float(elapsed))
    return None


def cmd_config_dump(admin: str) -> int:
    body = _admin_ok("config-dump", "GET", admin, "/config", 5.0)
    if body is None:
        return 1
    print(json.dumps(json.loads(body), indent=2, sort_keys=False))
    return 0


def cmd_wait_ready(url: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _ = _http("GET", url, 1.0)
            if status == 200:
                return 0
        except OSError:
            pass
        time.sleep(0.1)
    print(f"sidecar wait-ready: {url} not ready within {timeout:g}s", file=sys.stderr)
    return 1


def cmd_run(config_path: str | None, log_format: str, loop: str) -> int:
    from sidecar import config, log

    log.setup(log_format)
    path = config_path or os.environ.get("SIDECAR_CONFIG") or None
    try:
        cfg = config.load_config(path) if path else config.default_config()
    except config.ConfigError as exc:
        print(exc.format(), file=sys.stderr)
        return 2
    from sidecar.app import App

    app = App(cfg, path)
    try:
        if loop == "uvloop":
            import uvloop

            return uvloop.run(app.run())
        import asyncio

        return asyncio.run(app.run())
    except OSError as exc:  # a port in use, a bind refused
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a listener refused (non-loopback without allow_remote)
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    finally:  # the loop is gone (and its handlers): the kubelet's SIGTERM must not make 0 -> 143
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _injection_settings(args: argparse.Namespace) -> Settings:
    """Settings from --values and the flags; raises ValueError (a bad values file)."""
    from sidecar.inject.pod import Settings

    values: Any = {}
    if args.values:
        import yaml

        with open(args.values) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.values}: not a mapping of chart values")
    settings = Settings.from_values(values) if values else Settings()
    return settings.with_overrides(args.image, args.classic, args.config_map)


def cmd_inject(args: argparse.Namespace) -> int:
    from sidecar.inject import manifests

    name = "<stdin>" if args.filename == "-" else args.filename
    try:
        settings = _injection_settings(args)
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as f:
                text = f.read()
    except (OSError, ValueError) as exc:
        print(f"sidecar inject: {exc}", file=sys.stderr)
        return 2

    def report(r: manifests.Report) -> None:
        print(f"sidecar inject: {name}: {r.where}: {r.result} ({r.reason})", file=sys.stderr)

    try:
        out = manifests.inject_text(text, settings, report)
    except manifests.InputError as exc:
        print(f"{name}:{exc.line}: {exc.message}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    sys.stdout.flush()
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    from sidecar import log

    log.setup(args.log_format)
    host, _, port = args.address.rpartition(":")
    try:
        settings = _injection_settings(args)
        port_number = int(port)
    except (OSError, ValueError) as exc:
        print(f"sidecar webhook: {exc}", file=sys.stderr)
        return 2
    import asyncio

    from sidecar.inject import webhook

    try:
        return asyncio.run(webhook.serve(
            settings, args.cert, args.key, host.strip("[]") or "0.0.0.0", port_number,
            args.shutdown_delay, args.cert_check_every,
        ))  # fmt: skip
    except OSError as exc:  # a port in use, unreadable cert files
        print(f"sidecar webhook: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args.config)
    if args.command == "drain":
        return cmd_drain(args.admin.rstrip("/"), args.timeout)
    if args.command == "config-dump":
        return cmd_config_dump(args.admin.rstrip("/"))
    if args.command == "wait-ready":
        return cmd_wait_ready(args.url, args.timeout)
    if args.command == "inject":
        return cmd_inject(args)
    if args.command == "webhook":
        return cmd_webhook(args)
    return cmd_run(args.config, args.log_format, args.loop)
