"""The audit job store on both engines (a SQLite file; a throwaway PostgreSQL cluster): claims
are exclusive under concurrency, writes are fenced by the lease, lost workers' audits are
re-queued and then failed after the bounded attempts, cancels, the queue limit, the history
trim, and the schema version."""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from service.audit import store as store_mod
from service.audit.store import JobStore, StoreError, normalize_url

JOB = {"request": {"model": "m"}, "work": 1.0}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audits.db"
    return request.getfixturevalue("postgres").create_database(f"unit_{secrets.token_hex(4)}")


def _store(url: str, lease_s: float = 30.0) -> JobStore:
    s = JobStore(url, lease_s=lease_s)
    s.open()
    return s


def _submit(s: JobStore, n: int = 1, *, max_queued: int = 100, max_attempts: int = 2) -> list[str]:
    ids = [secrets.token_hex(16) for _ in range(n)]
    for i in ids:
        assert s.submit(i, "m", JOB, upload=None, max_queued=max_queued, max_attempts=max_attempts)
    return ids


def test_concurrent_claims_take_each_audit_once(db_url: str) -> None:
    s = _store(db_url)
    ids = _submit(s, 30)
    taken: list[str] = []
    lock = threading.Lock()

    def worker(w: str) -> None:
        s.register_worker(w, "cpu")
        while (c := s.claim(w)) is not None:
            with lock:
                taken.append(c.id)
            assert s.finish(c, "done", result="{}") == "done"

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(ids), "every audit claimed exactly once"
    assert {r["status"] for r in s.recent()} == {"done"}


def test_lost_lease_is_reaped_requeued_then_failed_and_fenced(db_url: str) -> None:
    s = _store(db_url, lease_s=1.0)
    (audit_id,) = _submit(s, max_attempts=2)
    first = s.claim("w1")
    assert first is not None and first.attempt == 1 and s.heartbeat(first, {"fraction": 0.5}).held
    assert s.reap() == []  # lease still held
    time.sleep(1.3)
    assert s.reap() == [(audit_id, "queued")]
    assert not s.heartbeat(first, None).held, "a reaped worker's heartbeat finds its lease gone"
    second = s.claim("w2")
    assert second is not None and second.attempt == 2
    assert s.finish(first, "done", result='{"stale": true}') is None, "the old lease writes nothing"
    time.sleep(1.3)
    assert s.reap() == [(audit_id, "failed")]
    rec = s.get(audit_id)
    assert rec is not None and rec["status"] == "failed" and "gave up after 2 attempts" in rec["error"]
    assert [h["attempt"] for h in rec["history"]] == [1, 2] and all(
        "w" in h["worker"] for h in rec["history"]
    )
    assert s.result(audit_id) == (None, None)


def test_cancel_queued_running_and_finished(db_url: str) -> None:
    s = _store(db_url)
    queued, running = _submit(s, 2)
    assert s.cancel(queued) == ("cancelled", True)
    c = s.claim("w")
    assert c is not None and c.id == running
    assert s.cancel(running) == ("cancelling", True)
    assert s.cancel(running) == ("cancelling", False)
    assert s.heartbeat(c, None).cancel
    # A result arriving after the cancel request does not override it.
    assert s.finish(c, "done", result="{}", report="<html>") == "cancelled"
    assert s.result(running) == (None, None)
    assert s.cancel(running) == ("cancelled", False)
    assert s.cancel("0" * 32) == (None, False)


def test_release_hands_the_audit_back_without_counting_the_attempt(db_url: str) -> None:
    s = _store(db_url)
    (audit_id,) = _submit(s)
    c = s.claim("w1")
    assert c is not None
    assert s.release(c, "worker w1 shut down") == "queued"
    again = s.claim("w2")
    assert again is not None and again.attempt == 1 and again.id == audit_id
    rec = s.get(audit_id)
    assert rec is not None and rec["history"][0]["counted"] is False


def test_queue_limit_counts_idle_workers(db_url: str) -> None:
    s = _store(db_url)
    ok = [
        s.submit(secrets.token_hex(16), "m", JOB, upload=None, max_queued=1, max_attempts=1) for _ in range(3)
    ]
    assert ok == [True, False, False]
    s.register_worker("idle", "cpu")  # an idle worker will take one at once: one more fits
    assert s.submit(secrets.token_hex(16), "m", JOB, upload=None, max_queued=1, max_attempts=1)
    assert not s.submit(secrets.token_hex(16), "m", JOB, upload=None, max_queued=1, max_attempts=1)


def test_trim_keeps_the_newest_finished(db_url: str) -> None:
    s = _store(db_url)
    finished = []
    for _ in _submit(s, 5):
        c = s.claim("w")
        assert c is not None
        s.finish(c, "done", result="{}", summary={"clean_accuracy": 1.0, "duration_s": 1.0, "robust": []})
        finished.append(c.id)
        time.sleep(0.01)  # distinct finish times (SQLite's clock has millisecond resolution)
    _submit(s, 1)  # queued: never trimmed
    assert s.trim(2) == 3
    left = [r["id"] for r in s.recent() if r["status"] == "done"]
    assert sorted(left) == sorted(finished[-2:])
    assert set(s.latest_summaries()) == {"m"}


def test_schema_newer_than_the_code_is_refused(db_url: str) -> None:
    s = _store(db_url)
    s.open()  # opening twice is harmless
    with s.engine.begin() as conn:
        conn.execute(update(store_mod.schema).values(version=store_mod.SCHEMA_VERSION + 1))
    with pytest.raises(StoreError, match="newer than this erc knows"):
        _store(db_url)


def test_unreachable_store_names_the_database_without_its_password(free_port_fn) -> None:
    s = JobStore(f"postgresql://erc:s3cret@127.0.0.1:{free_port_fn()}/erc", connect_timeout_s=2)
    with pytest.raises(StoreError) as err:
        s.open()
    assert "127.0.0.1" in str(err.value) and "s3cret" not in str(err.value)
    assert "refused" in str(err.value).lower()


@pytest.mark.parametrize(
    "url,fragment",
    [
        ("mysql://u@h/db", "unsupported database 'mysql'"),
        ("not a url", "is not a database URL"),
        ("sqlite://", "needs a file"),
        ("sqlite:///:memory:", "needs a file"),
        ("postgresql://u@h:5432", "names no database"),
        ("postgresql+asyncpg://u@h/db", "driver 'asyncpg'"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        normalize_url(url)
    assert normalize_url("postgresql://u:p@h:5/db").drivername == "postgresql+psycopg"
