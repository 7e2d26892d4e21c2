"""The states of an audit job: one enum, used by the store (the ``status`` column holds its
values), the worker, the metrics, the API schema (an OpenAPI enum) and, through
``GET /admin/audits`` (``statuses``), the console. The life of an audit is drawn in
:mod:`service.audit.store`'s docstring.

A ``StrEnum``: members compare equal to, and serialize as, the plain strings the API and the
database have always used (``"queued"``, ...), so the wire and the stored values are unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # a worker holds its lease and runs it
    CANCELLING = "cancelling"  # running, cancel requested: its worker stops it within a heartbeat
    DONE = "done"  # result and report stored
    FAILED = "failed"  # ended without a result (error, or too many lost workers)
    CANCELLED = "cancelled"


# A worker holds a lease on it (heartbeats, progress).
ACTIVE: tuple[JobStatus, ...] = (JobStatus.RUNNING, JobStatus.CANCELLING)
# It will not change any more.
FINISHED: tuple[JobStatus, ...] = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)
# It may still change (a client polls while any audit is in one of these).
PENDING: tuple[JobStatus, ...] = (JobStatus.QUEUED, *ACTIVE)
# DELETE /admin/audits/{id} changes it (a cancelling audit is already on its way).
CANCELLABLE: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)
# GET /admin/audits/{id}/report has a report for it.
WITH_REPORT: tuple[JobStatus, ...] = (JobStatus.DONE,)


def status_groups() -> dict[str, list[str]]:
    """The groups above by name, as the API publishes them (``statuses`` of ``GET /admin/audits``)."""
    return {
        "all": [s.value for s in JobStatus],
        "active": [s.value for s in ACTIVE],
        "pending": [s.value for s in PENDING],
        "finished": [s.value for s in FINISHED],
        "cancellable": [s.value for s in CANCELLABLE],
        "with_report": [s.value for s in WITH_REPORT],
    }


__all__ = ["ACTIVE", "CANCELLABLE", "FINISHED", "PENDING", "WITH_REPORT", "JobStatus", "status_groups"]
