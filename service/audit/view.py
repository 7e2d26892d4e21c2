"""The public JSON view of an audit job: what ``GET /admin/audits[/{id}]`` answers for a store
record (times as ISO 8601, progress, links) and the figures of a result the Prometheus gauges
export. No store, no process: plain functions over the records the store returns."""

from __future__ import annotations

import time
from typing import Any

from service.audit.status import ACTIVE, JobStatus


def iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def summary(rec: dict[str, Any]) -> dict[str, Any]:
    """The public view of a store record (``GET /admin/audits/{id}`` without the result)."""
    status = rec["status"]
    out: dict[str, Any] = {
        "id": rec["id"],
        "model": rec["model"],
        "status": status,
        "created": iso(rec["created"]),
        "started": iso(rec["started"]),
        "finished": iso(rec["finished"]),
        "request": rec["job"]["request"],
        "estimated_work": rec["job"]["work"],
        "attempts": rec["attempts"],
        "max_attempts": rec["max_attempts"],
    }
    if status in ACTIVE:
        out["worker"] = rec["worker"]
        out["progress"] = rec["progress"] or {
            "fraction": 0.0,
            "elapsed_s": None,
            "remaining_s": None,
            "stage": "starting the audit process",
        }
    elif status == JobStatus.DONE:
        out["progress"] = {
            "fraction": 1.0,
            "elapsed_s": round((rec["finished"] or 0) - (rec["started"] or 0), 1),
            "remaining_s": 0.0,
            "stage": "done",
        }
    if rec["history"]:
        out["history"] = rec["history"]
    if rec["error"]:
        out["error"] = rec["error"]
    out["links"] = {"self": f"/admin/audits/{rec['id']}", "report": f"/admin/audits/{rec['id']}/report"}
    return out


def metric_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of a result the Prometheus gauges export (stored beside it)."""
    robust = []
    for row in result["per_eps"]:
        eps = f"{row['eps']:g}"
        robust.append({"eps": eps, "attack": "union", "accuracy": row["union"]["accuracy"]})
        robust += [{"eps": eps, "attack": k, "accuracy": v["accuracy"]} for k, v in row["attacks"].items()]
    return {
        "clean_accuracy": result["clean"]["accuracy"],
        "duration_s": result["timings_s"]["total"],
        "robust": robust,
    }
