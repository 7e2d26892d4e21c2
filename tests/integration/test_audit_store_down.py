"""The audit store's faults, on real processes: a wrong database URL stops ``erc serve`` and
``erc audit-worker`` at start-up with one line; an unreachable PostgreSQL (a private cluster,
stopped and started by the test) leaves predictions served while the admin routes answer 503 and
``/readyz`` says why; once the database is back, audits work again and nothing was lost."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from service import launch
from service.launch import free_port
from service.postgres import start_postgres

REPO = Path(__file__).resolve().parents[2]

TOKEN = "store-down-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SMALL = {"model": "tiny", "data": {"n": 20}, "eps": [0.1], "attacks": [{"name": "fgsm"}], "checks": False}


def _erc(args: list[str], env: dict[str, str], store: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "ERC_MODEL_STORE": str(store), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_wrong_database_url_stops_serve_and_worker_at_start(model_store: Path) -> None:
    for args in (["serve"], ["audit-worker"]):
        res = _erc(args, {"ERC_AUDIT_DB": "mysql://erc@db/erc", "ERC_ADMIN_TOKEN": TOKEN}, model_store)
        assert res.returncode != 0
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("erc: invalid settings: audit_db") and "unsupported database 'mysql'" in last


def test_an_unreachable_database_stops_the_worker_with_one_line(model_store: Path) -> None:
    url = f"postgresql://erc:pw@127.0.0.1:{free_port()}/erc"
    res = _erc(["audit-worker", "--wait", "1", "--db", url], {}, model_store)
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("erc: audit store postgresql://erc:***@127.0.0.1") and "refused" in last, last
    assert "gave up after --wait 1 s" in last and ":pw@" not in res.stderr


def _wait_status(c: httpx.Client, path: str, code: int, timeout: float = 60) -> httpx.Response:
    deadline = time.time() + timeout
    while (r := c.get(path, headers=AUTH)).status_code != code:
        assert time.time() < deadline, r.text
        time.sleep(0.25)
    return r


def test_predictions_keep_serving_while_the_store_is_down(model_store, tmp_path, mnist_sample) -> None:
    pg = start_postgres(durable=False)
    try:
        pg.stop()  # the API starts with its database down
        srv = launch.start_server(
            model_store,
            tmp_path / "api.log",
            env={
                "ERC_ADMIN_TOKEN": TOKEN,
                "ERC_AUDIT_DB": pg.url,
                "ERC_AUDIT_LOCAL_WORKER": "on",
                "ERC_AUDIT_HEARTBEAT_S": "0.5",
                "ERC_MODELS": "tiny",
                "ERC_TORCH_THREADS": "1",
            },
        )
        try:
            with srv.client() as c:

                def predict() -> int:
                    r = c.post(
                        "/v1/models/tiny:predict",
                        content=mnist_sample.pngs[0],
                        headers={"content-type": "image/png"},
                    )
                    return r.status_code

                ready = c.get("/readyz")
                assert ready.status_code == 200 and ready.json()["ready"], ready.text
                audits = ready.json()["audits"]
                assert audits["ok"] is False and "refused" in audits["error"] and ":***@" in audits["store"]
                r = c.get("/admin/audits", headers=AUTH)
                assert r.status_code == 503 and r.json()["error"]["code"] == "audit_store_unavailable"
                assert "refused" in r.json()["error"]["message"] and r.headers["retry-after"]
                assert c.post("/admin/audits", json=SMALL, headers=AUTH).status_code == 503
                assert predict() == 200
                assert "erc_audit_store_up 0.0" in c.get("/metrics").text

                pg.start()  # back: the store opens in the background, the local worker starts
                _wait_status(c, "/admin/audits", 200)
                assert c.get("/readyz").json()["audits"]["ok"] is True
                created = c.post("/admin/audits", json=SMALL, headers=AUTH)
                assert created.status_code == 202, created.text
                audit_id = created.json()["id"]
                deadline = time.time() + 240
                while (body := c.get(f"/admin/audits/{audit_id}", headers=AUTH).json())["status"] != "done":
                    assert body["status"] in ("queued", "running") and time.time() < deadline, body
                    time.sleep(0.3)

                pg.stop("immediate")  # down again, like a crash
                assert _wait_status(c, f"/admin/audits/{audit_id}", 503).json()["error"]["code"] == (
                    "audit_store_unavailable"
                )
                assert [predict() for _ in range(5)] == [200] * 5
                assert c.get("/readyz").status_code == 200
                pg.start()
                again = _wait_status(c, f"/admin/audits/{audit_id}", 200).json()
                assert again["status"] == "done" and again["result"]["clean"]["n"] == 20
        finally:
            assert srv.stop(), srv.log.read_text()[-3000:]
    finally:
        pg.destroy()
