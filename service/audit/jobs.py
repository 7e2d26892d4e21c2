"""Audit jobs: the API's side (:class:`AuditManager`) and the workers that run them
(:class:`AuditWorker`), around the shared job store (:mod:`service.audit.store`).

Policy (documented in docs/api.md): each worker runs one audit at a time on its device, in a
spawned child process (:mod:`service.audit.worker`) at a lower CPU priority, so an audit survives
client disconnects, cannot crash the worker and never starves prediction traffic on the same host.
Audits wait in the store in order; up to ``ERC_AUDIT_MAX_QUEUED`` more than the idle workers take
at once, beyond that a new request gets 409. Ids are 128-bit random (unguessable).

Who runs audits: ``erc audit-worker`` processes (scaled out: the API replicas then never attack
anything), or, in the embedded mode (the default, with a SQLite store), one worker thread inside
the API process, exactly like a dedicated worker. A worker renews its lease every
``ERC_AUDIT_HEARTBEAT_S`` and learns there whether its audit was cancelled (then it kills the
child); one that dies is detected when its lease expires, and its audit runs again elsewhere.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import socket
import threading
import time
from typing import Any, Literal

from service import metrics
from service.audit.status import ACTIVE, JobStatus
from service.audit.store import Claimed, JobStore, StoreError
from service.errors import AuditStoreUnavailable, Conflict
from service.settings import Settings

log = logging.getLogger(__name__)


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# Why a worker stopped its child before the child ended by itself (not a job status: how the
# attempt ends in the store follows from it).
Ending = Literal["cancelled", "lost", "released"]


def summary(rec: dict[str, Any]) -> dict[str, Any]:
    """The public view of a store record (``GET /admin/audits/{id}`` without the result)."""
    status = rec["status"]
    out: dict[str, Any] = {
        "id": rec["id"],
        "model": rec["model"],
        "status": status,
        "created": _iso(rec["created"]),
        "started": _iso(rec["started"]),
        "finished": _iso(rec["finished"]),
        "request": rec["job"]["request"],
        "estimated_work": rec["job"]["work"],
        "attempts": rec["attempts"],
        "max_attempts": rec["max_attempts"],
    }
    if status in ACTIVE:
        out["worker"] = rec["worker"]
        out["progress"] = rec["progress"] or {
            "fraction": 0.0,
            "elapsed_s": None,
            "remaining_s": None,
            "stage": "starting the audit process",
        }
    elif status == JobStatus.DONE:
        out["progress"] = {
            "fraction": 1.0,
            "elapsed_s": round((rec["finished"] or 0) - (rec["started"] or 0), 1),
            "remaining_s": 0.0,
            "stage": "done",
        }
    if rec["history"]:
        out["history"] = rec["history"]
    if rec["error"]:
        out["error"] = rec["error"]
    out["links"] = {"self": f"/admin/audits/{rec['id']}", "report": f"/admin/audits/{rec['id']}/report"}
    return out


def default_threads() -> int:
    """Half the cores for the audit process (at least one): prediction traffic keeps the rest."""
    return max(1, (os.cpu_count() or 2) // 2)


def metric_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of a result the Prometheus gauges export (stored beside it)."""
    robust = []
    for row in result["per_eps"]:
        eps = f"{row['eps']:g}"
        robust.append({"eps": eps, "attack": "union", "accuracy": row["union"]["accuracy"]})
        robust += [{"eps": eps, "attack": k, "accuracy": v["accuracy"]} for k, v in row["attacks"].items()]
    return {
        "clean_accuracy": result["clean"]["accuracy"],
        "duration_s": result["timings_s"]["total"],
        "robust": robust,
    }


