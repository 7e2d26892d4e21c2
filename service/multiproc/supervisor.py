"""``erc serve`` with ``ERC_HTTP_PROCESSES`` = N > 1: one model process and N HTTP processes,
started, watched and restarted by this process (which imports neither torch nor the app).

- The HTTP processes (:mod:`service.multiproc.http_process`) each listen on the same host and port
  with ``SO_REUSEPORT``: the kernel spreads connections over them. This process holds a bound,
  non-listening socket on that port for its whole life, so the port stays this server's while an
  HTTP process restarts (and ``ERC_PORT=0`` picks one port for all of them).
- The model process (:mod:`service.multiproc.model_process`) loads the models and batches for all.
- Every child gets the resolved settings as ``ERC_*`` variables (flags included), the model
  process's socket and a shared ``PROMETHEUS_MULTIPROC_DIR``, so ``/metrics`` on any HTTP process
  adds up every process (:mod:`service.metrics`). Only the first HTTP process runs the embedded
  audit worker (``ERC_AUDIT_LOCAL_WORKER``), so audits do not run N at a time.
- A child that exits is restarted (after 1, 2, 4 ... up to 30 s when it keeps dying within 10 s of
  its start). While the model process is down the HTTP processes answer 503 and ``/readyz`` is 503.
- SIGTERM or SIGINT: the HTTP processes drain (``ERC_SHUTDOWN_GRACE_S``, then uvicorn's graceful
  stop: no accepted request is lost), then the model process stops; a second signal stops at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from pydantic import SecretStr

from service.settings import Settings

log = logging.getLogger("erc.supervisor")

RESTART_WINDOW_S = 10.0  # a child that dies sooner than this after its start restarts after a backoff
MAX_BACKOFF_S = 30.0


def listening_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket on ``host:port`` with SO_REUSEPORT (listening unless told)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the ``ERC_*`` variables that rebuild them in a child."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, (list, dict)):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"ERC_{name.upper()}"] = text
    return env


def child_settings(what: str) -> Settings:
    """In a child (``what``: "HTTP process", "model process"): logging tagged with its role, its
    settings from the variables the supervisor set, and a watch on the supervisor."""
    role = os.environ.get("ERC_PROCESS_ROLE", what.split()[0].lower())
    fmt = f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)
    settings = Settings()
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.model_process_socket is None:
        raise SystemExit(f"{what}: ERC_MODEL_PROCESS_SOCKET is not set (erc serve sets it)")
    exit_with_parent()
    return settings


def exit_with_parent() -> None:
    """In a child: stop (SIGTERM to itself) when the supervisor is gone, even when it was killed."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclass
class Child:
    role: str
    module: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    due: float = 0.0  # when to restart it (monotonic), after a backoff

    def start(self) -> None:
        env = {**self.env, "ERC_PROCESS_ROLE": self.role}
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=env, start_new_session=True)
        self.started = time.monotonic()
        log.info("%s started (pid %d)", self.role, self.proc.pid)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = Path(tempfile.mkdtemp(prefix="erc-serve-"))
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.stopping = 0  # signals received
        # Held for the server's life: keeps the port (and picks it when ERC_PORT=0).
        self.port_guard = listening_socket(settings.host, settings.port, listen=False)
        self.port = int(self.port_guard.getsockname()[1])
        env = {
            **os.environ,
            **settings_env(settings),
            "ERC_PORT": str(self.port),
            "ERC_MODEL_PROCESS_SOCKET": str(self.run_dir / "model.sock"),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        self.model = Child("model", "service.multiproc.model_process", env)
        self.http = []
        for i in range(settings.http_processes):
            http_env = dict(env)
            if i > 0:
                http_env["ERC_AUDIT_LOCAL_WORKER"] = "off"
            self.http.append(Child(f"http-{i + 1}", "service.multiproc.http_process", http_env))

    @property
    def children(self) -> list[Child]:
        return [self.model, *self.http]

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.stopping += 1
        if self.stopping == 1:
            log.info("signal %d: draining the HTTP processes, then stopping the model process", sig)
        for child in self.http:  # a second signal reaches them as a second signal: they stop at once
            child.signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "erc serve: %d HTTP processes on %s:%d and one model process (run dir %s)",
            len(self.http), self.settings.host, self.port, self.run_dir,
        )  # fmt: skip
        try:
            for child in self.children:
                child.start()
            while not self.stopping:
                self._watch()
                time.sleep(0.2)
            self._shutdown()
        finally:
            for child in self.children:
                if child.alive:
                    assert child.proc is not None
                    child.proc.kill()
            self.port_guard.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return 0

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.alive:
                continue
            if child.due == 0.0:
                code = child.proc.returncode
                _mark_dead(child.proc.pid)
                quick = now - child.started < RESTART_WINDOW_S
                child.quick_deaths = child.quick_deaths + 1 if quick else 0
                delay = min(MAX_BACKOFF_S, 2.0 ** (child.quick_deaths - 1)) if quick else 0.0
                log.error(
                    "%s (pid %d) exited with %s; restarting in %.0f s",
                    child.role,
                    child.proc.pid,
                    code,
                    delay,
                )
                child.due = now + delay
            if now >= child.due:
                child.due = 0.0
                child.restarts += 1
                child.start()

    def _shutdown(self) -> None:
        grace = self.settings.shutdown_grace_s + 30.0  # the drain, then uvicorn's graceful stop (15 s)
        for child in self.http:
            if not child.wait(grace):
                log.error("%s did not stop in %.0f s: killed", child.role, grace)
                assert child.proc is not None
                child.proc.kill()
        self.model.signal(signal.SIGTERM)
        if not self.model.wait(30.0):
            log.error("the model process did not stop in 30 s: killed")
            assert self.model.proc is not None
            self.model.proc.kill()
        log.info("erc serve: every process stopped")


def _mark_dead(pid: int) -> None:
    """Drop a dead process's live gauges from the shared metrics (its counters stay counted)."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
    except Exception as exc:  # metrics must never stop a restart
        log.warning("metrics of pid %d: %s", pid, exc)


def supervise(settings: Settings) -> int:
    try:
        supervisor = Supervisor(settings)
    except OSError as exc:
        raise SystemExit(f"erc serve: cannot listen on {settings.host}:{settings.port}: {exc}") from None
    return supervisor.run()
