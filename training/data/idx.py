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
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

from training.data.core import DataError, DatasetInfo, ImageSet, from_numpy
from training.data.datasets import DatasetSpec, FileSpec, Resource, download_hint, register, whole_split

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


# The IDX sets' specs (:mod:`training.data.datasets`): registered when :mod:`training.data` imports
# this module.


def _idx_files(md5: Mapping[str, str], content_md5: Mapping[str, str]) -> tuple[FileSpec, ...]:
    stems = [stem for pair in IDX_STEMS.values() for stem in pair]
    return tuple(FileSpec(variants(s), md5=md5[s], content_md5=content_md5[s]) for s in stems)


# md5 of the .gz files as published (torchvision's list) and of their decompressed content: the
# latter recognizes re-compressed copies such as the Debian package's, whose gzip headers differ.
_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
_MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
_FASHION_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
_FASHION_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}

register(
    DatasetSpec(
        info=DatasetInfo(
            name="mnist",
            channels=1,
            height=28,
            width=28,
            num_classes=10,
            label_names=tuple(str(d) for d in range(10)),
            train_eps=0.3,  # paper, appendix "Epsilon selection"
            mean=None,
            std=None,
        ),
        reader=whole_split(read_idx_split),
        files=_idx_files(_MNIST_MD5, _MNIST_RAW_MD5),
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        resources=tuple(Resource(f"{s}.gz", m) for s, m in _MNIST_MD5.items()),
        layouts=("MNIST/raw",),
        how_to_get=download_hint("mnist"),
        order=10,
    )
)
register(
    DatasetSpec(
        info=DatasetInfo(
            name="fashion-mnist",
            channels=1,
            height=28,
            width=28,
            num_classes=10,
            label_names=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            # Not in the paper (it has no Fashion-MNIST experiments): 0.1 is the radius commonly
            # used for adversarial training on Fashion-MNIST, whose textures break down at 0.3.
            train_eps=0.1,
            mean=None,
            std=None,
        ),
        reader=whole_split(read_idx_split),
        files=_idx_files(_FASHION_MD5, _FASHION_RAW_MD5),
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        resources=tuple(Resource(f"{s}.gz", m) for s, m in _FASHION_MD5.items()),
        layouts=("FashionMNIST/raw",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        how_to_get=download_hint(
            "fashion-mnist", ", or on Debian/Ubuntu `apt-get install dataset-fashion-mnist`"
        ),
        aliases=("fashionmnist",),
        order=20,
    )
)
