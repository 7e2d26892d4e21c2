"""``erc serve`` and ``erc audit-worker`` as child processes: start one on a free loopback port,
wait until it is ready (the API's ``/readyz`` answers 200; a worker's metrics port answers, which it
opens once the job store is open), stop it with SIGTERM. Shared by the integration tests, the
benchmarks and ``erc stack``.

The child is this interpreter (``sys.executable -m service.cli``), so it imports ``service`` from
the same environment as its parent: an installed wheel, or the checkout's editable install. No
``PYTHONPATH`` is set: nothing is found relative to a checkout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """Status code of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    started_s: float  # from process start to /readyz 200: the cold start

    def client(self, **kw: Any) -> Any:
        """An ``httpx.Client`` on this server (httpx is a test dependency, imported here only)."""
        import httpx

        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM; True when the server shut down gracefully within ``timeout``.

        uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM
        (or 0); the log line "Application shutdown complete" tells a clean stop from a kill.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return False
        clean_exit = self.proc.returncode in (0, -signal.SIGTERM)
        return clean_exit and "Application shutdown complete" in self.log.read_text(errors="replace")


def _start(
    command: str,
    store: Path,
    log: Path,
    port: int,
    env: dict[str, str] | None,
    ready_url: str,
    timeout: float,
) -> ServerProcess:
    environ = {
        **os.environ,
        "ERC_MODEL_STORE": str(store),
        "ERC_HOST": "127.0.0.1",
        **(env or {}),
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", command],
        env=environ,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"erc {command} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if http_status(url + ready_url) == 200:
            return ServerProcess(url, proc, log, time.perf_counter() - t0)
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"erc {command} not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def start_server(
    store: Path, log: Path, *, env: dict[str, str] | None = None, timeout: float = 120.0
) -> ServerProcess:
    """Start ``python -m service.cli serve`` on the models of ``store``; ``env`` adds ERC_* settings."""
    port = free_port()
    return _start("serve", store, log, port, {"ERC_PORT": str(port), **(env or {})}, "/readyz", timeout)


def start_worker(
    store: Path, log: Path, *, env: dict[str, str] | None = None, timeout: float = 120.0
) -> ServerProcess:
    """Start ``python -m service.cli audit-worker`` (``env`` must name ``ERC_AUDIT_DB``); its ``url``
    is its Prometheus endpoint. ``stop()`` hands its running audit back to the queue."""
    port = free_port()
    env = {"ERC_AUDIT_WORKER_METRICS_PORT": str(port), **(env or {})}
    return _start("audit-worker", store, log, port, env, "/metrics", timeout)
