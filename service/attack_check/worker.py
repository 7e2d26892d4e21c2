"""An attack worker process: a child of the server (``spawn``), long-lived, one job at a time.

It lowers its own CPU priority first (nice, and Linux's ``SCHED_IDLE`` when asked: it then gets a
core only when prediction traffic leaves one idle), sets its torch thread count, and then serves
jobs from its pipe. Models are loaded on first use and kept; a model whose weights on disk no
longer match the sha256 the server serves is refused (the check must attack the served weights).

Messages: the parent sends a job dict (or None to stop); the worker answers ``("done", dict)``,
``("timeout", message)`` or ``("failed", message, traceback)``.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np
import torch

from service.attack_check.check import CheckParams, DeadlineExceeded, from_uint8, run_check
from training.formats import load_served


def _lower_priority(niceness: int, sched_idle: bool) -> None:
    # Both apply to this thread and to the threads it starts later (torch's pools among them).
    os.nice(niceness)
    if sched_idle and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def main(conn: Any, threads: int, niceness: int, sched_idle: bool) -> None:
    """Entry point of the spawned process."""
    _lower_priority(niceness, sched_idle)
    torch.set_num_threads(threads)
    models: dict[str, torch.nn.Module] = {}
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if job is None:
            return
        try:
            conn.send(_serve(job, models))
        except DeadlineExceeded as exc:
            conn.send(("timeout", str(exc)))
        except Exception as exc:  # the server must always hear how the job ended
            conn.send(("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=5)))


def _serve(job: dict[str, Any], models: dict[str, torch.nn.Module]) -> tuple[str, dict[str, Any]]:
    t0 = time.monotonic()
    deadline = t0 + float(job["deadline_in_s"])
    sha = job["weights_sha256"]
    model = models.get(sha)
    if model is None:
        model, card = load_served(job["model_dir"], torch.device("cpu"))
        if card.weights_sha256 != sha:
            raise RuntimeError(
                f"weights of {card.name} changed on disk ({card.weights_sha256[:12]}) since the server "
                f"loaded {sha[:12]}: not attacking other weights than those served"
            )
        models[sha] = model
    x = from_uint8(torch.from_numpy(job["clean"]))
    y = torch.from_numpy(job["labels"]).long()
    params = CheckParams(**job["params"])
    with torch.inference_mode(False):
        out = run_check(model, x, y, params, deadline=deadline)
    return (
        "done",
        {
            "adversarial": np.ascontiguousarray(out.adversarial.numpy()),
            "flipped": out.flipped,
            "smallest_units": out.smallest_units,
            "runs": out.runs,
            "seconds": time.monotonic() - t0,
        },
    )
