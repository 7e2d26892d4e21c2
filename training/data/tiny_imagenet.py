"""Reader for Tiny ImageNet (``tiny-imagenet-200/``): JPEG folders, decoded once and cached.

Layout (as the official zip unpacks)::

    wnids.txt                      200 WordNet ids, one per line; class index = position in sorted order
    words.txt                      optional: "<wnid>\\t<comma-separated names>" for all of ImageNet
    train/<wnid>/images/*.JPEG     500 images per class
    val/images/*.JPEG              10,000 images
    val/val_annotations.txt        "<file>\\t<wnid>\\t<bbox...>"; our "test" split (test/ has no labels)

Images are 64 x 64; a few are grayscale and are converted to RGB. Pillow is imported only when
JPEGs actually have to be decoded.

Decoding 100k JPEGs takes a while, so the decoded uint8 arrays are cached as ``.npz`` under
``<root>/.erc-cache/`` (or ``$ERC_CACHE_DIR/tiny-imagenet/<hash of root>/``, default base
``~/.cache/erc``, when the data folder is read-only; see :mod:`training.data.cache`). The cache
key hashes the split, every image's relative path, size, mtime and label, so any change to the
files invalidates it. A cache that cannot be read is ignored and rebuilt: it is
derived data, never the source of truth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training.data.cache import decode_parallel, load_arrays, store_arrays, user_cache_dir
from training.data.core import DataError, DatasetInfo, ImageSet, from_numpy, subset_indices
from training.data.datasets import DatasetSpec, FileSpec, Resource, download_hint, register

__all__ = [
    "VAL_ANNOTATIONS",
    "WNIDS_FILE",
    "WORDS_FILE",
    "cache_dirs",
    "label_names",
    "list_split",
    "read_tiny_imagenet_split",
    "read_wnids",
]

log = logging.getLogger(__name__)

WNIDS_FILE = "wnids.txt"
WORDS_FILE = "words.txt"
VAL_ANNOTATIONS = "val/val_annotations.txt"
_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
# Bump when the cached arrays' meaning changes (layout, conversion), so old caches are not reused.
_CACHE_VERSION = 1


def read_wnids(root: Path, info: DatasetInfo) -> tuple[str, ...]:
    """The class wnids in label order (sorted), checked to be ``info.num_classes`` distinct ids."""
    path = root / WNIDS_FILE
    try:
        lines = path.read_text(encoding="utf-8").split()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing", path=path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}", path=path) from exc
    wnids = tuple(sorted(set(lines)))
    if len(wnids) != len(lines):
        dupes = sorted(w for w, c in Counter(lines).items() if c > 1)
        raise DataError(f"{path}: duplicate wnids {dupes[:5]}", path=path)
    if len(wnids) != info.num_classes:
        raise DataError(f"{path}: {len(wnids)} wnids, expected {info.num_classes}", path=path)
    return wnids


def label_names(root: Path, wnids: tuple[str, ...]) -> tuple[str, ...]:
    """A readable name per wnid: the first name ``words.txt`` gives it, else the wnid itself.

    ImageNet reuses some first names for different synsets (e.g. "crane" the bird and the
    machine); such names get their wnid appended so that every label name stays unique.
    """
    path = root / WORDS_FILE
    words: dict[str, str] = {}
    if path.is_file():
        wanted = set(wnids)
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                wnid, _, synonyms = line.rstrip("\n").partition("\t")
                if wnid in wanted:
                    words[wnid] = synonyms.split(",")[0].strip()
    names = [words.get(w) or w for w in wnids]
    counts = Counter(names)
    return tuple(f"{n} ({w})" if counts[n] > 1 and n != w else n for n, w in zip(names, wnids, strict=True))


def _images_in(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(
                e.name for e in it if e.is_file() and Path(e.name).suffix.lower() in _IMAGE_SUFFIXES
            )
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: missing", path=folder) from exc
    except NotADirectoryError as exc:
        raise DataError(f"{folder}: not a folder", path=folder) from exc


def list_split(root: Path, split: str, wnids: tuple[str, ...]) -> tuple[list[Path], npt.NDArray[np.int64]]:
    """Image paths and their labels for ``split`` ("train" or "test" = the labelled ``val/``)."""
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for wnid, label in index.items():
            folder = root / "train" / wnid / "images"
            names = _images_in(folder)
            if not names:
                raise DataError(f"{folder}: no images for class {wnid}", path=folder)
            files.extend(folder / n for n in names)
            labels.extend([label] * len(names))
    else:
        ann = root / VAL_ANNOTATIONS
        folder = root / "val" / "images"
        present = set(_images_in(folder))
        try:
            text = ann.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise DataError(f"{ann}: missing", path=ann) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{ann}: cannot read: {exc}", path=ann) from exc
        seen: set[str] = set()
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            fields = [f.strip() for f in line.split("\t")]
            name, wnid = fields[0], (fields[1] if len(fields) > 1 else "")
            if not wnid:
                raise DataError(
                    f"{ann}: line {lineno}: expected '<file>\\t<wnid>...', got {line!r}", path=ann
                )
            if wnid not in index:
                raise DataError(
                    f"{ann}: line {lineno}: wnid {wnid!r} is not listed in {WNIDS_FILE}", path=ann
                )
            # Names come from a text file: never let one step outside val/images.
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise DataError(f"{ann}: line {lineno}: bad image name {name!r}", path=ann)
            if name in seen:
                raise DataError(f"{ann}: line {lineno}: {name} is annotated twice", path=ann)
            if name not in present:
                raise DataError(
                    f"{folder / name}: missing (annotated in {ann}, line {lineno})", path=folder / name
                )
            seen.add(name)
            files.append(folder / name)
            labels.append(index[wnid])
        if not files:
            raise DataError(f"{ann}: no annotations", path=ann)
    return files, np.asarray(labels, dtype=np.int64)


def _fingerprint(root: Path, split: str, files: list[Path], labels: npt.NDArray[np.int64]) -> str:
    digest = hashlib.sha256(f"tiny-imagenet v{_CACHE_VERSION} {split}\n".encode())
    for path, label in zip(files, labels.tolist(), strict=True):
        st = path.stat()
        digest.update(
            f"{path.relative_to(root).as_posix()}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()[:24]


def cache_dirs(root: Path) -> list[Path]:
    """Where decoded arrays may be cached, preferred first: beside the data, then the user cache."""
    return [root / ".erc-cache", user_cache_dir("tiny-imagenet", root)]


def _load_cache(
    root: Path, split: str, key: str, labels: npt.NDArray[np.int64], info: DatasetInfo
) -> npt.NDArray[np.uint8] | None:
    def check(arrays: Mapping[str, npt.NDArray[np.generic]]) -> str | None:
        images, cached_labels = arrays.get("images"), arrays.get("labels")
        if (
            images is None
            or cached_labels is None
            or images.dtype != np.uint8
            or images.shape != (len(labels), *info.shape)
            or not np.array_equal(cached_labels, labels)
        ):
            return "it does not match the files"
        return None

    arrays = load_arrays(cache_dirs(root), f"{split}-{key}.npz", check)
    return None if arrays is None else arrays["images"].astype(np.uint8, copy=False)


def _pil_image(root: Path) -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(
            f"{root}: decoding Tiny ImageNet's JPEGs needs Pillow, which is not installed "
            "(pip install pillow)",
            path=root,
        ) from exc
    return Image


def _decode(path: Path, info: DatasetInfo, image_mod: Any) -> npt.NDArray[np.uint8]:
    try:
        with image_mod.open(path) as im:
            rgb = im.convert("RGB")  # grayscale ("L"), palette and CMYK files become 3 channels
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"{path}: cannot decode image: {exc}", path=path) from exc
    if rgb.size != (info.width, info.height):
        raise DataError(
            f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, expected {info.width}x{info.height}", path=path
        )
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _decode_all(root: Path, files: list[Path], info: DatasetInfo, desc: str) -> npt.NDArray[np.uint8]:
    """Decode ``files`` into one uint8 array [N, 3, H, W], on a few threads."""
    image_mod = _pil_image(root)
    out = np.empty((len(files), *info.shape), dtype=np.uint8)

    def decode(i: int) -> None:
        out[i] = _decode(files[i], info, image_mod)

    log.info("%s: decoding %d images under %s", desc, len(files), root)
    decode_parallel(len(files), decode, desc)
    return out


def read_tiny_imagenet_split(
    root: Path, split: str, info: DatasetInfo, n: int | None = None, seed: int = 0
) -> ImageSet:
    """Images [N, 3, 64, 64] uint8 and labels [N] of one split from ``root`` (= ``tiny-imagenet-200``).

    The returned ``info`` carries the label names (from ``words.txt`` / ``wnids.txt``). With ``n``
    set and no cache yet, only the ``n`` chosen images are decoded (the same ones
    ``ImageSet.subset(n, seed)`` would pick from the full split) and nothing is cached.
    """
    wnids = read_wnids(root, info)
    info = dataclasses.replace(info, label_names=label_names(root, wnids))
    files, labels = list_split(root, split, wnids)
    key = _fingerprint(root, split, files, labels)
    cached = _load_cache(root, split, key, labels, info)
    if cached is not None:
        return from_numpy(cached, labels, info).subset(n, seed)
    idx = subset_indices(len(files), n, seed)
    if idx is not None:
        chosen = idx.tolist()
        images = _decode_all(root, [files[i] for i in chosen], info, f"tiny-imagenet {split} (subset)")
        return from_numpy(images, labels[chosen], info)
    images = _decode_all(root, files, info, f"tiny-imagenet {split}")
    store_arrays(cache_dirs(root), split, key, {"images": images, "labels": labels})
    return from_numpy(images, labels, info)


# The Tiny ImageNet spec (:mod:`training.data.datasets`): registered when :mod:`training.data`
# imports this module.
# Tiny ImageNet is an ImageNet subset: the usual ImageNet statistics.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

register(
    DatasetSpec(
        info=DatasetInfo(
            name="tiny-imagenet",
            channels=3,
            height=64,
            width=64,
            num_classes=200,
            label_names=(),  # read from wnids.txt / words.txt by load_split
            train_eps=0.01,  # paper, appendix "Epsilon selection"
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
        ),
        reader=read_tiny_imagenet_split,
        files=(
            FileSpec((WNIDS_FILE,)),
            FileSpec((WORDS_FILE,), required=False),
            FileSpec(("train",), is_dir=True),
            FileSpec(("val/images",), is_dir=True),
            FileSpec((VAL_ANNOTATIONS,)),
        ),
        base_url="http://cs231n.stanford.edu/",
        resources=(Resource("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de", archive=True),),
        folder="tiny-imagenet-200",
        how_to_get=download_hint("tiny-imagenet"),
        label_reader=lambda root, info: label_names(root, read_wnids(root, info)),
        aliases=("tinyimagenet", "tiny-imagenet-200"),
        order=50,
    )
)
