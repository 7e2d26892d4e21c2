"""Reader for STL-10's binary files (``stl10_binary/``).

``<split>_X.bin`` is raw uint8, 3 x 96 x 96 bytes per image: three colour planes (R, G, B), each
stored column-major (Fortran order, as the MATLAB tooling that made them writes arrays). Reading a
plane C-order therefore yields the transposed image, which is why the last two axes are swapped.
``<split>_y.bin`` holds one byte per image, the class 1..10. ``class_names.txt`` lists the
classes one per line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.core import DataError, DatasetInfo, ImageSet, from_numpy

__all__ = ["CLASS_NAMES_FILE", "SPLIT_FILES", "read_stl10_split"]

SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
}
CLASS_NAMES_FILE = "class_names.txt"


def _read(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing", path=path) from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}", path=path) from exc


def check_class_names(root: Path, info: DatasetInfo) -> None:
    """If ``class_names.txt`` is present it must list our label names in our order."""
    path = root / CLASS_NAMES_FILE
    if not path.is_file():
        return
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if names != info.label_names:
        raise DataError(
            f"{path}: class names {names} differ from {info.name}'s {info.label_names}", path=path
        )


def read_stl10_split(root: Path, split: str, info: DatasetInfo) -> ImageSet:
    """Images [N, 3, 96, 96] uint8 (upright) and labels [N] in 0..9 of one split from ``root``."""
    check_class_names(root, info)
    x_path, y_path = (root / name for name in SPLIT_FILES[split])
    raw = _read(x_path)
    per_image = info.channels * info.height * info.width
    if raw.size % per_image:
        raise DataError(
            f"{x_path}: size {raw.size} bytes is not a multiple of {per_image} (3 x 96 x 96); truncated?",
            path=x_path,
        )
    labels = _read(y_path)
    count = raw.size // per_image
    if labels.size != count:
        raise DataError(f"{y_path}: {labels.size} labels but {x_path} holds {count} images", path=y_path)
    if labels.size and (labels.min() < 1 or labels.max() > info.num_classes):
        raise DataError(
            f"{y_path}: labels span {labels.min()}..{labels.max()}, STL-10 labels are 1..{info.num_classes}",
            path=y_path,
        )
    # Planes are column-major: read as [N, C, W, H] and swap to [N, C, H, W] (copied contiguous).
    images = np.ascontiguousarray(
        raw.reshape(count, info.channels, info.width, info.height).transpose(0, 1, 3, 2)
    )
    return from_numpy(images, labels.astype(np.int64) - 1, info)
