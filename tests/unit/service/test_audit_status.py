"""Audit states are one enum (service/audit/status.py): the store, the metrics and the API use
it, the OpenAPI document lists its values, and the console takes what each state allows from the
API (``statuses`` of ``GET /admin/audits``) instead of lists of its own."""

from __future__ import annotations

import re
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.audit.status import ACTIVE, FINISHED, PENDING, JobStatus, status_groups
from service.settings import Settings

TOKEN = "status-test-token"
CONSOLE = Path(__file__).resolve().parents[3] / "service" / "static" / "console"


def test_wire_values_unchanged() -> None:
    assert [s.value for s in JobStatus] == ["queued", "running", "cancelling", "done", "failed", "cancelled"]
    assert set(PENDING) | set(FINISHED) == set(JobStatus) and not set(PENDING) & set(FINISHED)
    assert set(ACTIVE) < set(PENDING)


def test_the_api_publishes_the_states(tmp_path: Path) -> None:
    settings = Settings(
        model_store=tmp_path / "store",
        admin_token=TOKEN,
        audit_db=f"sqlite:///{tmp_path / 'audits.db'}",
        audit_local_worker="off",
    )
    (tmp_path / "store").mkdir()
    app = create_app(settings)
    schema = app.openapi()["components"]["schemas"]
    assert schema["JobStatus"]["enum"] == [s.value for s in JobStatus]
    assert schema["AuditCreated"]["properties"]["status"] == {"$ref": "#/components/schemas/JobStatus"}
    with TestClient(app) as client:
        deadline = time.time() + 30
        while (
            r := client.get("/admin/audits", headers={"Authorization": f"Bearer {TOKEN}"})
        ).status_code == 503:
            assert time.time() < deadline, r.text  # the store opens in the background
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        assert r.json() == {"audits": [], "statuses": status_groups()}


def test_the_console_keeps_no_status_list() -> None:
    js = (CONSOLE / "console.js").read_text() + (CONSOLE / "index.html").read_text()
    literals = set(re.findall(r"""["'`]([a-z]+)["'`]""", js))
    assert not literals & {s.value for s in JobStatus}, literals & {s.value for s in JobStatus}
    assert not re.search(r"""status\s*[!=]==?\s*["']""", js)
    assert "statuses." in js
