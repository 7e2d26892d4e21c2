"""Reader for CIFAR-10's "python version" (``cifar-10-batches-py/``), without trusting pickle.

Each batch file is a pickled dict: ``b"data"`` a uint8 array [10000, 3072] whose rows are one
image in C, H, W order (1024 red, 1024 green, 1024 blue, each row-major), and ``b"labels"`` a list
of ints. ``batches.meta`` holds ``b"label_names"``.

Pickle runs whatever callables the stream names, so the files are read with
:class:`SafeUnpickler`, whose ``find_class`` hands out only the numpy reconstruction helpers that
these files reference and refuses everything else with a :class:`DataError`.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

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

__all__ = ["META_FILE", "SPLIT_FILES", "SafeUnpickler", "read_cifar_split", "safe_unpickle"]

SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
META_FILE = "batches.meta"


def _multiarray_attr(name: str) -> Any:
    """``numpy._core.multiarray.<name>`` (numpy >= 2), else ``numpy.core.multiarray.<name>`` (1.x).

    Looked up directly rather than by importing ``numpy.core``, which numpy 2 deprecates.
    """
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no multiarray.{name}")


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """What ``numpy._core.numeric._frombuffer`` does for protocol-5 pickles, without importing it."""
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` restricted to latin-1: Python 3 writes bytes this way in protocol 2."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], Callable[..., Any] | type]:
    reconstruct = _multiarray_attr("_reconstruct")
    return {
        # The original files (Python 2 cPickle, numpy 1.x) and numpy 1.x re-pickles.
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        # numpy >= 2 writes the private module path.
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Re-pickled by Python 3: protocol 5 stores arrays through _frombuffer, protocol 2 stores
        # bytes as _codecs.encode(str, "latin1"). Both are pure data conversions.
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("_codecs", "encode"): _latin1_encode,
    }


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR batch needs; anything else is a DataError."""

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: refusing to unpickle global {module}.{name} (not a CIFAR batch)",
                path=self._path,
            ) from None


def safe_unpickle(path: Path) -> Any:
    """Load one pickle through :class:`SafeUnpickler`; unreadable or malformed files raise DataError."""
    try:
        with open(path, "rb") as fh:
            return SafeUnpickler(fh, path).load()
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing", path=path) from exc
    # A truncated or garbled pickle can surface as almost any exception (EOFError, UnpicklingError,
    # struct.error, UnicodeDecodeError, ...), depending on where it breaks: all mean "corrupt".
    except Exception as exc:
        raise DataError(
            f"{path}: corrupt or truncated pickle: {type(exc).__name__}: {exc}", path=path
        ) from exc


def _field(entry: dict[Any, Any], key: str) -> Any:
    # encoding="bytes" turns Python 2 str keys into bytes; a Python 3 re-pickle keeps str keys.
    if key.encode() in entry:
        return entry[key.encode()]
    return entry.get(key)


def _read_batch(path: Path, info: DatasetInfo) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    entry = safe_unpickle(path)
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a dict, found {type(entry).__name__}", path=path)
    data, labels = _field(entry, "data"), _field(entry, "labels")
    if data is None or labels is None:
        raise DataError(
            f"{path}: no 'data' and 'labels' entries (keys: {sorted(map(str, entry))})", path=path
        )
    pixels = info.channels * info.height * info.width
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != pixels
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 [N, {pixels}], found {got}", path=path)
    try:
        label_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' is not a list of integers: {exc}", path=path) from exc
    if label_arr.shape != (data.shape[0],):
        raise DataError(f"{path}: {label_arr.size} labels for {data.shape[0]} images", path=path)
    if label_arr.size and (label_arr.min() < 0 or label_arr.max() >= info.num_classes):
        raise DataError(
            f"{path}: labels span {label_arr.min()}..{label_arr.max()}, "
            f"{info.name} has 0..{info.num_classes - 1}",
            path=path,
        )
    if not data.flags.writeable:
        # Arrays rebuilt over the pickle's own bytes are read-only; torch wants writable memory.
        data = data.copy()
    return data.reshape(-1, info.channels, info.height, info.width), label_arr


def check_meta(root: Path, info: DatasetInfo) -> None:
    """If ``batches.meta`` is present, its label names must be ours: the label order depends on it."""
    path = root / META_FILE
    if not path.is_file():
        return
    meta = safe_unpickle(path)
    names = _field(meta, "label_names") if isinstance(meta, dict) else None
    if names is None:
        raise DataError(f"{path}: no 'label_names' entry", path=path)
    decoded = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if decoded != info.label_names:
        raise DataError(
            f"{path}: label names {decoded} differ from {info.name}'s {info.label_names}", path=path
        )


def read_cifar_split(root: Path, split: str, info: DatasetInfo) -> ImageSet:
    """Images [N, 3, 32, 32] uint8 and labels [N] of one split from ``root`` (= ``cifar-10-batches-py``)."""
    check_meta(root, info)
    parts = [_read_batch(root / name, info) for name in SPLIT_FILES[split]]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return from_numpy(images, labels, info)


# The CIFAR spec (:mod:`training.data.datasets`): registered when :mod:`training.data` imports this
# module.
# Extracted files' md5 as torchvision lists them.
_CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    META_FILE: "5ff9c542aee3614f3951f8cda6e48888",
}

# Exact per-channel statistics of the training images in [0, 1]. (CIFAR-10's often-quoted std
# 0.2023/0.1994/0.2010 is the mean of per-image stds, not the dataset's std.)
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

register(
    DatasetSpec(
        info=DatasetInfo(
            name="cifar10",
            channels=3,
            height=32,
            width=32,
            num_classes=10,
            label_names=(
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ),
            train_eps=0.03,  # paper, appendix "Epsilon selection"
            mean=_CIFAR10_MEAN,
            std=_CIFAR10_STD,
        ),
        reader=whole_split(read_cifar_split),
        files=(
            *(FileSpec((f,), md5=_CIFAR_MD5[f]) for split in SPLITS for f in SPLIT_FILES[split]),
            FileSpec((META_FILE,), md5=_CIFAR_MD5[META_FILE], required=False),
        ),
        base_url="https://www.cs.toronto.edu/~kriz/",
        resources=(Resource("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", archive=True),),
        folder="cifar-10-batches-py",
        how_to_get=download_hint("cifar10"),
        aliases=("cifar-10",),
        order=30,
    )
)
