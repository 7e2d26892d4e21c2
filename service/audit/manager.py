"""The API's side of audit jobs: :class:`AuditManager`, the data access the admin routes use
(submit, get, list, cancel, result) over the job store (:mod:`service.audit.store`), answering in
the public view (:mod:`service.audit.view`). It opens the store in the background (a database
that is down does not keep the API from serving predictions), refreshes the store's Prometheus
snapshot, trims old audits and, in embedded mode, runs an audit worker
(:class:`service.audit.worker.AuditWorker`) in a thread.

Audits wait in the store in order; up to ``ERC_AUDIT_MAX_QUEUED`` more than the idle workers take
at once, beyond that a new request gets 409. Ids are 128-bit random (unguessable).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any

from service import metrics
from service.audit.status import JobStatus
from service.audit.store import StoreError
from service.audit.view import summary
from service.audit.worker import AuditWorker
from service.errors import AuditStoreUnavailable, Conflict
from service.settings import Settings

log = logging.getLogger(__name__)


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
