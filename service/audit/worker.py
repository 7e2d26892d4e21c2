"""The audit worker: the loop that claims queued audits from the job store
(:mod:`service.audit.store`) and runs them, one at a time, each in an audit child process
(:mod:`service.audit.child`, started through :func:`service.child.spawn`).

Policy (documented in docs/api.md): each worker runs one audit at a time on its device, in a
spawned child at a lower CPU priority, so an audit survives client disconnects, cannot crash the
worker and never starves prediction traffic on the same host.

Who runs a worker: ``erc audit-worker`` (:mod:`service.cli.audit_worker`, scaled out: the API
replicas then never attack anything), or, in the embedded mode (the default, with a SQLite store),
the API process itself in a thread (:class:`service.audit.manager.AuditManager`), exactly like a
dedicated worker. A worker renews its lease every ``ERC_AUDIT_HEARTBEAT_S`` and learns there whether
its audit was cancelled (then it kills the child); one that dies is detected when its lease
expires, and its audit runs again elsewhere; its child dies with it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Literal

from service import metrics
from service.audit.child import AuditDone, AuditMessage, AuditProgress, main
from service.audit.status import JobStatus
from service.audit.store import Claimed, JobStore, StoreError
from service.audit.view import metric_summary
from service.child import ChildSetup, Failed, spawn
from service.settings import Settings

log = logging.getLogger(__name__)


# Why a worker stopped its child before the child ended by itself (not a job status: how the
# attempt ends in the store follows from it).
Ending = Literal["cancelled", "lost", "released"]


def default_threads() -> int:
    """Half the cores for the audit child (at least one): prediction traffic keeps the rest."""
    return max(1, (os.cpu_count() or 2) // 2)


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
        """The child's job: the stored request plus where this worker runs it."""
        s = self.settings
        return {
            **c.job,
            "id": c.id,
            "model_dir": str(s.model_store / c.job.get("entry", c.model)),
            "upload": c.upload,
            "device": s.audit_device,
        }

    def _setup(self) -> ChildSetup:
        """How the child sets itself up: niced, SCHED_IDLE, half the cores, dies with this worker."""
        s = self.settings
        return ChildSetup(
            niceness=s.audit_niceness,
            sched_idle=s.audit_sched_idle,
            threads=s.audit_threads or default_threads(),
        )

    def _run_one(self, c: Claimed) -> None:
        log.info("audit %s of %s: attempt %d on worker %s", c.id, c.model, c.attempt, self.id)
        metrics.AUDIT_WORKER_BUSY.set(1)
        proc, parent = spawn(main, self._setup(), self._job(c), name=f"audit-{c.id[:8]}", duplex=False)
        self._child = proc
        outcome: AuditDone | Failed | None = None
        progress: dict[str, Any] | None = None
        ending: Ending | None = None  # why this worker stopped the child
        last_ok = time.monotonic()
        next_beat = time.monotonic() + self.settings.audit_heartbeat_s
        try:
            while outcome is None:
                if parent.poll(0.2):
                    try:
                        msg: AuditMessage = parent.recv()
                    except EOFError:
                        break
                    if isinstance(msg, AuditProgress):
                        progress = msg.snapshot
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
        self, c: Claimed, outcome: AuditDone | Failed | None, ending: Ending | None, exitcode: Any
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
        self, c: Claimed, outcome: AuditDone | Failed | None, ending: Ending | None, exitcode: Any
    ) -> str | None:
        if ending == "lost":
            return None
        if ending == "released":
            return self.store.release(c, f"worker {self.id} shut down")
        if ending == "cancelled":
            return self.store.finish(c, JobStatus.CANCELLED, error="cancelled while running")
        if isinstance(outcome, AuditDone):
            return self.store.finish(
                c,
                JobStatus.DONE,
                result=outcome.result_json,
                report=outcome.report_html,
                summary=metric_summary(json.loads(outcome.result_json)),
            )
        if isinstance(outcome, Failed):
            log.error("audit %s failed: %s\n%s", c.id, outcome.message, outcome.traceback)
            return self.store.finish(c, JobStatus.FAILED, error=outcome.message)
        return self.store.finish(
            c, JobStatus.FAILED, error=f"audit process ended without a result (exit code {exitcode})"
        )
