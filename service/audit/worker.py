"""The audit process: a child of an audit worker (``erc audit-worker``, or the API's local worker),
started with ``spawn``, at a lower CPU priority and with its own torch thread count, so that an
audit never starves prediction traffic and a crash in it never takes its parent down; a cancel
terminates it.

It loads the model from the worker's model store and refuses to run if the weights' sha256
differs from the one the API served when the audit was requested (the audit must measure the
exact weights being served), runs the audit, and hands the result back; its parent, the lease
holder, writes it to the job store in one transaction. Messages to the parent go through a pipe:
``("progress", dict)``, ``("done", result_json, report_html)`` or ``("failed", message, traceback)``.
"""

from __future__ import annotations

import io
import json
import os
import threading
import traceback
from typing import Any

import numpy as np
import torch

from service.audit.engine import AuditSpec, Progress
from service.audit.report import render
from service.audit.runner import checks_cost, run_audit
from training.card import ModelCard
from training.data import load_split
from training.devices import resolve_device
from training.formats import load_served


def load_data(job: dict[str, Any], card: ModelCard) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    data = job["data"]
    if data["source"] == "upload":
        arrays = np.load(io.BytesIO(job["upload"]))
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]).long()
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


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the worker that started it dies (kill -9, OOM killer), so
    an orphaned attack does not go on burning the device while another worker re-runs the audit."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the lease still hands the audit to another worker
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def main(job: dict[str, Any], conn: Any) -> None:
    """Entry point of the spawned process."""
    try:
        _die_with_parent()
        # Both apply to this thread and to the threads it starts later (torch's pools among them).
        os.nice(int(job.get("niceness", 10)))
        if job.get("sched_idle") and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        device = resolve_device(job["device"])
        model, card = load_served(job["model_dir"], device)
        if card.weights_sha256 != job["weights_sha256"]:
            raise RuntimeError(
                f"weights of {card.name} changed on disk ({card.weights_sha256[:12]}) since the server "
                f"loaded {job['weights_sha256'][:12]}: not auditing other weights than those served"
            )
        x, y, data_info = load_data(job, card)
        spec = AuditSpec.from_dict(job["spec"])
        progress = Progress(total=spec.work(len(x)) + checks_cost(spec, len(x)))
        stop = threading.Event()

        def report_progress() -> None:
            while not stop.wait(0.5):
                conn.send(("progress", progress.snapshot()))

        reporter = threading.Thread(target=report_progress, daemon=True)
        reporter.start()
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
            model, x, y, spec, device=device, model_info=info, data_info=data_info, progress=progress
        )
        stop.set()
        reporter.join()
        result["id"] = job["id"]
        conn.send(("done", json.dumps(result), render(result)))
    except BaseException as exc:  # the parent must always hear how the audit ended
        conn.send(("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=5)))
    finally:
        conn.close()
