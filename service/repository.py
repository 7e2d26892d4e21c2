"""The model repository of a deployment: which models it serves, recorded in the shared store the
audits already use (SQLite or PostgreSQL), and the loop that makes each API replica serve exactly
that (Open Inference Protocol's repository extension, TorchServe-style versions and defaults).

A **model** is a name clients use (``/v1/models/NAME``); a **version** of it is one store entry
(a ``model_store/ENTRY`` directory; by default the entry named like the model), identified by the
first 12 hex digits of its weights' sha256 (the ``model_version`` every answer carries). A model
may have several versions loaded at once; one of them is its default, which answers
``/v1/models/NAME`` and ``/v2/models/NAME``; ``/v2/models/NAME/versions/VERSION`` reaches any.

The record (table ``erc_models``) lists ``(name, entry)`` rows with ``wanted`` and ``is_default``.
Every replica runs a :class:`Reconciler`: every ``ERC_REPOSITORY_POLL_S`` seconds (and at once
after a change it made itself) it reads the record and loads what is wanted and not served here,
unloads what is served and no longer wanted, and follows the default; it writes its own state of
every version (``erc_model_replicas``), which the index shows per replica. At start, a replica adds
to the record the store entries it found that the record has never listed (so a new deployment's
models are listed once) and serves what the record lists: a model unloaded by the API stays
unloaded after a restart.

No request is lost: a version is loaded beside what is served and enters the routing table only
once warm; a default moves only to a ready version; an unloaded version leaves the routing table
first, then its batcher finishes what it holds. A version that fails to load leaves the others
serving; the index says why.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    Column,
    Double,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from service.audit.store import JobStore, StoreError, schema

if TYPE_CHECKING:
    from service.served_models import ModelRegistry

log = logging.getLogger(__name__)

SCHEMA_COMPONENT = "models"
SCHEMA_VERSION = 1

metadata = MetaData()
records = Table(
    "erc_models",
    metadata,
    Column("name", String(255), primary_key=True),  # the name clients use
    Column("entry", String(255), primary_key=True),  # the model_store directory of this version
    Column("version", String(64), nullable=False),  # its weights' sha256[:12] when it was recorded
    Column("wanted", Boolean, nullable=False),  # served by every replica (False: unloaded)
    Column("is_default", Boolean, nullable=False),  # the version answering /v1/models/NAME
    Column("updated", Double, nullable=False),  # database clock
)
replica_states = Table(
    "erc_model_replicas",
    metadata,
    Column("replica", String(255), primary_key=True),
    Column("name", String(255), primary_key=True),
    Column("entry", String(255), primary_key=True),
    Column("version", String(64)),
    Column("state", String(16), nullable=False),  # loading | ready | failed | unloading
    Column("reason", Text),
    Column("load_seconds", Double),
    Column("heartbeat", Double, nullable=False),  # database clock
)


class RepositoryError(Exception):
    """A repository request that cannot be applied; the message says why (mapped to 4xx)."""


@dataclass(frozen=True)
class Record:
    name: str
    entry: str
    version: str
    wanted: bool
    is_default: bool
    updated: float = 0.0  # database clock of the last change (a failed load is retried after a newer one)


@dataclass(frozen=True)
class LocalState:
    """One version as this replica holds it."""

    name: str
    entry: str
    version: str | None
    state: str
    reason: str | None = None
    load_seconds: float | None = None


class ModelRecords:
    """The repository tables, in the audit store's database (same engine, transactions, clock)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.store.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(
                f"model repository in {self.store.name}: {exc.__class__.__name__}: {exc}"
            ) from exc

    def open(self) -> None:
        """Create the tables (schema component ``models``) or refuse a newer schema."""
        with self._tx() as conn:
            if self.store.dialect == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(0x4552434D)))
            schema.create(conn, checkfirst=True)
            version = conn.execute(
                select(schema.c.version).where(schema.c.component == SCHEMA_COMPONENT)
            ).scalar_one_or_none()
            if version is None:
                metadata.create_all(conn, checkfirst=True)
                conn.execute(insert(schema).values(component=SCHEMA_COMPONENT, version=SCHEMA_VERSION))
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    f"model repository in {self.store.name} has schema {version}, newer than this erc "
                    f"knows ({SCHEMA_VERSION}): upgrade erc on this host"
                )

    # -- the record ------------------------------------------------------------------------------
    def all(self) -> list[Record]:
        with self._tx() as conn:
            rows = conn.execute(select(records).order_by(records.c.name, records.c.entry)).mappings().all()
        return [
            Record(
                r["name"], r["entry"], r["version"], bool(r["wanted"]), bool(r["is_default"]), r["updated"]
            )
            for r in rows
        ]

    def register_present(self, found: list[tuple[str, str]]) -> list[str]:
        """Add ``(name, version)`` store entries served under their own name that the record has
        never listed (any row of that name counts); returns the names added."""
        added = []
        with self._tx() as conn:
            known = set(conn.execute(select(records.c.name).distinct()).scalars())
            for name, version in found:
                if name in known:
                    continue
                conn.execute(
                    insert(records).values(
                        name=name, entry=name, version=version, wanted=True, is_default=True,
                        updated=self.store.now(),
                    )
                )  # fmt: skip
                added.append(name)
        return added

    def load(self, name: str, entry: str, version: str, *, make_default: bool) -> Record:
        """Want ``entry`` served as a version of ``name``; it becomes the default when asked or
        when ``name`` has no wanted default."""
        with self._tx() as conn:
            rows = conn.execute(select(records).where(records.c.name == name)).mappings().all()
            has_default = any(r["wanted"] and r["is_default"] and r["entry"] != entry for r in rows)
            default = make_default or not has_default
            if default:
                conn.execute(update(records).where(records.c.name == name).values(is_default=False))
            values = {"version": version, "wanted": True, "is_default": default, "updated": self.store.now()}
            if any(r["entry"] == entry for r in rows):
                conn.execute(
                    update(records).where(records.c.name == name, records.c.entry == entry).values(**values)
                )
            else:
                conn.execute(insert(records).values(name=name, entry=entry, **values))
        return Record(name, entry, version, True, default)

    def unload(self, name: str, version: str | None) -> list[Record]:
        """Stop serving ``name`` (one version, or all); the default of a model that keeps other
        versions cannot be unloaded alone. Returns the records unloaded."""
        with self._tx() as conn:
            rows = [
                r
                for r in conn.execute(
                    select(records).where(records.c.name == name, records.c.wanted)
                ).mappings()
            ]
            if not rows:
                raise RepositoryError(f"model {name!r} is not loaded")
            chosen = [r for r in rows if version is None or r["version"] == version]
            if not chosen:
                have = ", ".join(sorted(r["version"] for r in rows))
                raise RepositoryError(f"model {name!r} has no loaded version {version!r} (loaded: {have})")
            if version is not None and chosen[0]["is_default"] and len(rows) > 1:
                others = ", ".join(sorted(r["version"] for r in rows if not r["is_default"]))
                raise RepositoryError(
                    f"version {version} is the default of {name!r}: make another version the default "
                    f"first ({others}), or unload the model"
                )
            entries = [r["entry"] for r in chosen]
            conn.execute(
                update(records)
                .where(records.c.name == name, records.c.entry.in_(entries))
                .values(wanted=False, is_default=False, updated=self.store.now())
            )
        return [Record(r["name"], r["entry"], r["version"], False, False) for r in chosen]

    def set_default(self, name: str, version: str) -> Record:
        with self._tx() as conn:
            rows = (
                conn.execute(select(records).where(records.c.name == name, records.c.wanted)).mappings().all()
            )
            match = [r for r in rows if r["version"] == version]
            if not match:
                have = ", ".join(sorted(r["version"] for r in rows)) or "none"
                raise RepositoryError(f"model {name!r} has no loaded version {version!r} (loaded: {have})")
            conn.execute(update(records).where(records.c.name == name).values(is_default=False))
            conn.execute(
                update(records)
                .where(records.c.name == name, records.c.entry == match[0]["entry"])
                .values(is_default=True, updated=self.store.now())
            )
        r = match[0]
        return Record(r["name"], r["entry"], r["version"], True, True)

    # -- replicas --------------------------------------------------------------------------------
    def report(self, replica: str, states: list[LocalState]) -> None:
        """Replace this replica's rows by ``states`` (heartbeat: the database clock)."""
        with self._tx() as conn:
            conn.execute(delete(replica_states).where(replica_states.c.replica == replica))
            for s in states:
                conn.execute(
                    insert(replica_states).values(
                        replica=replica, name=s.name, entry=s.entry, version=s.version, state=s.state,
                        reason=s.reason, load_seconds=s.load_seconds, heartbeat=self.store.now(),
                    )
                )  # fmt: skip

    def forget(self, replica: str) -> None:
        with self._tx() as conn:
            conn.execute(delete(replica_states).where(replica_states.c.replica == replica))

    def replicas(self, fresh_s: float) -> list[dict[str, Any]]:
        """Every replica row whose heartbeat is under ``fresh_s`` seconds old."""
        with self._tx() as conn:
            rows = conn.execute(
                select(replica_states).where(replica_states.c.heartbeat > self.store.now() - fresh_s)
            ).mappings()
            return [dict(r) for r in rows]


