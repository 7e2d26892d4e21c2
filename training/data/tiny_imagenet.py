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
``<root>/.erc-cache/`` (or ``~/.cache/erc/tiny-imagenet/<hash of root>/`` when the data folder is
read-only). The cache key hashes the split, every image's relative path, size, mtime and label, so
any change to the files invalidates it. A cache that cannot be read is ignored and rebuilt: it is
derived data, never the source of truth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from training.data.core import DataError, DatasetInfo, ImageSet, from_numpy, subset_indices

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
_CHUNK = 256  # images per decode task: large enough to amortize the executor, small for progress


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
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return [root / ".erc-cache", Path.home() / ".cache" / "erc" / "tiny-imagenet" / tag]


def _load_cache(
    root: Path, split: str, key: str, labels: npt.NDArray[np.int64], info: DatasetInfo
) -> npt.NDArray[np.uint8] | None:
    for folder in cache_dirs(root):
        path = folder / f"{split}-{key}.npz"
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                images, cached_labels = z["images"], z["labels"]
        except Exception as exc:  # any unreadable cache is just a cache miss
            log.warning("ignoring unreadable cache %s: %s", path, exc)
            continue
        if (
            images.dtype != np.uint8
            or images.shape != (len(labels), *info.shape)
            or not np.array_equal(cached_labels, labels)
        ):
            log.warning("ignoring cache %s: it does not match the files", path)
            continue
        log.info("tiny-imagenet %s: using cached decoded images %s", split, path)
        return images
    return None


def _store_cache(
    root: Path, split: str, key: str, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64]
) -> Path | None:
    for folder in cache_dirs(root):
        tmp: str | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{split}-", suffix=".npz.tmp", dir=folder)
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, images=images, labels=labels)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache beside shared data should be readable
            final = folder / f"{split}-{key}.npz"
            os.replace(tmp, final)  # atomic: readers see the old file or the complete new one
            tmp = None
        except OSError as exc:
            log.warning("cannot cache decoded images in %s: %s", folder, exc)
            continue
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        for stale in folder.glob(f"{split}-*.npz"):
            if stale != final:  # an older key: the files changed since; free the space
                stale.unlink(missing_ok=True)
        log.info("tiny-imagenet %s: cached decoded images in %s", split, final)
        return final
    return None


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
    """Decode ``files`` into one uint8 array [N, 3, H, W], on a few threads (Pillow releases the GIL)."""
    image_mod = _pil_image(root)
    out = np.empty((len(files), *info.shape), dtype=np.uint8)

    def work(start: int) -> int:
        stop = min(start + _CHUNK, len(files))
        for i in range(start, stop):
            out[i] = _decode(files[i], info, image_mod)
        return stop - start

    log.info("%s: decoding %d images under %s", desc, len(files), root)
    starts = range(0, len(files), _CHUNK)
    workers = min(8, os.cpu_count() or 1)
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(files), desc=desc, unit="img", disable=None) as bar,
    ):
        for done in pool.map(work, starts):
            bar.update(done)
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
    _store_cache(root, split, key, images, labels)
    return from_numpy(images, labels, info)
