"""The datasets: what a dataset is (:class:`DatasetSpec`), the registry of them, and the functions
built on it (where the data lies, loading a split, ``erc data info``).

A spec says everything the package knows about a dataset: its :class:`DatasetInfo`, the files
that must be on disk (with checksums where published), the reader, where to download it from and
where it may already lie on this machine. Each dataset family declares its specs once, in its own
module beside its reader, and calls :func:`register` (as each attack does in
:mod:`training.attacks`): :mod:`training.data.idx` (the IDX sets: MNIST, Fashion-MNIST),
:mod:`training.data.cifar`, :mod:`training.data.stl10`, :mod:`training.data.tiny_imagenet`.
:mod:`training.data` imports every module of the package, so the registry is complete; a new
dataset is one spec in its family's module, a new family one module. Nothing here branches on a
dataset's name.

Where the data lies (:func:`resolve_data_dir`)
----------------------------------------------
The function returns the folder that directly holds the dataset's files (e.g. the
``cifar-10-batches-py`` folder itself). Given a folder ``B`` it accepts, in this order:

1. ``B`` itself holding the files;
2. ``B/<canonical folder>`` -- ``cifar-10-batches-py``, ``stl10_binary``, ``tiny-imagenet-200``:
   what the archives unpack to, and what ``erc data download NAME --data-dir B`` leaves;
3. torchvision's layout for the IDX sets: ``B/MNIST/raw``, ``B/FashionMNIST/raw``;
4. the same three below ``B/<name>``, so a folder holding several datasets (``$ERC_DATA_DIR``
   itself) works too.

An explicit ``data_dir`` is the only ``B`` tried. Without one, ``B`` runs through
``$ERC_DATA_DIR/<name>``, ``./data/<name>`` (below the working directory),
``$ERC_CACHE_DIR/data/<name>`` (default ``~/.cache/erc/data/<name>``) and the dataset's system
locations (the Debian package ``dataset-fashion-mnist``'s ``/usr/share/datasets/fashion-mnist``);
the first folder that holds every required file wins. Nothing is looked for relative to the
package's own files: an installed wheel and a checkout search the same places (a checkout's
development data is the Makefile's and the tests' business: they set ``ERC_DATA_DIR``).
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data.cache import user_cache_home
from training.data.core import DataError, DatasetInfo, ImageSet, checksum_file, md5_bytes
from training.data.folder import FolderOptions, check_folder, folder_root, is_folder, load_folder
from training.errors import UnknownName

__all__ = [
    "SPLITS",
    "DatasetSpec",
    "FileSpec",
    "Resource",
    "dataset_info",
    "describe",
    "download_hint",
    "get_spec",
    "holds",
    "list_datasets",
    "load_split",
    "register",
    "resolve_data_dir",
    "search_dirs",
    "user_data_dir",
    "whole_split",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "test")

# reader(root, split, info, n, seed) -> ImageSet of n samples (all when n is None)
Reader = Callable[[Path, str, DatasetInfo, int | None, int], ImageSet]


@dataclass(frozen=True)
class FileSpec:
    """One file (or folder) a dataset needs, relative to the folder that holds the dataset."""

    names: tuple[str, ...]  # accepted names, preferred (as distributed) first
    md5: str | None = None  # published md5 of names[0]
    content_md5: str | None = None  # md5 of the decompressed content (a .gz) or of the raw alternative
    required: bool = True  # False: read and checked when present (class names, meta), not needed
    is_dir: bool = False


@dataclass(frozen=True)
class Resource:
    """A file to download from the dataset's base URL."""

    filename: str
    md5: str
    archive: bool = False  # tar.gz / zip that unpacks to DatasetSpec.folder


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the package knows about one dataset; registered once with :func:`register`."""

    info: DatasetInfo
    reader: Reader
    files: tuple[FileSpec, ...]
    base_url: str
    resources: tuple[Resource, ...]
    folder: str | None = None  # canonical folder name (what the archive unpacks to), if any
    layouts: tuple[str, ...] = ()  # further accepted sub-folders (torchvision's "MNIST/raw")
    system_dirs: tuple[str, ...] = ()  # absolute folders where a system package installs it
    how_to_get: str = ""
    # For sets whose class names live in the files (Tiny ImageNet): (root, info) -> label names.
    label_reader: Callable[[Path, DatasetInfo], tuple[str, ...]] | None = None
    aliases: tuple[str, ...] = ()  # further accepted names ("cifar-10"): lower case, "-" not "_"
    # Where it is listed (erc list, erc data list/check, an error's known names): the paper's
    # order, whatever order the family modules are imported in (ties: import order).
    order: int = 100


def user_data_dir() -> Path:
    """``$ERC_CACHE_DIR/data`` (default ``~/.cache/erc/data``): where datasets go per user."""
    return user_cache_home() / "data"


def whole_split(read: Callable[[Path, str, DatasetInfo], ImageSet]) -> Reader:
    """Adapt a reader that always reads the whole split: subset afterwards."""

    def reader(root: Path, split: str, info: DatasetInfo, n: int | None, seed: int) -> ImageSet:
        return read(root, split, info).subset(n, seed)

    return reader


def download_hint(name: str, extra: str = "") -> str:
    """A spec's ``how_to_get`` for a dataset that ``erc data download`` fetches."""
    return f"run `erc data download {name} --data-dir DIR` (DIR e.g. $ERC_DATA_DIR/{name}){extra}"


