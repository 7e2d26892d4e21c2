"""Audit jobs behind the admin API: a queue in the server, one audit process at a time.

Policy (documented in docs/api.md): one audit runs at a time on the audit device; up to
``ERC_AUDIT_MAX_QUEUED`` more wait in order; beyond that a new request gets 409. Audits run in a
child process (see :mod:`service.audit.worker`), so they survive client disconnects, cannot crash
the server and run at a lower CPU priority than prediction traffic. Ids are 128-bit random
(unguessable). Cancelling a queued audit drops it; cancelling a running one terminates its
process (results are written atomically, so nothing half-written remains).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service import metrics
from service.errors import Conflict
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Audit:
    id: str
    model: str
    job: dict[str, Any]
    status: str = "queued"  # queued -> running (-> cancelling) -> done | failed | cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    paths: dict[str, str] = field(default_factory=dict)
    cancel_requested: bool = False

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "status": self.status,
            "created": _iso(self.created),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "request": self.job["request"],
            "estimated_work": self.job["work"],
        }
        if self.status in ("running", "cancelling"):
            out["progress"] = self.progress or {
                "fraction": 0.0,
                "elapsed_s": round(time.time() - (self.started or time.time()), 1),
                "remaining_s": None,
                "stage": "starting the audit process",
            }
        elif self.status == "done":
            out["progress"] = {
                "fraction": 1.0,
                "elapsed_s": round((self.finished or 0) - (self.started or 0), 1),
                "remaining_s": 0.0,
                "stage": "done",
            }
        if self.error:
            out["error"] = self.error
        out["links"] = {"self": f"/admin/audits/{self.id}", "report": f"/admin/audits/{self.id}/report"}
        return out

    def result(self) -> dict[str, Any] | None:
        if self.status != "done":
            return None
        return json.loads(Path(self.paths["json"]).read_text())


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class AuditManager:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.audits: OrderedDict[str, Audit] = OrderedDict()
        self.queue: deque[Audit] = deque()
        self.running: Audit | None = None
        self._process: Any = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._supervise, name="audit-supervisor", daemon=True)
        self.out_dir = Path(settings.audit_dir)
        self.ctx = multiprocessing.get_context("spawn")

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for audit in self.queue:
                self._finish(audit, "cancelled", "server shutting down")
            self.queue.clear()
            self._cond.notify_all()
        self._terminate()
        self._thread.join(timeout)

    # -- requests ------------------------------------------------------------------------------------
    def new_id(self) -> str:
        return secrets.token_hex(16)

    def submit(self, audit: Audit) -> Audit:
        with self._cond:
            waiting = len(self.queue)
            if self.running is not None and waiting >= self.settings.audit_max_queued:
                raise Conflict(
                    f"audit {self.running.id} is running and {waiting} wait behind it (limit "
                    f"{self.settings.audit_max_queued}); retry when one finishes"
                )
            self.audits[audit.id] = audit
            self.queue.append(audit)
            self._trim()
            self._cond.notify_all()
        return audit

    def get(self, audit_id: str) -> Audit | None:
        return self.audits.get(audit_id)

    def cancel(self, audit_id: str) -> Audit | None:
        with self._cond:
            audit = self.audits.get(audit_id)
            if audit is None:
                return None
            if audit.status == "queued":
                self.queue.remove(audit)
                self._finish(audit, "cancelled", "cancelled before it started")
            elif audit.status in ("running", "cancelling"):
                audit.cancel_requested = True
                audit.status = "cancelling"  # "cancelled" once its process has ended
                self._terminate()
            else:
                raise Conflict(f"audit {audit_id} already ended ({audit.status})")
        return audit

    def list(self) -> list[dict[str, Any]]:
        return [a.summary() for a in reversed(self.audits.values())]

    # -- supervisor thread ------------------------------------------------------------------------------
    def _trim(self) -> None:
        finished = [k for k, a in self.audits.items() if a.status in ("done", "failed", "cancelled")]
        for k in finished[: max(0, len(finished) - self.settings.audit_keep)]:
            del self.audits[k]

    def _terminate(self) -> None:
        proc = self._process
        if proc is not None and proc.is_alive():
            proc.terminate()

    def _finish(self, audit: Audit, status: str, error: str | None = None) -> None:
        audit.status, audit.error, audit.finished = status, error, time.time()
        metrics.AUDITS.labels(status=status).inc()
        log.info("audit %s of %s: %s%s", audit.id, audit.model, status, f" ({error})" if error else "")

    def _supervise(self) -> None:
        while True:
            with self._cond:
                while not self.queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                audit = self.queue.popleft()
                self.running = audit
                audit.status, audit.started = "running", time.time()
            try:
                self._run(audit)
            except Exception as exc:  # the supervisor must survive any single audit
                log.exception("audit %s crashed the supervisor step", audit.id)
                self._finish(audit, "failed", f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self.running = None
                    self._process = None

    def _run(self, audit: Audit) -> None:
        parent, child = self.ctx.Pipe(duplex=False)
        from service.audit import worker

        proc = self.ctx.Process(
            target=worker.main, args=(audit.job, child), name=f"audit-{audit.id[:8]}", daemon=True
        )
        with self._cond:
            self._process = proc
        proc.start()
        child.close()
        outcome: tuple[Any, ...] | None = None
        while True:
            if parent.poll(0.2):
                try:
                    msg = parent.recv()
                except EOFError:
                    break
                if msg[0] == "progress":
                    audit.progress = msg[1]
                else:
                    outcome = msg
                    break
            elif not proc.is_alive():
                break
        proc.join(10)
        if audit.cancel_requested:
            self._finish(audit, "cancelled", "cancelled while running")
        elif outcome is not None and outcome[0] == "done":
            audit.paths = outcome[1]
            self._finish(audit, "done")
            self._export_metrics(audit)
        elif outcome is not None:
            log.error("audit %s failed: %s\n%s", audit.id, outcome[1], outcome[2] if len(outcome) > 2 else "")
            self._finish(audit, "failed", outcome[1])
        else:
            self._finish(audit, "failed", f"audit process ended without a result (exit code {proc.exitcode})")

    def _export_metrics(self, audit: Audit) -> None:
        result = audit.result()
        if result is None:
            return
        model = audit.model
        metrics.AUDIT_CLEAN_ACCURACY.labels(model=model).set(result["clean"]["accuracy"])
        metrics.AUDIT_DURATION.labels(model=model).set(result["timings_s"]["total"])
        metrics.AUDIT_TIMESTAMP.labels(model=model).set(audit.finished or time.time())
        for row in result["per_eps"]:
            eps = f"{row['eps']:g}"
            metrics.AUDIT_ROBUST_ACCURACY.labels(model=model, eps=eps, attack="union").set(
                row["union"]["accuracy"]
            )
            for label, fig in row["attacks"].items():
                metrics.AUDIT_ROBUST_ACCURACY.labels(model=model, eps=eps, attack=label).set(fig["accuracy"])


def default_threads() -> int:
    """Half the cores for the audit process (at least one): prediction traffic keeps the rest."""
    return max(1, (os.cpu_count() or 2) // 2)