def replica_id() -> str:
    """This API process: host, pid and port (ERC_PORT) when known."""
    port = os.environ.get("ERC_PORT", "")
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{port}" if port else "")


class Reconciler:
    """Makes one replica's registry serve what the record lists (see the module doc)."""

    def __init__(self, registry: ModelRegistry, model_records: ModelRecords, poll_s: float) -> None:
        self.registry = registry
        self.records = model_records
        self.poll_s = poll_s
        self.replica = replica_id()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one reconciliation at a time (the loop or a request)
        self._thread: threading.Thread | None = None
        self.ok = False  # whether the last pass reached the record

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="model-repository", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.records.forget(self.replica)
        except StoreError as exc:
            log.warning("model repository: could not remove this replica's rows: %s", exc)

    def poke(self) -> None:
        """Reconcile now (after a change this replica made)."""
        self._wake.set()

    def _loop(self) -> None:
        opened = False
        while not self._stop.is_set():
            try:
                if not opened:
                    self.records.open()
                    found = [(m.name, m.version) for m in self.registry.startup_models()]
                    added = self.records.register_present(found)
                    if added:
                        log.info("model repository: recorded the store's %s", ", ".join(added))
                    opened = True
                self.reconcile()
                if not self.ok:
                    log.info("model repository: reachable again")
                self.ok = True
            except StoreError as exc:
                if self.ok or not opened:
                    log.warning("model repository unavailable (serving what is loaded): %s", exc)
                self.ok = False
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def reconcile(self) -> None:
        """One pass: read the record, apply it here, report this replica's state."""
        with self._lock:
            wanted = [r for r in self.records.all() if r.wanted]
            self.registry.apply(wanted)
            self.records.report(self.replica, self.registry.local_states())

    def wait_for(self, name: str, entry: str, timeout_s: float) -> LocalState | None:
        """This replica's state of ``(name, entry)`` once it is no longer loading (or None when it
        is not held here within ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poke()
            for s in self.registry.local_states():
                if s.name == name and s.entry == entry and s.state in ("ready", "failed"):
                    return s
            time.sleep(0.05)
        return None


def entry_dir(store: Path, entry: str) -> Path:
    """``store/entry`` for a plain directory name; :class:`RepositoryError` for anything else."""
    if not entry or entry != Path(entry).name or entry.startswith("."):
        raise RepositoryError(f"invalid store entry {entry!r}: a directory name in the model store")
    return store / entry
