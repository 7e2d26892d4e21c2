"""Results in parts small enough for the trip back from a GPU machine, and back into a folder."""

from __future__ import annotations

import tarfile
from pathlib import Path


def pack(out: Path, dest: Path, part_mb: int = 15) -> None:
    """results.tar.gz (everything but run directories and checkpoints) and the exported model
    store as ``model.tar.partN`` pieces of at most ``part_mb`` MB."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "results.tar.gz", "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            rel = path.relative_to(out)
            if path.is_file() and rel.parts[0] not in ("runs", "model_store"):
                tar.add(path, arcname=str(rel))
    store = out / "model_store"
    if store.is_dir():
        tmp = dest / "model.tar"
        with tarfile.open(tmp, "w") as tar:
            tar.add(store, arcname="model_store")
        data = tmp.read_bytes()
        tmp.unlink()
        size = part_mb * 1024 * 1024
        for i in range(0, len(data), size):
            (dest / f"model.tar.part{i // size}").write_bytes(data[i : i + size])


def unpack(src: Path, out: Path) -> None:
    """Inverse of :func:`pack`."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / "results.tar.gz") as tar:
        tar.extractall(out, filter="data")
    parts = sorted(src.glob("model.tar.part*"), key=lambda p: int(p.name.removeprefix("model.tar.part")))
    if parts:
        tmp = out / "model.tar"
        tmp.write_bytes(b"".join(p.read_bytes() for p in parts))
        with tarfile.open(tmp) as tar:
            tar.extractall(out, filter="data")
        tmp.unlink()
