"""Decoded-image caches and parallel decoding, shared by the readers of image files (Tiny ImageNet's
JPEG folders, image-folder datasets).

Decoding tens of thousands of image files takes a while, so readers decode once into uint8 arrays
and keep them as ``.npz`` files named ``<prefix>-<key>.npz``, where ``key`` hashes everything the
arrays depend on (file names, sizes, mtimes, labels, decoding options): any change to the files
gives a new key, and the stale file is removed when the new one is written. A cache is derived
data, never the source of truth: one that cannot be read or does not match is ignored and rebuilt.
Writes are atomic (temporary file, rename), so a killed process never leaves half a cache.

The user cache lives under ``$ERC_CACHE_DIR`` (default ``~/.cache/erc``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

__all__ = ["decode_parallel", "load_arrays", "store_arrays", "user_cache_dir", "user_cache_home"]

log = logging.getLogger(__name__)

_CHUNK = 256  # images per decode task: large enough to amortize the executor, small for progress


def user_cache_home() -> Path:
    """``$ERC_CACHE_DIR``, default ``~/.cache/erc``: the one per-user folder of the package."""
    return Path(os.environ.get("ERC_CACHE_DIR") or Path.home() / ".cache" / "erc").expanduser()


def user_cache_dir(kind: str, root: Path) -> Path:
    """``$ERC_CACHE_DIR/<kind>/<hash of root>`` (default base ``~/.cache/erc``)."""
    base = user_cache_home()
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return base / kind / tag


def load_arrays(
    folders: Sequence[Path],
    name: str,
    check: Callable[[Mapping[str, npt.NDArray[np.generic]]], str | None],
) -> dict[str, npt.NDArray[np.generic]] | None:
    """The arrays of the first readable ``folder/name`` that ``check`` accepts (it returns None, or
    why the file does not fit); None when there is none."""
    for folder in folders:
        path = folder / name
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # any unreadable cache is just a cache miss
            log.warning("ignoring unreadable cache %s: %s", path, exc)
            continue
        problem = check(arrays)
        if problem is not None:
            log.warning("ignoring cache %s: %s", path, problem)
            continue
        log.info("using cached decoded images %s", path)
        return arrays
    return None


def store_arrays(
    folders: Sequence[Path], prefix: str, key: str, arrays: Mapping[str, npt.NDArray[np.generic]]
) -> Path | None:
    """Write ``<prefix>-<key>.npz`` into the first writable folder (atomically) and delete that
    folder's older ``<prefix>-*.npz``; returns the path, or None when no folder is writable."""
    for folder in folders:
        tmp: str | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{prefix}-", suffix=".npz.tmp", dir=folder)
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache beside shared data should be readable
            final = folder / f"{prefix}-{key}.npz"
            os.replace(tmp, final)  # atomic: readers see the old file or the complete new one
            tmp = None
        except OSError as exc:
            log.warning("cannot cache decoded images in %s: %s", folder, exc)
            continue
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        for stale in folder.glob(f"{prefix}-*.npz"):
            if stale != final:  # an older key: the files changed since; free the space
                stale.unlink(missing_ok=True)
        log.info("cached decoded images in %s", final)
        return final
    return None


def decode_parallel(
    count: int, decode: Callable[[int], None], desc: str, *, progress: bool | None = None
) -> None:
    """Call ``decode(i)`` for ``i`` in ``range(count)`` on a few threads (Pillow releases the GIL
    while it decodes), with a progress bar (``progress=None``: only on a terminal)."""
    if not count:
        return

    def work(start: int) -> int:
        stop = min(start + _CHUNK, count)
        for i in range(start, stop):
            decode(i)
        return stop - start

    workers = min(8, os.cpu_count() or 1)
    disable = None if progress is None else not progress
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=count, desc=desc, unit="img", disable=disable) as bar,
    ):
        for done in pool.map(work, range(0, count, _CHUNK)):
            bar.update(done)