_SPECS: dict[str, DatasetSpec] = {}  # canonical name -> spec, in listing order
_ALIASES: dict[str, str] = {}  # alias -> canonical name


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset to the registry (its ``info.name`` is the key); called once, by the module of
    its family."""
    name = spec.info.name
    for key in (name, *spec.aliases):
        if key in _SPECS or key in _ALIASES:
            raise ValueError(f"dataset name {key!r} of {name!r} is already registered")
    ordered = sorted([*_SPECS.values(), spec], key=lambda sp: sp.order)  # stable
    _SPECS.clear()
    _SPECS.update((sp.info.name, sp) for sp in ordered)
    _ALIASES.update(dict.fromkeys(spec.aliases, name))
    return spec


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _SPECS:
        raise UnknownName(f"unknown dataset {name!r}; known: {', '.join(_SPECS)}")
    return key


def get_spec(name: str) -> DatasetSpec:
    """The registered spec of ``name`` (case and ``_``/``-`` insensitive); KeyError lists known names."""
    return _SPECS[_canonical(name)]


def list_datasets() -> list[str]:
    """Canonical names of every registered dataset."""
    return list(_SPECS)


def dataset_info(name: str, folder: FolderOptions | None = None) -> DatasetInfo:
    """Static facts about a dataset. Tiny ImageNet's ``label_names`` is () here: its names come
    from the files and are filled in by :func:`load_split`. An image folder (``folder:PATH``) is
    read (or taken from its cache) to know them, with ``folder``'s options."""
    if is_folder(name):
        return load_folder(name, folder).info
    return get_spec(name).info


def _candidates(spec: DatasetSpec, base: Path) -> list[Path]:
    rels = ["", *([spec.folder] if spec.folder else []), *spec.layouts]
    return [base / r for r in rels] + [base / spec.info.name / r for r in rels]


def _missing(spec: DatasetSpec, folder: Path) -> list[FileSpec]:
    """The required files of ``spec`` that ``folder`` lacks (existence only, no checksums)."""
    missing = []
    for fs in spec.files:
        check = Path.is_dir if fs.is_dir else Path.is_file
        if fs.required and not any(check(folder / n) for n in fs.names):
            missing.append(fs)
    return missing


def holds(spec: DatasetSpec, folder: Path) -> bool:
    """Whether ``folder`` directly holds every required file of ``spec`` (existence only, no checksums)."""
    return not _missing(spec, folder)


def search_dirs(name: str) -> list[Path]:
    """The folders :func:`resolve_data_dir` tries, in order, when no ``data_dir`` is given."""
    spec = get_spec(name)
    key = spec.info.name
    dirs: list[Path] = []
    env = os.environ.get("ERC_DATA_DIR")
    if env:
        dirs.append(Path(env).expanduser() / key)
    dirs.append(Path.cwd() / "data" / key)
    dirs.append(user_data_dir() / key)
    dirs.extend(Path(d) for d in spec.system_dirs)
    return dirs


def _required_names(spec: DatasetSpec) -> str:
    return ", ".join(" or ".join(fs.names) + ("/" if fs.is_dir else "") for fs in spec.files if fs.required)


