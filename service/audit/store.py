"""The audit job store: one table of audits shared by every API replica and every audit worker.

Two engines behind one URL (``ERC_AUDIT_DB``): a SQLite file (the embedded default: no server,
every process on one host may share it) or PostgreSQL (several hosts). The store is SQLAlchemy
Core over one table, ``erc_audits``, plus ``erc_audit_workers`` (who is alive and what it runs)
and ``erc_schema`` (the schema version). Why a table and not a queue library, and why not Alembic:
docs/architecture.md, *Audit jobs*.

Life of an audit::

    queued --claim--> running --finish--> done | failed | cancelled
      |                 |  \\--cancel--> cancelling --finish/reap--> cancelled
      |                 \\--lease expired (worker lost)--> queued (attempts < max) | failed
      \\--cancel--> cancelled

- **Claims** are compare-and-set: ``UPDATE ... WHERE id = :id AND status = 'queued'``. On
  PostgreSQL the candidate row is picked with ``FOR UPDATE SKIP LOCKED``, so concurrent workers
  never wait on each other's row; on SQLite every write transaction is ``BEGIN IMMEDIATE`` (the
  database's single writer lock, taken up front instead of upgraded mid-transaction, which could
  fail with ``SQLITE_BUSY`` instead of waiting).
- **Leases.** A claim gives the worker a lease of ``lease_s`` seconds that its heartbeats renew.
  Times are the *database's* clock, so workers on hosts whose clocks disagree still agree on
  whether a lease expired. A worker whose lease expired (killed, host lost) is *reaped*: its audit
  goes back to the queue, or fails once it has been attempted ``max_attempts`` times.
- **Fencing.** Every write a worker makes about an audit (heartbeat, progress, result) carries
  ``(id, worker, attempts)`` in its ``WHERE``: a worker that lost its lease (reaped, re-claimed by
  another) can no longer write anything, so results are written only by the lease holder, in one
  transaction (status, result JSON and HTML report together: nothing half-written).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    case,
    delete,
    event,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from service.audit.status import ACTIVE, FINISHED, JobStatus

log = logging.getLogger(__name__)

# Bump with a migration step in MIGRATIONS whenever the tables change.
SCHEMA_VERSION = 1


def _values(statuses: tuple[JobStatus, ...]) -> list[str]:
    # Plain strings in SQL: a database driver may adapt an Enum member by its name, not its value.
    return [s.value for s in statuses]


metadata = MetaData()
audits = Table(
    "erc_audits",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("job", Text, nullable=False),  # JSON: request, spec, data, work, weights_sha256
    Column("upload", LargeBinary),  # npz of uploaded images (x float32 [N,C,H,W] in [0,1], y int64 [N])
    Column("created", Double, nullable=False),  # seconds since the epoch, database clock
    Column("started", Double),  # first claim
    Column("finished", Double),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("worker", String(255)),  # the lease holder while running
    Column("lease_until", Double),
    Column("heartbeat", Double),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("progress", Text),  # JSON: fraction, elapsed_s, remaining_s, stage
    Column("history", Text),  # JSON list: earlier attempts that ended without a result, and why
    Column("error", Text),
    Column("summary", Text),  # JSON: the figures the Prometheus gauges export
    Column("result", Text),  # JSON: the full result
    Column("report", Text),  # self-contained HTML report
    Index("ix_erc_audits_status_created", "status", "created"),
)
workers = Table(
    "erc_audit_workers",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("device", String(64), nullable=False),
    Column("started", Double, nullable=False),
    Column("heartbeat", Double, nullable=False),
    Column("audit", String(32)),  # what it runs now
)
schema = Table(
    "erc_schema",
    metadata,
    Column("component", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
)
# version v -> v + 1, each a function of a Connection inside the migration transaction.
MIGRATIONS: dict[int, Any] = {}
# Light columns: everything but the result, the report and the upload.
SUMMARY_COLUMNS = [c for c in audits.c if c.name not in ("result", "report", "upload", "summary")]


class StoreError(Exception):
    """The store cannot be reached or used; the message names the database (password hidden)."""


def normalize_url(url: str) -> URL:
    """``sqlite:///PATH`` or ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (psycopg 3 is the driver);
    raises ``ValueError`` naming what is wrong."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(
            f"{url!r} is not a database URL (sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB)"
        ) from None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend in ("postgresql", "postgres"):
        if driver not in ("psycopg", "psycopg2", "postgresql", "postgres"):
            raise ValueError(f"driver {driver!r} is not supported for PostgreSQL: use postgresql://")
        if not parsed.database:
            raise ValueError("the PostgreSQL URL names no database (postgresql://USER@HOST:PORT/DB)")
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("pysqlite", "sqlite"):
            raise ValueError(f"driver {driver!r} is not supported for SQLite: use sqlite:///PATH")
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError("SQLite needs a file (sqlite:///PATH): an in-memory database is one process's")
        return parsed.set(drivername="sqlite+pysqlite")
    raise ValueError(
        f"unsupported database {backend!r}: sqlite:///PATH (one host) or postgresql://... (several hosts)"
    )


