#!/usr/bin/env python
"""Image-folder reading speed: how long a folder of your own images takes to become the training
loop's uint8 arrays, the first time (header probes, decoding through the service's decoder on a few
threads, the cache written) and every time after (the cache read), and what ``erc data info``
(headers only) and ``erc data check`` (every image decoded) cost on it.

Two folders it writes itself (or ``--folder DIR`` for yours):

- ``fashion``: ``--n`` Fashion-MNIST training images as 28x28 greyscale PNG class folders (the
  size they are trained at: no resizing);
- ``photos``: ``--n`` synthetic 160x120 RGB JPEGs (smooth gradients and noise, quality 90)
  decoded to 64x64 RGB (``--size 64``: the resize path of camera-style data).

    python bench/folder.py                      # both, 10,000 images each (about a minute here)
    python bench/folder.py --folder ~/photos --size 64

The last output line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import log, machine

from training.data import FolderOptions, load_split
from training.data.folder import check_folder, load_folder, parse_size


def write_fashion(root: Path, n: int) -> None:
    data = load_split("fashion-mnist", "train", n=n, seed=0)
    names = [name.replace("/", "-") for name in data.info.label_names]
    for i, (img, y) in enumerate(zip(data.images[:, 0].numpy(), data.labels.tolist(), strict=True)):
        (root / names[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / names[y] / f"{i:05d}.png")


def write_photos(root: Path, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:160]
    for i in range(n):
        c = i % classes
        base = np.stack([xx * (c + 1) % 256, yy * (classes - c) % 256, (xx + yy) % 256], -1)
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)


def measure(root: Path, size: tuple[int, int] | None, cache: Path) -> dict[str, Any]:
    os.environ["ERC_CACHE_DIR"] = str(cache)
    files = sum(1 for p in root.rglob("*") if p.is_file())
    nbytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    info = check_folder(root, decode=False, size=size, progress=False)
    t_info = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_folder(root, decode=True, size=size, progress=False)
    t_check = time.perf_counter() - t0
    options = FolderOptions(size=size, progress=False)
    t0 = time.perf_counter()
    cold = load_folder(root, options)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = load_folder(root, options)
    t_warm = time.perf_counter() - t0
    n = len(cold.train) + len(cold.test)
    assert n == len(warm.train) + len(warm.test) == files
    cache_bytes = sum(p.stat().st_size for p in cache.rglob("*.npz"))
    return {
        "images": n,
        "bytes_on_disk": nbytes,
        "decoded_shape": list(cold.info.shape),
        "sizes": info["sizes"],
        "data_info_s": round(t_info, 2),
        "data_check_s": round(t_check, 2),
        "first_load_s": round(t_cold, 2),
        "first_load_images_per_s": round(n / t_cold),
        "cached_load_s": round(t_warm, 3),
        "cache_bytes": cache_bytes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="images per written folder")
    p.add_argument("--folder", help="measure this folder instead of writing two")
    p.add_argument("--size", help="N or WIDTHxHEIGHT (with --folder)")
    args = p.parse_args()
    results: dict[str, Any] = {"machine": machine(), "threads": min(8, os.cpu_count() or 1)}
    with tempfile.TemporaryDirectory(prefix="erc-bench-folder-") as tmp:
        work = Path(tmp)
        if args.folder:
            results["folder"] = measure(Path(args.folder).expanduser(), parse_size(args.size), work / "c")
        else:
            write_fashion(work / "fashion", args.n)
            write_photos(work / "photos", args.n)
            results["fashion"] = measure(work / "fashion", None, work / "c1")
            results["photos"] = measure(work / "photos", (64, 64), work / "c2")
    for name, r in results.items():
        if isinstance(r, dict) and "images" in r:
            log(
                f"{name}: {r['images']} images {r['sizes']} -> {r['decoded_shape']}: "
                f"info {r['data_info_s']} s, check {r['data_check_s']} s, first load {r['first_load_s']} s "
                f"({r['first_load_images_per_s']} images/s), cached {r['cached_load_s']} s"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
