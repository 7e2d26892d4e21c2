"""Crash-safe files: write to a temporary file in the same folder, fsync, then rename.

A reader (or a resumed run) therefore sees either the previous complete file or the new complete
file, never a half-written one, even if the process is killed or the disk fills up mid-write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

CHECKPOINT_FORMAT = "erc-checkpoint/1"
# File names in a run directory.
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
READABLE_FILE = 0o644
READABLE_DIR = 0o755


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path``; on clean exit fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600 files; what we write (checkpoints, cards, weights) is meant to be
        # read by other users too, e.g. a non-root service user in a container.
        os.fchmod(fd, READABLE_FILE)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None]) -> None:
    with atomic_open(path, "wb") as fh:
        writer(fh)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    atomic_write(path, lambda fh: torch.save({"format": CHECKPOINT_FORMAT, **state}, fh))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` (no pickle code execution)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an erc training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def network_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The network weights a checkpoint stands for (``load_checkpoint``'s dict): the moving
    average of the weights when the run kept one (``run.ema_decay``), else the trained weights.
    What ``erc export``, ``erc eval`` on a run directory and ``run.init_from`` read."""
    ema = state.get("ema")
    if ema:
        return dict(ema["model"])
    return dict(state["state"]["modules"]["model"])