def describe(url: str | URL) -> str:
    """The URL with its password hidden (for messages and logs)."""
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.render_as_string(hide_password=True)


@dataclass
class Claimed:
    """An audit a worker holds the lease of; ``(id, worker, attempt)`` fences its writes."""

    id: str
    model: str
    job: dict[str, Any]
    upload: bytes | None
    worker: str
    attempt: int


@dataclass
class Beat:
    """What a heartbeat learned: whether the lease is still held, and whether to cancel."""

    held: bool
    cancel: bool = False


@dataclass
class Stats:
    by_status: dict[str, int] = field(default_factory=dict)
    workers_alive: int = 0
    workers_idle: int = 0


class JobStore:
    """The audits table behind one database URL. Thread-safe (SQLAlchemy's connection pool); every
    method raises :class:`StoreError` when the database cannot be used."""

    def __init__(
        self, url: str, *, password: str | None = None, lease_s: float = 30.0, connect_timeout_s: float = 5.0
    ) -> None:
        self.url = normalize_url(url)
        if password and self.url.password is None:
            self.url = self.url.set(password=password)
        self.name = describe(self.url.set(drivername=make_url(url).drivername))
        self.lease_s = lease_s
        self.dialect = self.url.get_backend_name()
        self.engine = self._create_engine(connect_timeout_s)

    # -- connection ------------------------------------------------------------------------------
    def _create_engine(self, connect_timeout_s: float) -> Engine:
        if self.dialect == "sqlite":
            assert self.url.database is not None
            Path(self.url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})

            @event.listens_for(engine, "connect")
            def _connect(dbapi_conn: Any, _: Any) -> None:
                # Let SQLAlchemy's "begin" event below issue BEGIN, not the sqlite3 module.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
                cur.close()

            @event.listens_for(engine, "begin")
            def _begin(conn: Connection) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        return create_engine(
            self.url,
            pool_pre_ping=True,
            pool_size=4,
            max_overflow=4,
            connect_args={"connect_timeout": max(1, round(connect_timeout_s))},
        )

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"audit store {self.name}: {_reason(exc)}") from exc

    def now(self) -> ColumnElement[float]:
        """The database's clock in seconds since the epoch (one clock for every host's leases)."""
        if self.dialect == "postgresql":
            return literal_column("extract(epoch from clock_timestamp())::double precision", Double)
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Double)

    def open(self) -> None:
        """Create the tables, or migrate them to :data:`SCHEMA_VERSION`; refuse a newer schema."""
        with self._tx() as conn:
            if self.dialect == "postgresql":
                # Two processes starting at once must not both create the tables.
                conn.execute(select(func.pg_advisory_xact_lock(0x45524341)))
            schema.create(conn, checkfirst=True)
            version = conn.execute(
                select(schema.c.version).where(schema.c.component == "audits")
            ).scalar_one_or_none()
            if version is None:
                metadata.create_all(conn, checkfirst=True)
                conn.execute(insert(schema).values(component="audits", version=SCHEMA_VERSION))
                log.info("audit store %s: tables created (schema %d)", self.name, SCHEMA_VERSION)
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    f"audit store {self.name} has schema version {version}, newer than this erc knows "
                    f"({SCHEMA_VERSION}): upgrade erc on this host"
                )
            else:
                for v in range(version, SCHEMA_VERSION):
                    MIGRATIONS[v](conn)
                    log.info("audit store %s: migrated schema %d -> %d", self.name, v, v + 1)
                conn.execute(
                    update(schema).where(schema.c.component == "audits").values(version=SCHEMA_VERSION)
                )

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._tx() as conn:
            conn.execute(select(1))

    # -- API side ----------------------------------------------------------------------------------
    def submit(
        self,
        audit_id: str,
        model: str,
        job: dict[str, Any],
        *,
        upload: bytes | None,
        max_queued: int,
        max_attempts: int,
    ) -> bool:
        """Queue an audit unless ``max_queued`` wait already beyond what idle workers will take at
        once; False when refused (the queue is full)."""
        with self._tx() as conn:
            if self.dialect == "postgresql":  # one count-then-insert at a time: the limit is exact
                conn.execute(select(func.pg_advisory_xact_lock(0x45524342)))
            queued = conn.execute(
                select(func.count()).select_from(audits).where(audits.c.status == JobStatus.QUEUED.value)
            ).scalar_one()
            idle = conn.execute(
                select(func.count())
                .select_from(workers)
                .where(workers.c.audit.is_(None), workers.c.heartbeat > self.now() - self.lease_s)
            ).scalar_one()
            if queued >= max_queued + idle:
                return False
            conn.execute(
                insert(audits).values(
                    id=audit_id,
                    model=model,
                    status=JobStatus.QUEUED.value,
                    job=json.dumps(job),
                    upload=upload,
                    created=self.now(),
                    attempts=0,
                    max_attempts=max_attempts,
                    cancel_requested=False,
                )
            )
        return True

    def get(self, audit_id: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(select(*SUMMARY_COLUMNS).where(audits.c.id == audit_id)).mappings().first()
        return None if row is None else _record(row)

    def recent(self, limit: int = 1000) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                select(*SUMMARY_COLUMNS).order_by(audits.c.created.desc(), audits.c.id).limit(limit)
            ).mappings()
            return [_record(r) for r in rows]

    def result(self, audit_id: str) -> tuple[str | None, str | None]:
        """(result JSON, HTML report) of a finished audit."""
        with self._tx() as conn:
            row = conn.execute(
                select(audits.c.result, audits.c.report).where(audits.c.id == audit_id)
            ).first()
        return (None, None) if row is None else (row[0], row[1])

    def cancel(self, audit_id: str) -> tuple[JobStatus | None, bool]:
        """Cancel: a queued audit ends now; a running one becomes ``cancelling`` until its worker
        has stopped it (at its next heartbeat). Returns the status after the call (None: no such
        audit) and whether this call changed it."""
        with self._tx() as conn:
            res = conn.execute(
                update(audits)
                .where(audits.c.id == audit_id, audits.c.status == JobStatus.QUEUED.value)
                .values(
                    status=JobStatus.CANCELLED.value, finished=self.now(), error="cancelled before it started"
                )
            )
            if res.rowcount:
                return JobStatus.CANCELLED, True
            res = conn.execute(
                update(audits)
                .where(audits.c.id == audit_id, audits.c.status == JobStatus.RUNNING.value)
                .values(status=JobStatus.CANCELLING.value, cancel_requested=True)
            )
            if res.rowcount:
                return JobStatus.CANCELLING, True
            status: str | None = conn.execute(
                select(audits.c.status).where(audits.c.id == audit_id)
            ).scalar_one_or_none()
            return (None if status is None else JobStatus(status)), False

    def stats(self) -> Stats:
        with self._tx() as conn:
            rows = conn.execute(select(audits.c.status, func.count()).group_by(audits.c.status)).all()
            alive = conn.execute(
                select(workers.c.audit).where(workers.c.heartbeat > self.now() - self.lease_s)
            ).all()
        return Stats({s: int(n) for s, n in rows}, len(alive), sum(1 for (audit,) in alive if audit is None))

    def latest_summaries(self) -> dict[str, tuple[float, dict[str, Any]]]:
        """Per model, (finished, summary) of its last finished audit (the Prometheus gauges)."""
        with self._tx() as conn:
            rows = conn.execute(
                select(audits.c.model, audits.c.finished, audits.c.summary)
                .where(audits.c.status == JobStatus.DONE.value, audits.c.summary.is_not(None))
                .order_by(audits.c.finished.desc())
                .limit(500)
            ).all()
        out: dict[str, tuple[float, dict[str, Any]]] = {}
        for model, finished, summary in rows:
            out.setdefault(model, (finished, json.loads(summary)))
        return out

    def trim(self, keep: int) -> int:
        """Delete all but the ``keep`` most recently finished audits; returns how many went."""
        with self._tx() as conn:
            cutoff = conn.execute(
                select(audits.c.finished)
                .where(audits.c.status.in_(_values(FINISHED)))
                .order_by(audits.c.finished.desc())
                .offset(keep - 1)
                .limit(1)
            ).scalar_one_or_none()
            if cutoff is None:
                return 0
            res = conn.execute(
                delete(audits).where(audits.c.status.in_(_values(FINISHED)), audits.c.finished < cutoff)
            )
            return int(res.rowcount or 0)

    # -- worker side --------------------------------------------------------------------------------
    def register_worker(self, worker_id: str, device: str) -> None:
        with self._tx() as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))
            conn.execute(
                insert(workers).values(
                    id=worker_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    device=device,
                    started=self.now(),
                    heartbeat=self.now(),
                    audit=None,
                )
            )

    def worker_beat(self, worker_id: str, audit_id: str | None) -> bool:
        """Renew a worker's row; False when it is gone (dropped after a long silence)."""
        with self._tx() as conn:
            res = conn.execute(
                update(workers).where(workers.c.id == worker_id).values(heartbeat=self.now(), audit=audit_id)
            )
            return bool(res.rowcount)

    def unregister_worker(self, worker_id: str) -> None:
        with self._tx() as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))

    def claim(self, worker_id: str) -> Claimed | None:
        """The oldest queued audit, now running under ``worker_id``'s lease; None when none waits."""
        with self._tx() as conn:
            pick = select(audits.c.id).where(audits.c.status == JobStatus.QUEUED.value)
            pick = pick.order_by(audits.c.created, audits.c.id).limit(1)
            if self.dialect == "postgresql":
                pick = pick.with_for_update(skip_locked=True)
            audit_id = conn.execute(pick).scalar_one_or_none()
            if audit_id is None:
                return None
            res = conn.execute(
                update(audits)
                .where(audits.c.id == audit_id, audits.c.status == JobStatus.QUEUED.value)  # compare and set
                .values(
                    status=JobStatus.RUNNING.value,
                    attempts=audits.c.attempts + 1,
                    worker=worker_id,
                    lease_until=self.now() + self.lease_s,
                    heartbeat=self.now(),
                    started=func.coalesce(audits.c.started, self.now()),
                    progress=None,
                    cancel_requested=False,
                )
            )
            if res.rowcount != 1:
                return None
            row = conn.execute(
                select(audits.c.model, audits.c.job, audits.c.upload, audits.c.attempts).where(
                    audits.c.id == audit_id
                )
            ).one()
            conn.execute(
                update(workers).where(workers.c.id == worker_id).values(audit=audit_id, heartbeat=self.now())
            )
        return Claimed(audit_id, row.model, json.loads(row.job), row.upload, worker_id, row.attempts)

    def _fence(self, c: Claimed) -> ColumnElement[bool]:
        return (
            (audits.c.id == c.id)
            & (audits.c.worker == c.worker)
            & (audits.c.attempts == c.attempt)
            & audits.c.status.in_(_values(ACTIVE))
        )

    def heartbeat(self, c: Claimed, progress: dict[str, Any] | None) -> Beat:
        """Renew the lease (and record progress); tells whether it is still held and whether the
        audit was cancelled."""
        values: dict[str, Any] = {"lease_until": self.now() + self.lease_s, "heartbeat": self.now()}
        if progress is not None:
            values["progress"] = json.dumps(progress)
        with self._tx() as conn:
            if not conn.execute(update(audits).where(self._fence(c)).values(**values)).rowcount:
                return Beat(held=False)
            cancel = conn.execute(select(audits.c.cancel_requested).where(audits.c.id == c.id)).scalar_one()
            conn.execute(update(workers).where(workers.c.id == c.worker).values(heartbeat=self.now()))
        return Beat(held=True, cancel=bool(cancel))

    def finish(
        self,
        c: Claimed,
        status: JobStatus,
        *,
        error: str | None = None,
        result: str | None = None,
        report: str | None = None,
        summary: dict[str, Any] | None = None,
    ) -> JobStatus | None:
        """Record how the attempt ended, in one transaction, if the lease is still held; a
        cancel requested meanwhile wins over any other ending. Returns the final status, or None
        when the lease was lost (nothing written)."""
        cancelled = audits.c.cancel_requested == True  # noqa: E712 (SQL expression)
        with self._tx() as conn:
            res = conn.execute(
                update(audits)
                .where(self._fence(c))
                .values(
                    status=case((cancelled, JobStatus.CANCELLED.value), else_=JobStatus(status).value),
                    error=case((cancelled, "cancelled while running"), else_=error),
                    result=case((cancelled, None), else_=result),
                    report=case((cancelled, None), else_=report),
                    summary=case((cancelled, None), else_=json.dumps(summary) if summary else None),
                    finished=self.now(),
                    lease_until=None,
                )
            )
            conn.execute(
                update(workers).where(workers.c.id == c.worker).values(audit=None, heartbeat=self.now())
            )
            if not res.rowcount:
                return None
            final = conn.execute(select(audits.c.status).where(audits.c.id == c.id)).scalar_one()
        return JobStatus(final)

    def release(self, c: Claimed, reason: str) -> JobStatus | None:
        """Give a running audit back to the queue (its worker is shutting down): the attempt does not
        count. A cancelling one ends cancelled. Returns the new status, or None if the lease was lost."""
        with self._tx() as conn:
            row = conn.execute(
                select(audits.c.cancel_requested, audits.c.history).where(self._fence(c))
            ).first()
            if row is None:
                return None
            status = JobStatus.CANCELLED if row.cancel_requested else JobStatus.QUEUED
            values: dict[str, Any] = {
                "status": status.value,
                "worker": None,
                "lease_until": None,
                "progress": None,
            }
            if status == JobStatus.CANCELLED:
                values.update(finished=self.now(), error="cancelled while running")
            else:
                values.update(
                    attempts=audits.c.attempts - 1,
                    history=_append(row.history, c, f"released: {reason}", counted=False),
                )
            conn.execute(update(audits).where(self._fence(c)).values(**values))
            conn.execute(update(workers).where(workers.c.id == c.worker).values(audit=None))
        return status

    def reap(self) -> list[tuple[str, str]]:
        """Audits whose worker's lease expired: re-queued, failed after ``max_attempts``, or
        cancelled if a cancel was pending. Returns ``(id, new status)`` for each."""
        out: list[tuple[str, str]] = []
        with self._tx() as conn:
            pick = select(
                audits.c.id,
                audits.c.status,
                audits.c.worker,
                audits.c.attempts,
                audits.c.max_attempts,
                audits.c.history,
                audits.c.heartbeat,
            ).where(audits.c.status.in_(_values(ACTIVE)), audits.c.lease_until < self.now())
            if self.dialect == "postgresql":
                pick = pick.with_for_update(skip_locked=True)
            for row in conn.execute(pick).all():
                seen = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.heartbeat or 0))
                lost = f"worker {row.worker} lost (no heartbeat since {seen})"
                claimed = Claimed(row.id, "", {}, None, row.worker, row.attempts)
                values: dict[str, Any] = {"worker": None, "lease_until": None}
                if row.status == JobStatus.CANCELLING:
                    values.update(
                        status=JobStatus.CANCELLED.value, finished=self.now(), error=f"cancelled; {lost}"
                    )
                elif row.attempts < row.max_attempts:
                    values.update(
                        status=JobStatus.QUEUED.value,
                        progress=None,
                        history=_append(row.history, claimed, lost),
                    )
                else:
                    values.update(
                        status=JobStatus.FAILED.value,
                        finished=self.now(),
                        history=_append(row.history, claimed, lost),
                        error=f"gave up after {row.attempts} attempts: {lost}",
                    )
                res = conn.execute(
                    update(audits)
                    .where(self._fence(claimed), audits.c.lease_until < self.now())
                    .values(**values)
                )
                if res.rowcount:
                    out.append((row.id, values["status"]))
                    log.warning("audit %s: %s -> %s", row.id, lost, values["status"])
            # Workers silent for ten leases are gone for good: drop their rows.
            conn.execute(delete(workers).where(workers.c.heartbeat < self.now() - 10 * self.lease_s))
        return out


def _append(history: str | None, c: Claimed, outcome: str, counted: bool = True) -> str:
    entries = json.loads(history) if history else []
    entries.append({"attempt": c.attempt, "worker": c.worker, "outcome": outcome, "counted": counted})
    return json.dumps(entries)


def _record(row: Any) -> dict[str, Any]:
    rec = dict(row)
    rec["job"] = json.loads(rec["job"])
    rec["progress"] = json.loads(rec["progress"]) if rec["progress"] else None
    rec["history"] = json.loads(rec["history"]) if rec["history"] else []
    return rec


def _reason(exc: SQLAlchemyError) -> str:
    """The database's own words, first line, without SQLAlchemy's background link."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
