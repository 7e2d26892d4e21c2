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
from training.data.datasets import (
    SPLITS,
    DatasetSpec,
    FileSpec,
    Resource,
    download_hint,
    register,
    whole_split,
)

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


# The STL-10 spec (:mod:`training.data.datasets`): registered when :mod:`training.data` imports this
# module.
_STL_MD5 = {
    "train_X.bin": "918c2871b30a85fa023e0c44e0bee87f",
    "train_y.bin": "5a34089d4802c674881badbb80307741",
    "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82",
    "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e",
}
# Exact per-channel statistics of the training images in [0, 1].
_STL10_MEAN, _STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)

register(
    DatasetSpec(
        info=DatasetInfo(
            name="stl10",
            channels=3,
            height=96,
            width=96,
            num_classes=10,
            label_names=("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
            train_eps=0.03,  # paper, appendix "Epsilon selection"
            mean=_STL10_MEAN,
            std=_STL10_STD,
        ),
        reader=whole_split(read_stl10_split),
        files=(
            *(FileSpec((f,), md5=_STL_MD5[f]) for split in SPLITS for f in SPLIT_FILES[split]),
            FileSpec((CLASS_NAMES_FILE,), required=False),
        ),
        base_url="http://ai.stanford.edu/~acoates/stl10/",
        resources=(Resource("stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb", archive=True),),
        folder="stl10_binary",
        how_to_get=download_hint("stl10"),
        aliases=("stl-10",),
        order=40,
    )
)
