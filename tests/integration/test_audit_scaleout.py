"""Audits scaled out, for real, on each engine of the job store (a SQLite file shared by the
processes of one host; a throwaway PostgreSQL cluster): three ``erc serve`` replicas and several
``erc audit-worker`` processes on 127.0.0.1.

- an audit submitted through one replica, watched through a second, cancelled through a third;
  the listing identical from all three; the result and report readable from any;
- 20 small audits, 4 workers: each runs exactly once (worker logs and attempt counts);
- ``kill -9`` of the worker running an audit: its attack process dies with it, another worker
  re-runs the audit to the end after the lease expires;
- every API replica restarted while an audit runs: the audit and the history are intact.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from service import launch
from service.launch import ServerProcess

TOKEN = "scaleout-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Seconds: a dead worker is noticed after LEASE_S; cancels reach a running audit within HEARTBEAT_S.
LEASE_S, HEARTBEAT_S = 5, 0.5
SMALL = {"model": "tiny", "data": {"n": 20}, "eps": [0.1], "attacks": [{"name": "fgsm"}], "checks": False}
# Long enough to be caught running (tens of seconds on one thread of this CPU), never run to its end.
LONG = {
    "model": "big",
    "data": {"n": 300},
    "eps": [0.1, 0.2, 0.3],
    "attacks": [{"name": "pgd", "params": {"steps": 200}}],
    "checks": False,
}
# A few seconds of attacking: long enough to kill its worker midway, short enough to finish after.
MEDIUM = {
    "model": "tiny",
    "data": {"n": 200},
    "eps": [0.1, 0.2, 0.3],
    "attacks": [{"name": "pgd", "params": {"steps": 60}}],
    "checks": False,
}


@dataclass
class Cluster:
    store: Path
    logs: Path
    db: str
    apis: list[ServerProcess] = field(default_factory=list)
    workers: list[ServerProcess] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {
            "ERC_ADMIN_TOKEN": TOKEN,
            "ERC_AUDIT_DB": self.db,
            "ERC_AUDIT_LOCAL_WORKER": "off",
            "ERC_MODELS": "tiny,big",
            "ERC_DEFAULT_MODEL": "tiny",
            "ERC_TORCH_THREADS": "1",
            "ERC_AUDIT_THREADS": "1",
            # Predictable on a shared CI machine: SCHED_IDLE audits may starve behind other jobs.
            "ERC_AUDIT_SCHED_IDLE": "false",
            "ERC_AUDIT_NICENESS": "0",
            "ERC_AUDIT_LEASE_S": str(LEASE_S),
            "ERC_AUDIT_HEARTBEAT_S": str(HEARTBEAT_S),
            "ERC_AUDIT_MAX_QUEUED": "40",
            "ERC_AUDIT_MAX_ATTEMPTS": "3",
        }

    def start_api(self) -> ServerProcess:
        n = len(list(self.logs.glob("api-*.log")))
        api = launch.start_server(self.store, self.logs / f"api-{n}.log", env=self.env())
        self.apis.append(api)
        return api

    def start_worker(self) -> ServerProcess:
        n = len(list(self.logs.glob("worker-*.log")))
        worker = launch.start_worker(self.store, self.logs / f"worker-{n}.log", env=self.env())
        self.workers.append(worker)
        return worker

    def client(self, i: int) -> httpx.Client:
        return httpx.Client(base_url=self.apis[i].url, headers=AUTH, timeout=60)

    def worker_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("worker-*.log")))

    def stop(self) -> None:
        for p in [*self.apis, *self.workers]:
            p.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(request, model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp(f"scaleout-{request.param}")
    if request.param == "sqlite":
        db = f"sqlite:///{logs}/audits.db"
    else:
        db = request.getfixturevalue("postgres").create_database(f"scaleout_{secrets.token_hex(4)}")
    c = Cluster(model_store, logs, db)
    try:
        for _ in range(3):
            c.start_api()
        for _ in range(2):
            c.start_worker()
        yield c
    finally:
        c.stop()


def _wait(
    c: httpx.Client, audit_id: str, until: tuple[str, ...], timeout: float = 240, progress=False
) -> dict:
    deadline = time.time() + timeout
    while True:
        body = c.get(f"/admin/audits/{audit_id}").json()
        if body["status"] in until and (not progress or body.get("progress", {}).get("fraction", 0) > 0):
            return body
        assert time.time() < deadline, body
        time.sleep(0.25)


def _listings(cluster: Cluster) -> list[list[dict]]:
    out = []
    for i in range(len(cluster.apis)):
        with cluster.client(i) as c:
            r = c.get("/admin/audits")
            assert r.status_code == 200, r.text
            out.append(r.json()["audits"])
    return out


def _attack_children(proc: psutil.Process) -> list[psutil.Process]:
    kids = []
    for p in proc.children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                kids.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return kids


def test_submit_watch_and_cancel_through_different_replicas(cluster: Cluster) -> None:
    with cluster.client(0) as a, cluster.client(1) as b, cluster.client(2) as c:
        done = a.post("/admin/audits", json=SMALL)
        assert done.status_code == 202, done.text
        long = a.post("/admin/audits", json=LONG)
        assert long.status_code == 202, long.text
        long_id = long.json()["id"]
        running = _wait(b, long_id, ("running",), progress=True)
        assert 0 < running["progress"]["fraction"] < 1 and running["attempts"] == 1
        runner = next(w for w in cluster.workers if f"-{w.proc.pid}-" in running["worker"])
        assert _attack_children(psutil.Process(runner.proc.pid)), "the audit runs in the worker's child"
        for api in cluster.apis:  # API replicas never attack anything
            assert not _attack_children(psutil.Process(api.proc.pid))

        r = c.delete(f"/admin/audits/{long_id}")
        assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled"), r.text
        ended = _wait(a, long_id, ("cancelled", "done", "failed"), timeout=60)
        assert ended["status"] == "cancelled", ended
        deadline = time.time() + 30
        while _attack_children(psutil.Process(runner.proc.pid)):  # the cancel killed the attack process
            assert time.time() < deadline
            time.sleep(0.2)

        small = _wait(c, done.json()["id"], ("done", "failed"))
        assert small["status"] == "done", small
        got = b.get(f"/admin/audits/{small['id']}").json()
        assert got["result"]["clean"]["n"] == 20 and got["result"]["id"] == small["id"]
        report = c.get(f"/admin/audits/{small['id']}/report")
        assert report.status_code == 200 and "Robustness audit: tiny" in report.text
        assert c.delete(f"/admin/audits/{long_id}").status_code == 409
        assert b.get("/admin/audits/" + "0" * 32).status_code == 404
    first, *others = _listings(cluster)
    assert {a["id"] for a in first} >= {long_id, small["id"]}
    assert all(listing == first for listing in others), "every replica lists the same audits"


def test_twenty_audits_four_workers_each_runs_once(cluster: Cluster) -> None:
    while len(cluster.workers) < 4:
        cluster.start_worker()
    ids = []
    for i in range(20):
        with cluster.client(i % 3) as c:
            r = c.post("/admin/audits", json={**SMALL, "seed": i})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
    with cluster.client(1) as c:
        ended = [_wait(c, audit_id, ("done", "failed", "cancelled"), timeout=600) for audit_id in ids]
    assert [e["status"] for e in ended] == ["done"] * 20, [e.get("error") for e in ended]
    assert all(e["attempts"] == 1 and "history" not in e for e in ended)
    runs = Counter(
        re.findall(r"audit ([0-9a-f]{32}) of tiny: attempt \d+ on worker (\S+)", cluster.worker_logs())
    )
    per_audit = Counter(audit_id for audit_id, _ in runs.elements())
    assert all(per_audit[i] == 1 for i in ids), per_audit
    assert len({w for (i, w) in runs if i in ids}) >= 2, "the audits were shared between workers"


def test_kill_9_of_a_worker_mid_audit_another_finishes_it(cluster: Cluster) -> None:
    with cluster.client(0) as c:
        r = c.post("/admin/audits", json=MEDIUM)
        assert r.status_code == 202, r.text
        audit_id = r.json()["id"]
        running = _wait(c, audit_id, ("running",), progress=True)
        victim = next(w for w in cluster.workers if f"-{w.proc.pid}-" in running["worker"])
        children = _attack_children(psutil.Process(victim.proc.pid))
        assert children
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        cluster.workers.remove(victim)
        psutil.wait_procs(children, timeout=10)  # the attack process dies with its worker
        assert not any(ch.is_running() and ch.status() != psutil.STATUS_ZOMBIE for ch in children)
        ended = _wait(c, audit_id, ("done", "failed"), timeout=300)
    assert ended["status"] == "done", ended
    assert ended["attempts"] == 2
    (lost,) = ended["history"]
    assert lost["attempt"] == 1 and "lost" in lost["outcome"] and running["worker"] in lost["outcome"]
    assert ended["result"]["clean"]["n"] == 200
    cluster.start_worker()


def test_every_api_restarted_mid_audit_keeps_the_audit_and_the_history(cluster: Cluster) -> None:
    before = _listings(cluster)[0]
    with cluster.client(2) as c:
        r = c.post("/admin/audits", json=MEDIUM)
        assert r.status_code == 202, r.text
        audit_id = r.json()["id"]
        _wait(c, audit_id, ("running",), progress=True)
    for api in list(cluster.apis):
        assert api.stop(), api.log.read_text()[-2000:]
        cluster.apis.remove(api)
    for _ in range(3):
        cluster.start_api()
    after = _listings(cluster)
    finished = {a["id"]: a for a in before if a["status"] in ("done", "failed", "cancelled")}
    for listing in after:
        assert audit_id in [a["id"] for a in listing]
        assert {a["id"]: a for a in listing if a["id"] in finished} == finished, "history unchanged"
    with cluster.client(1) as c:
        ended = _wait(c, audit_id, ("done", "failed"), timeout=300)
    assert ended["status"] == "done" and ended["attempts"] == 1, ended