class AuditWorker:
    """Claims queued audits from the store and runs them, one at a time, each in a spawned child
    process; renews its lease while the child works; kills the child when the audit is cancelled
    or the lease is lost. ``run`` is its loop (a thread in the API's embedded mode, the main thread
    of ``erc audit-worker``)."""

    def __init__(self, store: JobStore, settings: Settings, *, poll_s: float = 1.0) -> None:
        self.store = store
        self.settings = settings
        self.poll_s = poll_s
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.ctx = multiprocessing.get_context("spawn")
        self.stop_event = threading.Event()
        self._child: Any = None

    def stop(self) -> None:
        self.stop_event.set()
        self._kill_child()

    def _kill_child(self) -> None:
        proc = self._child
        if proc is not None and proc.is_alive():
            proc.terminate()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        """Until :meth:`stop`: beat, reap lost workers' audits, claim and run the next one. A store
        that cannot be reached is retried (logged once per outage)."""
        registered, outage = False, False
        metrics.export_worker_gauges()
        while not self.stop_event.is_set():
            try:
                if not registered:
                    self.store.register_worker(self.id, self.settings.audit_device)
                    registered = True
                    log.info("audit worker %s: waiting for audits in %s", self.id, self.store.name)
                if not self.store.worker_beat(self.id, None):
                    registered = False  # dropped while the store was out of reach: register again
                    continue
                metrics.AUDIT_WORKER_HEARTBEAT.set(time.time())
                for audit_id, status in self.store.reap():
                    log.warning("audit %s: its worker was lost; now %s", audit_id, status)
                    if status != JobStatus.QUEUED:
                        metrics.AUDITS.labels(status=status).inc()
                claimed = self.store.claim(self.id)
                if outage:
                    log.info("audit worker %s: store %s reachable again", self.id, self.store.name)
                    outage = False
            except StoreError as exc:
                if not outage:
                    log.error("audit worker %s: %s; retrying", self.id, exc)
                    outage = True
                self.stop_event.wait(min(5.0, self.settings.audit_heartbeat_s))
                continue
            if claimed is None:
                self.stop_event.wait(self.poll_s)
                continue
            self._run_one(claimed)
        if registered:
            try:
                self.store.unregister_worker(self.id)
            except StoreError as exc:
                log.warning("audit worker %s: could not unregister: %s", self.id, exc)

    def _job(self, c: Claimed) -> dict[str, Any]:
        """The child's job: the stored request plus where and how this worker runs it."""
        s = self.settings
        return {
            **c.job,
            "id": c.id,
            "model_dir": str(s.model_store / c.job.get("entry", c.model)),
            "upload": c.upload,
            "device": s.audit_device,
            "threads": s.audit_threads or default_threads(),
            "niceness": s.audit_niceness,
            "sched_idle": s.audit_sched_idle,
        }

    def _run_one(self, c: Claimed) -> None:
        from service.audit import worker

        log.info("audit %s of %s: attempt %d on worker %s", c.id, c.model, c.attempt, self.id)
        metrics.AUDIT_WORKER_BUSY.set(1)
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=worker.main, args=(self._job(c), child), name=f"audit-{c.id[:8]}", daemon=True
        )
        self._child = proc
        proc.start()
        child.close()
        outcome: tuple[Any, ...] | None = None
        progress: dict[str, Any] | None = None
        ending: Ending | None = None  # why this worker stopped the child
        last_ok = time.monotonic()
        next_beat = time.monotonic() + self.settings.audit_heartbeat_s
        try:
            while outcome is None:
                if parent.poll(0.2):
                    try:
                        msg = parent.recv()
                    except EOFError:
                        break
                    if msg[0] == "progress":
                        progress = msg[1]
                    else:
                        outcome = msg
                elif not proc.is_alive():
                    break
                if self.stop_event.is_set() and ending is None:
                    ending = "released"
                    self._kill_child()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.settings.audit_heartbeat_s
                    try:
                        beat = self.store.heartbeat(c, progress)
                        last_ok = time.monotonic()
                        metrics.AUDIT_WORKER_HEARTBEAT.set(time.time())
                    except StoreError as exc:
                        log.warning("audit %s: heartbeat failed: %s", c.id, exc)
                        if time.monotonic() - last_ok > self.settings.audit_lease_s and ending is None:
                            # Our lease has expired by now: another worker may be running it.
                            ending = "lost"
                            self._kill_child()
                        continue
                    if not beat.held and ending is None:
                        ending = "lost"
                        self._kill_child()
                    elif beat.cancel and ending is None:
                        ending = "cancelled"
                        self._kill_child()
            if outcome is None:
                proc.join(10)  # its exit code says how it ended
            # Record before waiting for a finished child to exit: an interpreter with torch loaded
            # can take seconds to tear down, and no heartbeat renews the lease meanwhile.
            self._record(c, outcome, ending, proc.exitcode)
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        finally:
            self._child = None
            metrics.AUDIT_WORKER_BUSY.set(0)
            parent.close()

    def _record(
        self, c: Claimed, outcome: tuple[Any, ...] | None, ending: Ending | None, exitcode: Any
    ) -> None:
        """Write how the attempt ended (fenced by the lease; a store outage is retried for a lease's
        time, after which the lease is gone anyway and the audit is another worker's)."""
        deadline = time.monotonic() + self.settings.audit_lease_s
        while True:
            try:
                final = self._write(c, outcome, ending, exitcode)
                break
            except StoreError as exc:
                if time.monotonic() > deadline:
                    log.error("audit %s: result not recorded, store unreachable: %s", c.id, exc)
                    metrics.AUDIT_ATTEMPTS.labels(outcome="lease_lost").inc()
                    return
                time.sleep(1.0)
        if final is None:
            log.warning("audit %s: lease lost; attempt %d abandoned, nothing written", c.id, c.attempt)
            metrics.AUDIT_ATTEMPTS.labels(outcome="lease_lost").inc()
            return
        log.info("audit %s of %s: %s", c.id, c.model, final)
        metrics.AUDIT_ATTEMPTS.labels(outcome="released" if final == JobStatus.QUEUED else final).inc()
        if final != JobStatus.QUEUED:
            metrics.AUDITS.labels(status=final).inc()

    def _write(
        self, c: Claimed, outcome: tuple[Any, ...] | None, ending: Ending | None, exitcode: Any
    ) -> str | None:
        import json

        if ending == "lost":
            return None
        if ending == "released":
            return self.store.release(c, f"worker {self.id} shut down")
        if ending == "cancelled":
            return self.store.finish(c, JobStatus.CANCELLED, error="cancelled while running")
        if outcome is not None and outcome[0] == "done":
            result_json, html = outcome[1], outcome[2]
            return self.store.finish(
                c,
                JobStatus.DONE,
                result=result_json,
                report=html,
                summary=metric_summary(json.loads(result_json)),
            )
        if outcome is not None:
            log.error("audit %s failed: %s\n%s", c.id, outcome[1], outcome[2] if len(outcome) > 2 else "")
            return self.store.finish(c, JobStatus.FAILED, error=outcome[1])
        return self.store.finish(
            c, JobStatus.FAILED, error=f"audit process ended without a result (exit code {exitcode})"
        )


