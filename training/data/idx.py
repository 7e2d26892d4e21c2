"""Reader for the IDX files of MNIST and Fashion-MNIST (LeCun's format, gzipped or not).

An IDX file is a 4-byte big-endian magic ``00 00 <type> <ndim>`` (type 0x08 = unsigned byte),
``ndim`` big-endian uint32 sizes, then the data in C order. Images are magic 2051 (0x00000803,
sizes N, 28, 28), labels magic 2049 (0x00000801, size N). Everything is checked: the magic, the
sizes, that the payload holds exactly prod(sizes) bytes (a truncated or over-long file is an
error, not something to silently crop), that image and label counts agree and that every label
is a valid class.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from training.data.core import DataError, DatasetInfo, ImageSet, from_numpy

__all__ = ["IDX_STEMS", "IMAGES_MAGIC", "LABELS_MAGIC", "read_idx", "read_idx_split", "variants"]

IMAGES_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dimension
_UBYTE = 0x08

# split -> (images stem, labels stem); each stem is found as "<stem>.gz" or "<stem>".
IDX_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def variants(stem: str) -> tuple[str, str]:
    """File names a stem may have on disk, preferred first: the distributed ``.gz`` and the raw file."""
    return (f"{stem}.gz", stem)


def _find(root: Path, stem: str) -> Path:
    for name in variants(stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"{root / variants(stem)[0]}: missing (neither {' nor '.join(variants(stem))} is in {root})",
        path=root / variants(stem)[0],
    )


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when its name ends in ``.gz``; any decoding failure is a DataError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}", path=path) from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    # A truncated stream raises EOFError, a damaged one BadGzipFile (bad header, CRC or trailing
    # garbage) or zlib.error (bad deflate data).
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip stream: {exc}", path=path) from exc


def read_idx(path: Path, magic: int, item_shape: tuple[int, ...] = ()) -> npt.NDArray[np.uint8]:
    """Parse one IDX file of unsigned bytes.

    ``magic`` is the expected magic number; ``item_shape`` the expected sizes after the first
    (``(28, 28)`` for images, ``()`` for labels). Returns a writable uint8 array of shape
    [N, *item_shape].
    """
    data = read_bytes(path)
    ndim = 1 + len(item_shape)
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes)", path=path)
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(
            f"{path}: wrong IDX magic 0x{found:08x} ({found}), expected 0x{magic:08x} ({magic})", path=path
        )
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)", path=path)
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if tuple(dims[1:]) != item_shape:
        raise DataError(
            f"{path}: IDX sizes {dims}, expected (N, {', '.join(map(str, item_shape))})", path=path
        )
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header
    if payload != expected:
        what = "truncated" if payload < expected else "trailing bytes"
        raise DataError(
            f"{path}: {what}: payload is {payload} bytes, sizes {dims} need exactly {expected}", path=path
        )
    # copy(): frombuffer over `bytes` is read-only, and torch wants writable memory.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_split(root: Path, split: str, info: DatasetInfo) -> ImageSet:
    """Images [N, 1, H, W] uint8 and labels [N] int64 of one split from the IDX files in ``root``."""
    image_stem, label_stem = IDX_STEMS[split]
    image_path, label_path = _find(root, image_stem), _find(root, label_stem)
    images = read_idx(image_path, IMAGES_MAGIC, (info.height, info.width))
    labels = read_idx(label_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{label_path}: {len(labels)} labels but {image_path} holds {len(images)} images", path=label_path
        )
    if len(labels) and int(labels.max()) >= info.num_classes:
        bad = int(np.argmax(labels >= info.num_classes))
        raise DataError(
            f"{label_path}: label {int(labels[bad])} at index {bad} is not a class of {info.name} "
            f"(0..{info.num_classes - 1})",
            path=label_path,
        )
    return from_numpy(images[:, None], labels, info)
