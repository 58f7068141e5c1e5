"""The "app" container of the pod simulation (e2e/test_pod_simulation.py), run as its own process.

Like a real workload it knows only its environment: `TARGET_URL`, and the proxy variables the
chart renders (`HTTP_PROXY`, `NO_PROXY`...), which `requests` reads itself (trust_env). Worker
threads send requests back to back on keep-alive connections through the sidecar. On SIGTERM
the app shuts down the way real ones do: it keeps working (and calling out) for
`shutdown_seconds`, lets in-flight requests finish, then writes a JSON summary to `result_path`
and exits 0 if no request failed.

    python podsim_app.py <result_path> <workers> <shutdown_seconds>
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import requests


def main(result_path: str, workers: int, shutdown_seconds: float) -> int:
    target = os.environ["TARGET_URL"].rstrip("/")
    proxies = requests.utils.get_environ_proxies(target)
    stopping = threading.Event()
    lock = threading.Lock()
    summary: dict[str, Any] = {
        "pid": os.getpid(), "proxies": proxies, "ok": 0, "failed": 0, "after_sigterm": 0,
        "errors": [], "first_at": None, "sigterm_at": None, "last_at": None,
    }

    def on_sigterm(*_: object) -> None:
        summary["sigterm_at"] = time.time()
        stopping.set()

    signal.signal(signal.SIGTERM, on_sigterm)

    def worker(index: int) -> None:
        session = requests.Session()  # trust_env: the container's proxy variables
        n = 0
        while True:
            if stopping.is_set() and time.time() > summary["sigterm_at"] + shutdown_seconds:
                break
            path = f"/work/{index}/{n}"
            error = None
            try:
                response = session.get(target + path, timeout=10)
                if response.status_code != 200 or response.text != f"done {path}\n":
                    error = f"{path}: {response.status_code} {response.headers} {response.text!r}"
            except requests.RequestException as exc:
                error = f"{path}: {type(exc).__name__}: {exc}"
            with lock:
                now = time.time()
                summary["first_at"] = summary["first_at"] or now
                summary["last_at"] = now
                if error:
                    summary["failed"] += 1
                    summary["errors"].append(error)
                else:
                    summary["ok"] += 1
                    if stopping.is_set():
                        summary["after_sigterm"] += 1
            n += 1
        session.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    while not stopping.wait(0.05):
        pass
    for thread in threads:
        thread.join(shutdown_seconds + 15)
    summary["stuck_workers"] = sum(thread.is_alive() for thread in threads)
    with open(result_path, "w") as f:
        json.dump(summary, f)
    return 0 if summary["failed"] == 0 and not summary["stuck_workers"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
