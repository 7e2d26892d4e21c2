"""The attack-check child: a process started by a dispatcher thread of the attack pool
(:mod:`service.attack_check.pool`) through :func:`service.child.spawn`, long-lived, one check at a
time.

It sets itself up first (:func:`service.child.setup`: dies with the server, lowers its CPU
priority, and Linux's ``SCHED_IDLE`` when asked: it then gets a core only when prediction traffic
leaves one idle; its own torch thread count), then serves checks from its pipe. Models are loaded on
first use and kept; a model whose weights on disk no longer match the sha256 the server serves is
refused (the check must attack the served weights).

Messages: the pool sends a job dict (the :attack route's payload plus ``deadline_in_s``), or None
to stop; the child answers :class:`CheckDone`, :class:`CheckTimedOut` or
:class:`service.child.Failed`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from service.attack_check.check import CheckParams, DeadlineExceeded, from_uint8, run_check
from service.child import ChildSetup, Failed, load_served, setup


@dataclass(frozen=True)
class CheckDone:
    """Child -> pool: ``adversarial`` (uint8 ``[N, C, H, W]``), ``flipped``, ``smallest_units``,
    ``runs``, ``seconds`` (the pool adds ``queue_s``)."""

    result: dict[str, Any]


@dataclass(frozen=True)
class CheckTimedOut:
    """Child -> pool: the check ran past its deadline."""

    message: str


# What the pool may receive.
CheckMessage = CheckDone | CheckTimedOut | Failed


def main(conn: Connection, how: ChildSetup) -> None:
    """Entry point of the spawned process."""
    setup(how)
    models: dict[str, torch.nn.Module] = {}
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if job is None:
            return
        reply: CheckMessage
        try:
            reply = _serve(job, models)
        except DeadlineExceeded as exc:
            reply = CheckTimedOut(str(exc))
        except Exception as exc:  # the server must always hear how the job ended
            reply = Failed.of(exc)
        conn.send(reply)


def _serve(job: dict[str, Any], models: dict[str, torch.nn.Module]) -> CheckDone:
    t0 = time.monotonic()
    deadline = t0 + float(job["deadline_in_s"])
    sha = job["weights_sha256"]
    model = models.get(sha)
    if model is None:
        model, _ = load_served(job["model_dir"], sha, torch.device("cpu"), doing="attacking")
        models[sha] = model
    x = from_uint8(torch.from_numpy(job["clean"]))
    y = torch.from_numpy(job["labels"]).long()
    params = CheckParams(**job["params"])
    with torch.inference_mode(False):
        out = run_check(model, x, y, params, deadline=deadline)
    return CheckDone(
        {
            "adversarial": np.ascontiguousarray(out.adversarial.numpy()),
            "flipped": out.flipped,
            "smallest_units": out.smallest_units,
            "runs": out.runs,
            "seconds": time.monotonic() - t0,
        }
    )