def resolve_data_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder that directly holds ``name``'s files (see the module docstring for what is accepted).

    Raises DataError, listing the places tried and how to get the data, when none holds them.
    """
    spec = get_spec(name)
    bases = [Path(data_dir).expanduser()] if data_dir is not None else search_dirs(name)
    required = sum(fs.required for fs in spec.files)
    partial: tuple[int, Path, list[FileSpec]] | None = None  # the most complete folder seen
    for base in bases:
        for folder in _candidates(spec, base):
            missing = _missing(spec, folder)
            if not missing:
                return Path(os.path.abspath(folder))
            if len(missing) < required and (partial is None or len(missing) < partial[0]):
                partial = (len(missing), folder, missing)
    # A half-present dataset usually means an interrupted copy: say exactly what is missing.
    closest = ""
    if partial is not None:
        lacking = ", ".join(str(partial[1] / fs.names[0]) for fs in partial[2])
        closest = f" Closest: {partial[1]}, where {lacking} is missing."
    where = ", ".join(str(b) for b in bases)
    layouts = ", ".join(
        ["<dir>", *(f"<dir>/{r}" for r in ([spec.folder] if spec.folder else []) + list(spec.layouts))]
    )
    raise DataError(
        f"{spec.info.name}: no folder holds {_required_names(spec)}; looked in {where} "
        f"(as {layouts}, and the same under <dir>/{spec.info.name}).{closest} "
        f"To get the data: {spec.how_to_get}.",
        path=partial[1] if partial is not None else (bases[0] if data_dir is not None else None),
    )


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    folder: FolderOptions | None = None,
) -> ImageSet:
    """Read one split ("train", or "test" = the labelled evaluation split) of a dataset.

    Returns an :class:`ImageSet` of uint8 images [N, C, H, W] and int64 labels [N]; with ``n``, a
    random subset of ``n`` samples chosen by ``seed`` (see :meth:`ImageSet.subset`).
    ``name`` may be an image folder, ``folder:PATH`` (:mod:`training.data.folder`), read with
    ``folder``'s options (size, channels, split; default: inferred); ``data_dir`` is then unused.
    Unknown names raise KeyError, unknown splits ValueError, any missing or bad file DataError.
    """
    if is_folder(name):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        both = load_folder(name, folder)
        return (both.train if split == "train" else both.test).subset(n, seed)
    spec = get_spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {spec.info.name}; allowed: {', '.join(SPLITS)}")
    root = resolve_data_dir(name, data_dir)
    start = time.perf_counter()
    data = spec.reader(root, split, spec.info, n, seed)
    log.info(
        "loaded %s/%s: %d images %s from %s in %.1fs",
        spec.info.name,
        split,
        len(data),
        tuple(data.images.shape[1:]),
        root,
        time.perf_counter() - start,
    )
    return data


def _gunzip_md5(path: Path) -> str | None:
    try:
        return md5_bytes(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, zlib.error):
        return None


def _file_status(root: Path | None, fs: FileSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": str(root / fs.names[0]) if root else fs.names[0],
        "required": fs.required,
        "exists": False,
        "size": None,
        "md5": None,
        "expected_md5": fs.md5,
        "checksum": "missing",
    }
    present = next((root / n for n in fs.names if (root / n).exists()), None) if root else None
    if present is None:
        return entry
    entry.update(path=str(present), exists=True, checksum="unknown")
    if fs.is_dir:
        return entry
    entry["size"] = present.stat().st_size
    is_first = present.name == Path(fs.names[0]).name
    if is_first and fs.md5:
        entry["md5"] = checksum_file(present)
        if entry["md5"] == fs.md5:
            entry["checksum"] = "ok"
        elif fs.content_md5 and present.suffix == ".gz" and _gunzip_md5(present) == fs.content_md5:
            entry.update(checksum="ok", note="re-compressed copy: the decompressed content matches")
        else:
            entry["checksum"] = "mismatch"
    elif fs.content_md5:
        entry["md5"] = checksum_file(present)
        entry["expected_md5"] = fs.content_md5
        entry["checksum"] = "ok" if entry["md5"] == fs.content_md5 else "mismatch"
    return entry


def describe(name: str, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What ``erc data info`` shows: where the data is, which files are there and whether they check out.

    Returns a JSON-serializable dict with ``name``, ``found``, ``data_dir`` (the resolved folder or
    None), ``searched`` (folders tried), ``error`` (why nothing was found, or None), ``how_to_get``,
    ``files`` (one entry per expected file: ``path``, ``required``, ``exists``, ``size``, ``md5``,
    ``expected_md5``, ``checksum`` in {"ok", "mismatch", "missing", "unknown"}), ``archives``
    (the downloadable archives, looked for beside the data folder), ``download`` (base URL and
    files) and ``info`` (the DatasetInfo fields plus ``shape``).
    """
    if is_folder(name):
        return check_folder(folder_root(name), decode=False)
    spec = get_spec(name)
    info = spec.info
    root: Path | None
    error: str | None = None
    try:
        root = resolve_data_dir(name, data_dir)
    except DataError as exc:
        root, error = None, str(exc)
    if root is not None and spec.label_reader is not None:
        try:
            info = dataclasses.replace(info, label_names=spec.label_reader(root, info))
        except DataError as exc:
            error = str(exc)
    searched = _candidates(spec, Path(data_dir).expanduser()) if data_dir is not None else search_dirs(name)
    archives = []
    for res in spec.resources:
        if not res.archive:
            continue
        # download() leaves the archive in the folder that holds the canonical folder.
        holder = root.parent if root is not None and root.name == spec.folder else root
        fs = FileSpec((res.filename,), md5=res.md5, required=False)
        archives.append(_file_status(holder, fs))
    return {
        "name": info.name,
        "found": root is not None,
        "data_dir": str(root) if root is not None else None,
        "searched": [str(p) for p in searched],
        "error": error,
        "how_to_get": spec.how_to_get,
        "files": [_file_status(root, fs) for fs in spec.files],
        "archives": archives,
        "download": {"base_url": spec.base_url, "files": [r.filename for r in spec.resources]},
        "info": {**dataclasses.asdict(info), "shape": info.shape},
    }