class AuditManager:
    """The API's handle on audits: the store (opened in the background, so that a database that is
    down does not keep the API from serving predictions) and, in embedded mode, a local worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = settings.audit_store()
        self.worker = AuditWorker(self.store, settings) if settings.runs_local_worker else None
        self.error: str | None = "connecting"
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- life -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the store (one try now, then in the background until it answers) and start the
        local worker once it is open."""
        self._try_open()
        t = threading.Thread(target=self._maintain, name="audit-store", daemon=True)
        t.start()
        self._threads.append(t)

    def _try_open(self) -> bool:
        try:
            self.store.open()
        except StoreError as exc:
            if self.error != str(exc):
                log.error("%s; admin audit routes answer 503 until it is reachable", exc)
            self.error = str(exc)
            return False
        self.error = None
        self._ready.set()
        log.info(
            "audit store %s open; audits run %s",
            self.store.name,
            "in this process" if self.worker else "on dedicated audit workers",
        )
        if self.worker is not None:
            t = threading.Thread(target=self.worker.run, name="audit-worker", daemon=True)
            t.start()
            self._threads.append(t)
        return True

    def _maintain(self) -> None:
        """Until the store opens: retry. Then, every heartbeat: refresh the store's Prometheus
        snapshot; every minute: keep at most ERC_AUDIT_KEEP finished audits."""
        while not self._ready.is_set():
            metrics.AUDIT_STORE.down()
            if self._stopping.wait(min(5.0, self.settings.audit_heartbeat_s)):
                return
            self._try_open()
        last_trim = 0.0
        while True:
            try:
                if time.monotonic() - last_trim > 60:
                    self.store.trim(self.settings.audit_keep)
                    last_trim = time.monotonic()
                metrics.AUDIT_STORE.update(self.store.stats(), self.store.latest_summaries())
                if self.error is not None:
                    log.info("audit store %s reachable again", self.store.name)
                self.error = None
            except StoreError as exc:
                metrics.AUDIT_STORE.down()
                if self.error is None:
                    log.error("%s; admin audit routes answer 503 until it is reachable", exc)
                self.error = str(exc)
            if self._stopping.wait(self.settings.audit_heartbeat_s):
                return

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the local worker (its running audit goes back to the queue) and close the store.
        Queued audits stay queued: they are in the store."""
        self._stopping.set()
        if self.worker is not None:
            self.worker.stop()
        for t in self._threads:
            t.join(timeout)
        self.store.close()

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` reports about audits (predictions do not depend on it)."""
        detail: dict[str, Any] = {
            "store": self.store.name,
            "ok": self.error is None,
            "local_worker": self.worker is not None,
        }
        if self.error is not None:
            detail["error"] = self.error
        return detail

    # -- requests (called from a thread pool: they block on the database) ---------------------------
    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        if not self._ready.is_set():
            raise AuditStoreUnavailable(f"audit store unavailable: {self.error}")
        try:
            out = fn(*args, **kw)
        except StoreError as exc:
            self.error = str(exc)
            raise AuditStoreUnavailable(str(exc)) from None
        self.error = None
        return out

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def submit(self, audit_id: str, model: str, job: dict[str, Any], upload: bytes | None) -> dict[str, Any]:
        s = self.settings
        accepted = self._call(
            self.store.submit,
            audit_id,
            model,
            job,
            upload=upload,
            max_queued=s.audit_max_queued,
            max_attempts=s.audit_max_attempts,
        )
        if not accepted:
            raise Conflict(
                f"{s.audit_max_queued} audits already wait beyond what the idle workers take (limit "
                "ERC_AUDIT_MAX_QUEUED); retry when one finishes"
            )
        rec = self._call(self.store.get, audit_id)
        return summary(rec)

    def get(self, audit_id: str) -> dict[str, Any] | None:
        rec = self._call(self.store.get, audit_id)
        return None if rec is None else summary(rec)

    def result(self, audit_id: str) -> tuple[str | None, str | None]:
        out: tuple[str | None, str | None] = self._call(self.store.result, audit_id)
        return out

    def list(self) -> list[dict[str, Any]]:
        return [summary(r) for r in self._call(self.store.recent)]

    def cancel(self, audit_id: str) -> dict[str, Any] | None:
        status, changed = self._call(self.store.cancel, audit_id)
        if status is None:
            return None
        if changed and status == JobStatus.CANCELLED:
            metrics.AUDITS.labels(status=JobStatus.CANCELLED).inc()
        elif not changed and status != JobStatus.CANCELLING:
            raise Conflict(f"audit {audit_id} already ended ({status})")
        return summary(self._call(self.store.get, audit_id))
