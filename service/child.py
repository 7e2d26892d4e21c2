"""The service's spawned child processes, started and set up in one place.

Two kinds of work run in a child process rather than in the process that asks for it:

- the **audit child** (:mod:`service.audit.child`), started by an audit worker
  (:class:`service.audit.worker.AuditWorker`) for one audit;
- the **attack-check child** (:mod:`service.attack_check.child`), started by a dispatcher thread of
  the attack pool (:mod:`service.attack_check.pool`), long-lived, one check at a time.

Both are started with :func:`spawn` (the ``spawn`` start method: no fork of the parent's threads)
and begin with :func:`setup`, which applies a :class:`ChildSetup`:

- **dies with its parent** (Linux ``PR_SET_PDEATHSIG``): after a ``kill -9`` of the parent, an
  orphaned child does not go on burning the CPU or GPU (an audit would run twice while another
  worker re-runs it). The signal follows the *thread* that started the child, so the parent starts
  it from a thread that lives as long as the child is wanted (the worker's loop, a dispatcher);
- **lowers its own CPU priority** (nice, and ``SCHED_IDLE`` when asked: it then gets a core only
  when prediction traffic leaves one idle);
- **sets its torch thread count**.

Models are loaded with :func:`load_served`, which refuses weights whose sha256 differs from the one
the server serves (a child must measure the exact weights being served).

Messages between parent and child are small typed records (frozen dataclasses, pickled through the
pipe), never tuples read by index: :class:`Failed` is common to both children; each child module
declares its own others.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from training.card import ModelCard


@dataclass(frozen=True)
class ChildSetup:
    """How a child process sets itself up before any work (see the module docstring)."""

    niceness: int = 10  # added to the inherited niceness (0 leaves it)
    sched_idle: bool = False  # Linux SCHED_IDLE: a core only when nothing else wants one
    threads: int | None = None  # torch's intra-op threads (None: torch's default)
    die_with_parent: bool = True  # SIGKILL when the starting thread's process dies


@dataclass(frozen=True)
class Failed:
    """Child -> parent: the work ended with an exception (``message`` is ``"Type: text"``)."""

    message: str
    traceback: str = ""

    @classmethod
    def of(cls, exc: BaseException) -> Failed:
        return cls(f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=5))


def spawn(
    target: Callable[..., None], setup: ChildSetup, *args: Any, name: str, duplex: bool
) -> tuple[BaseProcess, Connection]:
    """Start ``target(conn, setup, *args)`` in a spawned daemon process; returns the process and the
    parent's end of the pipe (``duplex=False``: the child only sends)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=duplex)
    proc = ctx.Process(target=target, args=(child, setup, *args), name=name, daemon=True)
    proc.start()
    child.close()
    return proc, parent


def setup(s: ChildSetup) -> None:
    """In the child, first thing: apply ``s``."""
    import torch

    if s.die_with_parent:
        _die_with_parent()
    # Both apply to this thread and to the threads it starts later (torch's pools among them).
    os.nice(s.niceness)
    if s.sched_idle and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if s.threads:
        torch.set_num_threads(s.threads)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (kill -9, OOM killer)."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: leases and deadlines still end the work
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def load_served(
    model_dir: str | Path, weights_sha256: str, device: torch.device, *, doing: str
) -> tuple[torch.nn.Module, ModelCard]:
    """Load the store model in ``model_dir``, refusing weights other than those the server serves
    (``doing``: what the child would do with them, for the message, e.g. ``"auditing"``)."""
    from training.formats import load_served as load_store_model

    model, card = load_store_model(model_dir, device)
    if card.weights_sha256 != weights_sha256:
        raise RuntimeError(
            f"weights of {card.name} changed on disk ({card.weights_sha256[:12]}) since the server "
            f"loaded {weights_sha256[:12]}: not {doing} other weights than those served"
        )
    return model, card
