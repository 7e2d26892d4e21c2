"""The admin audit API on a real server: auth, limits, progress, results, report rendering in
headless Chromium, cancel, queueing, metrics, and prediction traffic during an audit."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from service.audit.report import style_hash

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SMALL = {
    "model": "tiny",
    "data": {"n": 120, "seed": 3},
    "eps": [0, 0.1, 0.3],
    "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 5}}],
}


@pytest.fixture(scope="module")
def admin_server(model_store, tmp_path_factory, start_server_fn):
    srv = start_server_fn(
        model_store,
        tmp_path_factory.mktemp("logs"),
        ERC_ADMIN_TOKEN=TOKEN,
        ERC_MODELS="tiny,big",
        ERC_DEFAULT_MODEL="tiny",
        ERC_AUDIT_DB=f"sqlite:///{tmp_path_factory.mktemp('audits')}/audits.db",
        ERC_AUDIT_MAX_QUEUED="1",
        ERC_AUDIT_MAX_N="2000",
        ERC_AUDIT_MAX_WORK="3e6",
    )
    yield srv
    assert srv.stop(), srv.log.read_text()[-3000:]


def _cmdline(p: psutil.Process) -> list[str]:
    """A child's command line; a finished audit's process may linger as a zombie (or be gone)
    until its job thread joins it."""
    try:
        return p.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return []


def _wait(c: httpx.Client, audit_id: str, until: tuple[str, ...], timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while True:
        body = c.get(f"/admin/audits/{audit_id}", headers=AUTH).json()
        if body["status"] in until:
            return body
        assert time.time() < deadline, body
        time.sleep(0.3)


def test_admin_routes_are_absent_without_a_token(server) -> None:
    with server.client() as c:
        for method, path in (
            ("GET", "/admin/audits"),
            ("POST", "/admin/audits"),
            ("GET", "/admin/audits/x"),
            ("DELETE", "/admin/audits/x"),
        ):
            r = c.request(method, path, headers=AUTH, json=SMALL if method == "POST" else None)
            assert r.status_code == 404, (method, path, r.text)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
)
def test_wrong_or_missing_token_is_401(admin_server, headers) -> None:
    with admin_server.client() as c:
        r = c.get("/admin/audits", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_audit_end_to_end(admin_server, tmp_path: Path, screenshot_html) -> None:
    with admin_server.client() as c:
        r = c.post("/admin/audits", json=SMALL, headers=AUTH)
        assert r.status_code == 202, r.text
        created = r.json()
        audit_id = created["id"]
        assert len(audit_id) == 32 and int(audit_id, 16) >= 0, "128-bit random hex id"
        assert r.headers["location"] == f"/admin/audits/{audit_id}"
        early = c.get(f"/admin/audits/{audit_id}", headers=AUTH).json()
        assert early["status"] in ("queued", "running", "done")
        body = _wait(c, audit_id, ("done", "failed"))
        assert body["status"] == "done", body
        res = body["result"]
        assert body["progress"]["fraction"] == 1.0
        assert res["model"]["name"] == "tiny" and len(res["model"]["weights_sha256"]) == 64
        assert res["data"] == {"source": "test", "dataset": "mnist", "split": "test", "n": 120, "seed": 3}
        assert [row["eps"] for row in res["per_eps"]] == [0.0, 0.1, 0.3]
        for row in res["per_eps"]:
            u = row["union"]
            assert u["ci95"][0] <= u["accuracy"] <= u["ci95"][1]
            assert u["accuracy"] <= min(a["accuracy"] for a in row["attacks"].values()) + 1e-9
        assert set(res["per_eps"][2]["attacks"]) == {"FGSM", "PGD-5"}
        assert res["per_eps"][2]["attacks"]["PGD-5"]["distortion"]["count"] >= 0
        assert {c["name"] for c in res["checks"]} >= {
            "eps_zero_is_clean",
            "inside_ball_and_box",
            "converged",
            "large_eps_breaks_everything",
            "zero_gradients",
        }
        assert all(c["status"] in ("pass", "warn", "fail") and c["message"] for c in res["checks"])
        assert res["environment"]["device"] == "cpu" and res["environment"]["torch"]
        assert res["seeds"] == {"attacks": 0, "data": 3} and res["timings_s"]["total"] > 0
        assert res["embedding"]["embed_dim"] == 4 and len(res["embedding"]["clean"]) > 0
        listing = c.get("/admin/audits", headers=AUTH).json()["audits"]
        assert audit_id in [a["id"] for a in listing]
        report = c.get(f"/admin/audits/{audit_id}/report", headers=AUTH)
        assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
        assert "Robustness audit: tiny" in report.text and "data:image/png;base64," in report.text
        # Served under a strict CSP that still lets its own style block and inline PNGs through.
        policy = report.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "img-src data:" in policy
        assert style_hash() in policy and "<script" not in report.text
        # The store's gauges are a snapshot refreshed every ERC_AUDIT_HEARTBEAT_S (a scrape never
        # waits on the database).
        deadline = time.time() + 30
        while 'erc_audit_robust_accuracy{attack="union",eps="0.3",model="tiny"}' not in (
            metrics := c.get("/metrics").text
        ):
            assert time.time() < deadline, metrics[-3000:]
            time.sleep(0.5)
    assert 'erc_audits_total{status="done"}' in metrics
    assert "erc_audit_store_up 1.0" in metrics and "erc_audit_queue_depth 0.0" in metrics
    assert 'erc_audit_attempts_total{outcome="done"}' in metrics
    screenshot_html(report.text, tmp_path)


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ({**SMALL, "model": "nope"}, 404, "nope"),
        ({**SMALL, "data": {"n": 5000}}, 413, "limit is 2000"),
        (
            {**SMALL, "data": {"n": 2000}, "attacks": [{"name": "pgd", "params": {"steps": 1000}}]},
            413,
            "ERC_AUDIT_MAX_WORK",
        ),
        ({**SMALL, "attacks": [{"name": "deepfool"}]}, 422, "attacks"),
        ({**SMALL, "attacks": [{"name": "pgd", "params": {"stepz": 5}}]}, 422, "stepz"),
        ({**SMALL, "attacks": [{"name": "pgd", "params": {"steps": 0}}]}, 422, "positive integer"),
        ({**SMALL, "attacks": [{"name": "pgd", "params": {"alpha": "x"}}]}, 422, "finite number"),
        ({**SMALL, "attacks": [{"name": "fgsm"}], "norm": "l2"}, 422, "attack 'fgsm' works in linf, not l2"),
        (
            {**SMALL, "attacks": [{"name": "square"}], "norm": "l2"},
            422,
            "attack 'square' works in linf, not l2",
        ),
        ({**SMALL, "attacks": [{"name": "cw"}]}, 422, "attack 'cw' works in l2, not linf"),
        ({**SMALL, "attacks": [{"name": "autoattack"}, {"name": "pgd"}]}, 422, "runs alone"),
        ({**SMALL, "attacks": [{"name": "autoattack"}], "norm": "l2"}, 422, "linf, not l2"),
        ({**SMALL, "attacks": [{"name": "adaptive-pgd"}]}, 422, "attacks"),
        ({**SMALL, "eps": [0, 1.5]}, 422, "outside [0, 1]"),
        ({**SMALL, "eps": []}, 422, "eps"),
        ({**SMALL, "data": {"source": "upload"}}, 422, "instances"),
        (
            {**SMALL, "data": {"source": "upload", "instances": [{"b64": "aGk="}], "labels": [12]}},
            422,
            "labels",
        ),
        ({**SMALL, "precision": "fp8"}, 422, "precision"),
    ],
)
def test_invalid_or_oversized_audits_are_refused(admin_server, body, status, fragment) -> None:
    with admin_server.client() as c:
        r = c.post("/admin/audits", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"], r.json()


def test_uploaded_images_are_audited(admin_server, mnist_sample) -> None:
    import base64

    body = {
        **SMALL,
        "data": {
            "source": "upload",
            "instances": [{"b64": base64.b64encode(p).decode()} for p in mnist_sample.pngs[:20]],
            "labels": mnist_sample.labels[:20].tolist(),
        },
    }
    with admin_server.client() as c:
        r = c.post("/admin/audits", json=body, headers=AUTH)
        assert r.status_code == 202, r.text
        done = _wait(c, r.json()["id"], ("done", "failed"))
    assert done["status"] == "done", done
    assert done["result"]["data"] == {"source": "upload", "n": 20}
    assert done["result"]["clean"]["n"] == 20


def test_cancel_queue_and_prediction_traffic_during_an_audit(admin_server, mnist_sample) -> None:
    long = {
        "model": "big",
        "data": {"n": 300},
        "eps": [0.1, 0.2, 0.3],
        "attacks": [{"name": "pgd", "params": {"steps": 200}}],
        "checks": False,
    }
    with admin_server.client() as c:
        first = c.post("/admin/audits", json=long, headers=AUTH)
        assert first.status_code == 202, first.text
        running = _wait(c, first.json()["id"], ("running",), timeout=60)
        second = c.post("/admin/audits", json=long, headers=AUTH)
        assert second.status_code == 202 and second.json()["status"] == "queued"
        third = c.post("/admin/audits", json=long, headers=AUTH)
        assert third.status_code == 409 and third.json()["error"]["code"] == "conflict"

        # Prediction traffic keeps flowing while the audit process works (it runs niced).
        def predict(i: int) -> int:
            with httpx.Client(base_url=admin_server.url, timeout=60) as cl:
                r = cl.post(
                    "/v1/models/tiny:predict",
                    content=mnist_sample.pngs[i % 64],
                    headers={"content-type": "image/png"},
                )
                return r.status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(predict, range(64)))
        assert codes == [200] * 64
        # Progress moves within the first batch (every attack step is metered) ...
        deadline = time.time() + 60
        while (progress := c.get(f"/admin/audits/{running['id']}", headers=AUTH).json()["progress"])[
            "fraction"
        ] == 0:
            assert time.time() < deadline, progress
            time.sleep(0.3)
        assert 0 < progress["fraction"] < 1 and progress["elapsed_s"] > 0
        assert progress["stage"] == "PGD-200" and progress["remaining_s"] > 0
        # ... and the audit process runs under SCHED_IDLE at nice 10 (the defaults).
        children = psutil.Process(admin_server.proc.pid).children(recursive=True)
        workers = [p for p in children if "spawn_main" in " ".join(_cmdline(p))]
        assert workers, [_cmdline(p) for p in children]
        assert all(p.nice() == 10 for p in workers)
        assert all(os.sched_getscheduler(p.pid) == os.SCHED_IDLE for p in workers)

        r = c.delete(f"/admin/audits/{second.json()['id']}", headers=AUTH)
        assert r.json()["status"] == "cancelled"
        r = c.delete(f"/admin/audits/{running['id']}", headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
        ended = _wait(c, running["id"], ("cancelled", "done", "failed"), timeout=60)
        assert ended["status"] == "cancelled"
        again = c.delete(f"/admin/audits/{running['id']}", headers=AUTH)
        assert again.status_code == 409
        report = c.get(f"/admin/audits/{running['id']}/report", headers=AUTH)
        assert report.status_code == 409
        assert c.get("/admin/audits/0123", headers=AUTH).status_code == 404
