"""The audit child: the process that runs one audit, started by its audit worker
(:class:`service.audit.worker.AuditWorker`, in ``erc audit-worker`` or the API's local worker)
through :func:`service.child.spawn`: at a lower CPU priority, with its own torch thread count and
dying with its worker (:func:`service.child.setup`), so that an audit never starves prediction
traffic, a crash in it never takes its worker down, and a cancel terminates it.

It loads the model from the worker's model store and refuses to run if the weights' sha256
differs from the one the API served when the audit was requested (the audit must measure the
exact weights being served), runs the audit, and hands the result back; its worker, the lease
holder, writes it to the job store in one transaction. Messages to the worker, through a pipe:
:class:`AuditProgress` (every half second), then one of :class:`AuditDone` or
:class:`service.child.Failed`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from service.audit.engine import AuditSpec
from service.audit.report import render
from service.audit.runner import run_audit
from service.child import ChildSetup, Failed, load_served, setup
from service.imaging import unit_range
from training.card import ModelCard
from training.data import load_split
from training.devices import resolve_device


@dataclass(frozen=True)
class AuditProgress:
    """Child -> worker: :meth:`service.audit.engine.Progress.snapshot` (fraction, elapsed_s,
    remaining_s, stage), the worker's next heartbeat stores it."""

    snapshot: dict[str, Any]


@dataclass(frozen=True)
class AuditDone:
    """Child -> worker: the audit's result (JSON text) and its HTML report."""

    result_json: str
    report_html: str


# What the worker may receive.
AuditMessage = AuditProgress | AuditDone | Failed


def load_data(job: dict[str, Any], card: ModelCard) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    data = job["data"]
    if data["source"] == "upload":
        arrays = np.load(io.BytesIO(job["upload"]))
        # uint8 pixels as decoded (stores written before 2026-12-07 hold floats in [0, 1])
        x, y = unit_range(torch.from_numpy(arrays["x"])), torch.from_numpy(arrays["y"]).long()
        return x, y, {"source": "upload", "n": len(y)}
    name = data.get("dataset") or card.dataset
    split = load_split(
        name, "test", data.get("data_dir"), n=data["n"], seed=data["seed"], folder=card.folder_options()
    )
    return (
        split.as_float(),
        split.labels,
        {"source": "test", "dataset": name, "split": "test", "n": len(split), "seed": data["seed"]},
    )


def main(conn: Connection, how: ChildSetup, job: dict[str, Any]) -> None:
    """Entry point of the spawned process: set up as ``how`` says, then run ``job``."""
    try:
        setup(how)
        run(conn, job)
    except BaseException as exc:  # the worker must always hear how the audit ended
        conn.send(Failed.of(exc))
    finally:
        conn.close()


def run(conn: Connection, job: dict[str, Any]) -> None:
    """Run the audit ``job`` (the stored request plus ``id``, ``model_dir``, ``upload``,
    ``device``) and send its :class:`AuditProgress` and :class:`AuditDone` to ``conn``."""
    device = resolve_device(job["device"])
    model, card = load_served(job["model_dir"], job["weights_sha256"], device, doing="auditing")
    x, y, data_info = load_data(job, card)
    spec = AuditSpec.from_dict(job["spec"])
    info = {
        "name": card.name,
        "weights_sha256": card.weights_sha256,
        "arch": card.arch,
        "dataset": card.dataset,
        "method": card.method,
        "train_eps": card.train_eps,
        "label_names": list(card.label_names),
    }
    result = run_audit(
        model,
        x,
        y,
        spec,
        device=device,
        model_info=info,
        data_info=data_info,
        on_progress=lambda snapshot: conn.send(AuditProgress(snapshot)),
    )
    result["id"] = job["id"]
    conn.send(AuditDone(json.dumps(result), render(result)))
