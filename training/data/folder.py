"""Image-folder datasets: your own labelled images, one folder per class (torchvision's ImageFolder
layout), addressed as ``folder:PATH`` wherever a dataset name is taken.

Layouts (the first that fits)::

    PATH/train/<class>/**/*.png|jpg|...   and PATH/test/<class>/...   (or PATH/val/<class>/...)
    PATH/train/<class>/...                 a seeded split holds out a share of each class as test
    PATH/<class>/...                       the same seeded split

Class names are the class folders' names, sorted (label i = the i-th name): stable across machines
and runs. Files are found recursively inside a class folder, following symbolic links to folders
once (a link loop is skipped and counted). Hidden files are ignored; so are files whose suffix is
not an image's (``notes.txt``), listed as ignored. Every image file is decoded by
:func:`training.data.imaging.decode_pixels`, the decoder the service uses, so a model is trained on
the very pixels it will be served.

Size and channels: given (``FolderOptions.size`` / ``channels``), every image is converted to them
exactly as the service converts uploads (stretched, luma or RGB). Not given, they are inferred from
the image headers: the size all images share (images of several sizes are an error that lists
them, until a size is given), one channel when every image is greyscale, else three.

Unreadable files (empty, not an image, corrupt, truncated, too many pixels, a broken or looping
link) are skipped, counted and named in the log; with ``strict`` they are an error that names them.
A class folder without a readable image, or fewer than two classes, is an error naming it.

The decoded uint8 arrays of both splits are cached (:mod:`training.data.cache`) under
``$ERC_CACHE_DIR/folders/<hash of PATH>/`` (else ``PATH/.erc-cache/``), keyed by every file's
path, size, mtime and label and by the options: the images are decoded once, with progress.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import stat
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from training.data.cache import decode_parallel, load_arrays, store_arrays, user_cache_dir
from training.data.core import DataError, DatasetInfo, ImageSet, from_numpy

__all__ = [
    "FOLDER_PREFIX",
    "IMAGE_SUFFIXES",
    "FolderData",
    "FolderOptions",
    "Listing",
    "canonical_name",
    "check_folder",
    "folder_root",
    "format_size",
    "is_folder",
    "list_folder",
    "load_folder",
    "parse_size",
]

log = logging.getLogger(__name__)

FOLDER_PREFIX = "folder:"
TEST_DIRS = ("test", "val")  # a held-out split folder beside train/, first found wins
# Suffixes of the formats the decoder accepts (training.data.imaging.ACCEPTED_FORMATS).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# Per-image pixel limit when reading datasets: far above any training image, below a decompression bomb.
MAX_PIXELS = 8192 * 8192
# Bump when the cached arrays' meaning changes, so old caches are not reused.
_CACHE_VERSION = 1
_LOGGED_NAMES = 20  # unreadable files named one by one in the log before "... and N more"


def is_folder(name: str) -> bool:
    """Whether a dataset name addresses an image folder (``folder:PATH``)."""
    return str(name).startswith(FOLDER_PREFIX)


def folder_root(name: str) -> Path:
    """The folder of ``folder:PATH`` (``~`` expanded; not resolved)."""
    return Path(str(name)[len(FOLDER_PREFIX) :]).expanduser()


def canonical_name(name: str) -> str:
    """``folder:`` and the absolute path: the name runs, checkpoints and cards record."""
    return FOLDER_PREFIX + os.path.abspath(folder_root(name))


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """``"32"`` -> (32, 32); ``"64x48"`` (width x height) -> (48, 64) as (height, width)."""
    if text is None:
        return None
    raw = str(text).strip().lower()
    try:
        parts = [int(p) for p in raw.split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise DataError(f"image size must be N or WIDTHxHEIGHT in pixels (e.g. 32 or 64x48), got {text!r}")
    width, height = parts
    return height, width


def format_size(height: int, width: int) -> str:
    return f"{width}x{height}"


@dataclass(frozen=True)
class FolderOptions:
    """How an image folder is read (all fields are recorded with the model)."""

    size: tuple[int, int] | None = None  # (height, width) every image is resized to; None: inferred
    channels: int | None = None  # 1 or 3; None: 1 when every image is greyscale, else 3
    classes: tuple[str, ...] | None = None  # label order of a trained model; None: sorted class folders
    test_fraction: float = 0.2  # share of each class held out when there is no test/ folder
    split_seed: int = 0  # seed of that split (independent of the training seed)
    strict: bool = False  # refuse unreadable files instead of skipping them
    progress: bool | None = None  # decoding progress bar (None: only on a terminal)

    def __post_init__(self) -> None:
        if self.channels not in (None, 1, 3):
            raise DataError(f"channels must be 1 (greyscale) or 3 (RGB), got {self.channels}")
        if not 0 < self.test_fraction < 1:
            raise DataError(f"test fraction must lie in (0, 1), got {self.test_fraction}")

    @classmethod
    def from_config(cls, data: Any) -> FolderOptions:
        """From a :class:`~training.config.DataConfig` or its dict form (checkpoints, cards)."""
        get = data.get if isinstance(data, Mapping) else lambda k, d=None: getattr(data, k, d)
        return cls(
            size=parse_size(get("image_size")),
            channels=get("channels"),
            test_fraction=float(get("test_fraction", 0.2)),
            split_seed=int(get("split_seed", 0)),
            strict=bool(get("strict", False)),
        )

    @classmethod
    def for_model(
        cls, data: Any, input_shape: list[int] | tuple[int, ...], label_names: list[str] | tuple[str, ...]
    ) -> FolderOptions:
        """Reading a folder for a trained model: its input shape and its classes, in its label order."""
        base = cls.from_config(data or {})
        c, h, w = (int(v) for v in input_shape)
        return cls(
            size=(h, w),
            channels=c,
            classes=tuple(label_names),
            test_fraction=base.test_fraction,
            split_seed=base.split_seed,
        )


# -- listing ------------------------------------------------------------------------------------
@dataclass
class Listing:
    """What a folder holds, before any pixel is decoded."""

    root: Path
    layout: str  # "train/test folders", "train folder + seeded split", "class folders + seeded split"
    train_dir: Path
    test_dir: Path | None
    classes: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]  # "train"/"test" -> (path, label), sorted
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # not image files: (path, why)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # image files that cannot be read
    problems: list[str] = field(default_factory=list)  # what makes the folder untrainable


def _walk(folder: Path, listing: Listing, seen: set[tuple[int, int]]) -> list[Path]:
    """Image files below ``folder``, sorted, following links to folders once; the rest is noted."""
    found: list[Path] = []
    try:
        top = os.stat(folder)
        seen.add((top.st_dev, top.st_ino))  # a link back to this folder (or above it) is a loop
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        listing.unreadable.append((folder, f"cannot list folder: {exc.strerror or exc}"))
        return found
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue  # hidden files: .DS_Store, ._resource forks, our own .erc-cache
        try:
            st = os.stat(path)  # follows links
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                why = "symbolic link loop"
            elif entry.is_symlink():
                why = "broken symbolic link"
            else:
                why = f"cannot stat: {exc.strerror or exc}"
            listing.unreadable.append((path, why))
            continue
        if stat.S_ISDIR(st.st_mode):
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                listing.unreadable.append((path, "symbolic link loop (folder already visited)"))
                continue
            seen.add(ident)
            found.extend(_walk(path, listing, seen))
        elif not stat.S_ISREG(st.st_mode):
            listing.ignored.append((path, "not a regular file"))
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            listing.ignored.append((path, f"not an image file name ({path.suffix or 'no suffix'})"))
        elif st.st_size == 0:
            listing.unreadable.append((path, "empty file (0 bytes)"))
        else:
            found.append(path)
    return found


def _class_dirs(parent: Path, listing: Listing) -> list[Path]:
    dirs = []
    for entry in sorted(os.scandir(parent), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if path.is_dir():
            dirs.append(path)
        elif path.exists() or path.is_symlink():
            listing.ignored.append((path, "not inside a class folder"))
    return dirs


def list_folder(root: Path, classes: tuple[str, ...] | None = None) -> Listing:
    """Find the layout, the classes and every image file of ``root`` (no decoding).

    ``classes`` fixes the label order (a trained model's); class folders outside it are problems.
    Problems (no class folder, one class, a class without image files, an unknown test class)
    are collected in ``Listing.problems`` rather than raised, so ``erc data info`` can show them all.
    """
    if not root.is_dir():
        raise DataError(
            f"{root}: no such folder (a folder dataset is folder:PATH with PATH/<class>/<images>)", path=root
        )
    listing = Listing(root, "", root, None, (), {"train": [], "test": []})
    if (root / "train").is_dir():
        listing.train_dir = root / "train"
        listing.test_dir = next((root / d for d in TEST_DIRS if (root / d).is_dir()), None)
        held = f"{listing.test_dir.name}/ folder" if listing.test_dir else "seeded split"
        listing.layout = f"train/ folder + {held}"
    else:
        listing.layout = "class folders + seeded split"
        stray = [d for d in TEST_DIRS if (root / d).is_dir()]
        if stray:  # read as a class named "test", it would silently mix splits
            listing.problems.append(
                f"{root / stray[0]}: a {stray[0]}/ folder without a train/ folder beside it"
            )
    top = os.stat(listing.train_dir)
    seen = {(top.st_dev, top.st_ino)}  # a link back up to the train folder is a loop too
    train_dirs = _class_dirs(listing.train_dir, listing)
    names = tuple(d.name for d in train_dirs)
    listing.classes = classes if classes is not None else names
    index = {name: i for i, name in enumerate(listing.classes)}
    if classes is None and len(names) == 0:
        listing.problems.append(
            f"{listing.train_dir}: no class folders; expected {listing.train_dir}/<class name>/<images>"
        )
    elif classes is None and len(names) == 1:
        listing.problems.append(
            f"{listing.train_dir}: only one class folder ({names[0]!r}); a classifier needs at least two"
        )
    sources = [("train", train_dirs)]
    if listing.test_dir is not None:
        sources.append(("test", _class_dirs(listing.test_dir, listing)))
    for source, dirs in sources:
        for d in dirs:
            if d.name not in index:
                listing.problems.append(
                    f"{d}: class {d.name!r} is not one of the model's classes ({', '.join(listing.classes)})"
                    if classes is not None
                    else f"{d}: class {d.name!r} has no folder under {listing.train_dir}"
                )
                continue
            files = _walk(d, listing, seen)
            if not files and (classes is None or source == "train"):
                listing.problems.append(f"{d}: class {d.name!r} holds no image files")
            listing.files[source].extend((f, index[d.name]) for f in files)
    return listing


def _split(listing: Listing, fraction: float, seed: int) -> None:
    """Hold out ``fraction`` of each class (at least one image, never all) as the test source."""
    by_class: dict[int, list[Path]] = {}
    for path, label in listing.files["train"]:
        by_class.setdefault(label, []).append(path)
    gen = torch.Generator().manual_seed(seed)
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for label in sorted(by_class):
        paths = by_class[label]
        k = min(len(paths) - 1, max(1, round(fraction * len(paths)))) if len(paths) > 1 else 0
        held = set(torch.randperm(len(paths), generator=gen)[:k].tolist())
        for i, p in enumerate(paths):
            (test if i in held else train).append((p, label))
    listing.files = {"train": train, "test": test}


# -- decoding -----------------------------------------------------------------------------------
@dataclass
class FolderData:
    """Both splits of a folder dataset, decoded, with what the model card records about them."""

    info: DatasetInfo
    train: ImageSet
    test: ImageSet
    description: dict[str, Any]  # layout, split, counts, skipped files: the card's "data" entry


def _probe_all(paths: list[Path]) -> list[Any]:
    """Header probes (or the error) of every file, on a few threads."""
    from training.data.imaging import ImageDecodeError, probe_image

    def probe(path: Path) -> Any:
        try:
            with open(path, "rb") as fh:
                return probe_image(fh, max_pixels=MAX_PIXELS, size_hint=os.fstat(fh.fileno()).st_size)
        except ImageDecodeError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot read: {exc.strerror or exc}"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(probe, paths, chunksize=64))


def _infer_geometry(
    root: Path, paths: list[Path], probes: list[Any], size: tuple[int, int] | None, channels: int | None
) -> tuple[tuple[int, int], int]:
    ok = [(p, pr) for p, pr in zip(paths, probes, strict=True) if not isinstance(pr, str)]
    if not ok:
        raise DataError(f"{root}: no readable image", path=root)
    if size is None:
        sizes = Counter((pr.height, pr.width) for _, pr in ok)
        if len(sizes) > 1:
            example: dict[tuple[int, int], Path] = {}
            for p, pr in ok:
                example.setdefault((pr.height, pr.width), p)
            shown = ", ".join(
                f"{format_size(*s)} ({n} files, e.g. {example[s].relative_to(root)})"
                for s, n in sizes.most_common(4)
            )
            more = f" and {len(sizes) - 4} more sizes" if len(sizes) > 4 else ""
            raise DataError(
                f"{root}: images disagree in size: {shown}{more}; choose one with --size WIDTHxHEIGHT "
                "(every image is stretched to it, as the service does with uploads)",
                path=root,
            )
        size = next(iter(sizes))
    if channels is None:
        channels = 1 if all(pr.grey for _, pr in ok) else 3
    return size, channels


def _fingerprint(listing: Listing) -> str:
    """Hash of what the decoded arrays hold, except their geometry: every file's split, path, label
    (so the class order and the seeded split are in), size and mtime."""
    digest = hashlib.sha256(f"erc image folder v{_CACHE_VERSION} {listing.layout}\n".encode())
    for source in ("train", "test"):
        for path, label in listing.files[source]:
            st = path.stat()
            rel = path.relative_to(listing.root).as_posix()
            digest.update(f"{source}\t{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def cache_dirs(root: Path) -> list[Path]:
    """Where decoded folders are cached, preferred first: the user cache (a user's image folder is
    theirs: nothing is written into it unless the user cache is not writable), then beside the data."""
    return [user_cache_dir("folders", root), root / ".erc-cache"]


def _geometry_file(files_key: str, size: tuple[int, int] | None, channels: int | None) -> str:
    asked = f"{format_size(*size) if size else 'any'}x{channels or 'any'}"
    return f"folder-{files_key}-{asked}.geometry.json"


def _known_geometry(
    root: Path, files_key: str, size: tuple[int, int] | None, channels: int | None
) -> dict[str, Any] | None:
    """The size and channels inferred earlier for exactly these files and this request (a small
    JSON beside the cached arrays), so a second read finds the arrays without probing every header;
    a model's options, which spell the values out, find them directly."""
    for folder in cache_dirs(root):
        try:
            found = json.loads((folder / _geometry_file(files_key, size, channels)).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and {"size", "channels"} <= set(found):
            return found
    return None


def _remember_geometry(
    root: Path,
    files_key: str,
    asked: tuple[tuple[int, int] | None, int | None],
    size: tuple[int, int],
    channels: int,
) -> None:
    from training.checkpoint import atomic_write_text

    name = _geometry_file(files_key, *asked)
    for folder in cache_dirs(root):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / name, json.dumps({"size": list(size), "channels": channels}) + "\n")
        except OSError:
            continue
        for stale in folder.glob("folder-*.geometry.json"):
            if not stale.name.startswith(f"folder-{files_key}-"):  # older files: their key is gone
                stale.unlink(missing_ok=True)
        return


def _unreadable_error(root: Path, bad: list[tuple[Path, str]]) -> DataError:
    shown = "; ".join(f"{p}: {why}" for p, why in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    return DataError(f"{root}: {len(bad)} unreadable image file(s) (--strict): {shown}{more}", path=bad[0][0])


def _log_skipped(root: Path, bad: list[tuple[Path, str]]) -> None:
    if not bad:
        return
    log.warning("%s: skipped %d unreadable image file(s) (--strict refuses them):", root, len(bad))
    for path, why in bad[:_LOGGED_NAMES]:
        log.warning("  skipped %s: %s", path, why)
    if len(bad) > _LOGGED_NAMES:
        log.warning("  ... and %d more (erc data check %s lists them all)", len(bad) - _LOGGED_NAMES, root)


def _stats(images: npt.NDArray[np.uint8]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std in [0, 1] units of [N, C, H, W] uint8 images, from a histogram
    of the 256 values (no float copy of the data); a constant channel gets std 1, not a division by 0."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        m = float((hist * values).sum() / hist.sum())
        sd = math.sqrt(float((hist * (values - m) ** 2).sum() / hist.sum()))
        mean.append(round(m, 4))
        std.append(round(sd, 4) if sd >= 1e-3 else 1.0)
    return tuple(mean), tuple(std)


def load_folder(name_or_root: str | Path, options: FolderOptions | None = None) -> FolderData:
    """Both splits of an image folder, decoded (or from the cache); see the module docstring.

    Raises :class:`DataError` naming the folder, file or class at fault.
    """
    options = options or FolderOptions()
    ref = str(name_or_root)
    root = Path(os.path.abspath(folder_root(ref) if is_folder(ref) else Path(ref).expanduser()))
    listing = list_folder(root, options.classes)
    if listing.problems:
        raise DataError("; ".join(listing.problems), path=root)
    if listing.test_dir is None:
        _split(listing, options.test_fraction, options.split_seed)
        split_text = (
            f"seeded split: {options.test_fraction:g} of each class held out as test "
            f"(seed {options.split_seed}; no test/ folder)"
        )
    else:
        split_text = f"{listing.test_dir.name}/ folder"
    files_key = _fingerprint(listing)
    size, channels = options.size, options.channels
    if size is None or channels is None:
        known = _known_geometry(root, files_key, size, channels) or {}
        size = size or ((int(known["size"][0]), int(known["size"][1])) if known else None)
        channels = channels or known.get("channels")
    if size is not None and channels is not None:
        key = f"{files_key}-{format_size(*size)}x{channels}"
        cached = load_arrays(cache_dirs(root), f"folder-{key}.npz", _cache_check)
        if cached is not None:
            meta = json.loads(str(cached["meta"]))
            skipped = [(root / p, why) for p, why in meta["skipped"]]
            if options.strict and skipped:
                raise _unreadable_error(root, skipped)
            _log_skipped(root, skipped)
            images = {s: cached[f"{s}_images"].astype(np.uint8, copy=False) for s in ("train", "test")}
            labels = {s: cached[f"{s}_labels"].astype(np.int64, copy=False) for s in ("train", "test")}
            return _assemble(root, listing, meta, images, labels, split_text)
    paths = {s: [p for p, _ in listing.files[s]] for s in ("train", "test")}
    every = paths["train"] + paths["test"]
    probes: list[Any] = []
    if size is None or channels is None:
        probes = _probe_all(every)
        size, channels = _infer_geometry(root, every, probes, size, channels)
        _remember_geometry(root, files_key, (options.size, options.channels), size, channels)
    key = f"{files_key}-{format_size(*size)}x{channels}"
    from training.data.imaging import ImageDecodeError, InputSpec, decode_pixels

    spec = InputSpec(channels, size[0], size[1])
    out = np.empty((len(every), channels, size[0], size[1]), dtype=np.uint8)
    errors: dict[int, str] = {i: pr for i, pr in enumerate(probes) if isinstance(pr, str)}

    def decode(i: int) -> None:
        if i in errors:
            return
        try:
            out[i] = decode_pixels(every[i].read_bytes(), spec, max_pixels=MAX_PIXELS).array
        except ImageDecodeError as exc:
            errors[i] = str(exc)
        except OSError as exc:
            errors[i] = f"cannot read: {exc.strerror or exc}"

    log.info("%s: decoding %d images to %s x %d channel(s)", root, len(every), format_size(*size), channels)
    decode_parallel(len(every), decode, f"decoding {root.name}", progress=options.progress)
    bad = listing.unreadable + [(every[i], why) for i, why in sorted(errors.items())]
    if options.strict and bad:
        raise _unreadable_error(root, bad)
    _log_skipped(root, bad)
    keep = np.ones(len(every), dtype=bool)
    keep[list(errors)] = False
    n_train = len(paths["train"])
    all_labels = np.asarray([lb for _, lb in listing.files["train"] + listing.files["test"]], dtype=np.int64)
    images = {"train": out[:n_train][keep[:n_train]], "test": out[n_train:][keep[n_train:]]}
    labels = {"train": all_labels[:n_train][keep[:n_train]], "test": all_labels[n_train:][keep[n_train:]]}
    if options.classes is None:
        _require_every_class(listing, labels["train"], bad)
    mean, std = _stats(images["train"])
    meta = {
        "size": list(size),
        "channels": channels,
        "mean": mean,
        "std": std,
        "skipped": [(str(p.relative_to(root)), why) for p, why in bad],
    }
    store_arrays(
        cache_dirs(root),
        "folder",
        key,
        {
            "meta": np.asarray(json.dumps(meta)),
            **{f"{s}_images": images[s] for s in images},
            **{f"{s}_labels": labels[s] for s in labels},
        },
    )
    return _assemble(root, listing, meta, images, labels, split_text)


def _cache_check(arrays: Mapping[str, npt.NDArray[np.generic]]) -> str | None:
    wanted = {"meta", "train_images", "train_labels", "test_images", "test_labels"}
    if not wanted <= set(arrays):
        return f"it lacks {', '.join(sorted(wanted - set(arrays)))}"
    for s in ("train", "test"):
        if arrays[f"{s}_images"].dtype != np.uint8 or len(arrays[f"{s}_images"]) != len(
            arrays[f"{s}_labels"]
        ):
            return f"its {s} arrays do not match"
    return None


def _require_every_class(
    listing: Listing, train_labels: npt.NDArray[np.int64], bad: list[tuple[Path, str]]
) -> None:
    """Every class keeps at least one readable training image (after unreadable files are skipped)."""
    present = set(np.unique(train_labels).tolist())
    for i, name in enumerate(listing.classes):
        if i not in present:
            where = listing.train_dir / name
            skipped = sum(1 for p, _ in bad if where in p.parents)
            raise DataError(
                f"{where}: class {name!r} has no readable training image "
                f"({skipped} unreadable file(s) skipped)",
                path=where,
            )


def _assemble(
    root: Path,
    listing: Listing,
    meta: dict[str, Any],
    images: dict[str, npt.NDArray[np.uint8]],
    labels: dict[str, npt.NDArray[np.int64]],
    split_text: str,
) -> FolderData:
    height, width = meta["size"]
    info = DatasetInfo(
        name=FOLDER_PREFIX + str(root),
        channels=int(meta["channels"]),
        height=int(height),
        width=int(width),
        num_classes=len(listing.classes),
        label_names=listing.classes,
        train_eps=None,  # unknown data has no default radius: the user chooses it
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
    )
    train = from_numpy(images["train"], labels["train"], info)
    test = from_numpy(images["test"], labels["test"], info)
    if not len(test):
        raise DataError(f"{root}: the test split holds no readable image", path=root)
    counts = {
        s: dict(
            zip(listing.classes, np.bincount(labels[s], minlength=len(listing.classes)).tolist(), strict=True)
        )
        for s in ("train", "test")
    }
    description = {
        "kind": "image-folder",
        "root": str(root),
        "layout": listing.layout,
        "split": split_text,
        "classes": list(listing.classes),
        "counts": counts,
        "size": format_size(int(height), int(width)),
        "channels": int(meta["channels"]),
        "skipped": len(meta["skipped"]),
        "skipped_files": [p for p, _ in meta["skipped"][:_LOGGED_NAMES]],
        "ignored": len(listing.ignored),
    }
    log.info(
        "%s: %d train / %d test images, %d classes, %s x %d channel(s) (%s)",
        root,
        len(train),
        len(test),
        len(listing.classes),
        description["size"],
        info.channels,
        split_text,
    )
    return FolderData(info, train, test, description)


# -- erc data info / check ----------------------------------------------------------------------
def check_folder(
    root: Path,
    *,
    decode: bool,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """What ``erc data info DIR`` (headers only) and ``erc data check DIR`` (``decode``: every pixel)
    report: layout, classes with counts, sizes, modes, formats, ignored and unreadable files, and the
    problems that would stop training. Nothing is cached or written."""
    root = Path(os.path.abspath(root.expanduser()))
    listing = list_folder(root)
    every = [(p, lb, s) for s in ("train", "test") for p, lb in listing.files[s]]
    probes = _probe_all([p for p, _, _ in every])
    unreadable = list(listing.unreadable)
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    ok: list[tuple[Path, Any]] = []
    for (path, _, _), pr in zip(every, probes, strict=True):
        if isinstance(pr, str):
            unreadable.append((path, pr))
            continue
        ok.append((path, pr))
        sizes[format_size(pr.height, pr.width)] += 1
        modes[pr.mode] += 1
        formats[pr.format] += 1
    problems = list(listing.problems)
    geometry: dict[str, Any] = {}
    try:
        (h, w), c = _infer_geometry(root, [p for p, _ in ok], [pr for _, pr in ok], size, channels)
        geometry = {"size": format_size(h, w), "channels": c}
    except DataError as exc:
        problems.append(str(exc))
    if decode and geometry:
        from training.data.imaging import ImageDecodeError, InputSpec, decode_pixels

        spec = InputSpec(geometry["channels"], *parse_size(geometry["size"]) or (0, 0))
        errors: dict[int, str] = {}

        def work(i: int) -> None:
            try:
                decode_pixels(ok[i][0].read_bytes(), spec, max_pixels=MAX_PIXELS)
            except ImageDecodeError as exc:
                errors[i] = str(exc)
            except OSError as exc:
                errors[i] = f"cannot read: {exc.strerror or exc}"

        decode_parallel(len(ok), work, f"checking {root.name}", progress=progress)
        unreadable += [(ok[i][0], why) for i, why in sorted(errors.items())]
    bad_paths = {p for p, _ in unreadable}
    counts: dict[str, dict[str, int]] = {}
    for source in ("train", "test") if listing.test_dir is not None else ("train",):
        per = Counter(lb for p, lb in listing.files[source] if p not in bad_paths)
        counts[source] = {name: per.get(i, 0) for i, name in enumerate(listing.classes)}
    if listing.test_dir is None:
        split = "seeded split of each class (erc train --test-fraction, default 0.2)"
    else:
        split = f"{listing.test_dir.name}/ folder"

    def rel(p: Path) -> str:
        return str(p.relative_to(root)) if root in p.parents else str(p)

    return {
        "root": str(root),
        "dataset": FOLDER_PREFIX + str(root),
        "layout": listing.layout,
        "split": split,
        "classes": list(listing.classes),
        "counts": counts,  # readable image files per class
        "images": len(every) - len(bad_paths & {p for p, _, _ in every}),
        "sizes": dict(sizes.most_common()),
        "modes": dict(modes.most_common()),
        "formats": dict(formats.most_common()),
        "inferred": geometry or None,
        "decoded": decode,
        "ignored": [{"path": rel(p), "why": why} for p, why in listing.ignored],
        "unreadable": [{"path": rel(p), "why": why} for p, why in unreadable],
        "problems": problems,
        "ok": not problems and not unreadable,
    }
