"""The dataset registry: one :class:`DatasetSpec` per dataset, and the functions built on it.

A spec says everything the package knows about a dataset: its :class:`DatasetInfo`, the files
that must be on disk (with checksums where published), the reader, where to download it from and
where it may already lie on this machine. Adding a dataset means adding one spec here and, for a
new on-disk format, one reader module; nothing else branches on the dataset's name.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data.cache import user_cache_home
from training.data.cifar import META_FILE, read_cifar_split
from training.data.cifar import SPLIT_FILES as CIFAR_FILES
from training.data.core import DataError, DatasetInfo, ImageSet, checksum_file, md5_bytes
from training.data.folder import FolderOptions, check_folder, folder_root, is_folder, load_folder
from training.data.idx import IDX_STEMS, read_idx_split, variants
from training.data.stl10 import CLASS_NAMES_FILE, read_stl10_split
from training.data.stl10 import SPLIT_FILES as STL_FILES
from training.data.tiny_imagenet import (
    VAL_ANNOTATIONS,
    WNIDS_FILE,
    WORDS_FILE,
    label_names,
    read_tiny_imagenet_split,
    read_wnids,
)
from training.errors import UnknownName

__all__ = [
    "SPLITS",
    "DatasetSpec",
    "FileSpec",
    "Resource",
    "dataset_info",
    "describe",
    "get_spec",
    "holds",
    "list_datasets",
    "load_split",
    "resolve_data_dir",
    "search_dirs",
    "user_data_dir",
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


def user_data_dir() -> Path:
    """``$ERC_CACHE_DIR/data`` (default ``~/.cache/erc/data``): where datasets go per user."""
    return user_cache_home() / "data"


def _whole(read: Callable[[Path, str, DatasetInfo], ImageSet]) -> Reader:
    """Adapt a reader that always reads the whole split: subset afterwards."""

    def reader(root: Path, split: str, info: DatasetInfo, n: int | None, seed: int) -> ImageSet:
        return read(root, split, info).subset(n, seed)

    return reader


def _idx_files(md5: Mapping[str, str], content_md5: Mapping[str, str]) -> tuple[FileSpec, ...]:
    stems = [stem for pair in IDX_STEMS.values() for stem in pair]
    return tuple(FileSpec(variants(s), md5=md5[s], content_md5=content_md5[s]) for s in stems)


def _download_hint(name: str, extra: str = "") -> str:
    return f"run `erc data download {name} --data-dir DIR` (DIR e.g. $ERC_DATA_DIR/{name}){extra}"


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
_STL_MD5 = {
    "train_X.bin": "918c2871b30a85fa023e0c44e0bee87f",
    "train_y.bin": "5a34089d4802c674881badbb80307741",
    "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82",
    "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e",
}

# Exact per-channel statistics of the training images in [0, 1]. (CIFAR-10's often-quoted std
# 0.2023/0.1994/0.2010 is the mean of per-image stds, not the dataset's std.)
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_STL10_MEAN, _STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
# Tiny ImageNet is an ImageNet subset: the usual ImageNet statistics.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_SPECS: dict[str, DatasetSpec] = {}
_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "stl-10": "stl10",
    "tinyimagenet": "tiny-imagenet",
    "tiny-imagenet-200": "tiny-imagenet",
}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset to the registry (its ``info.name`` is the key)."""
    if spec.info.name in _SPECS:
        raise ValueError(f"dataset {spec.info.name!r} is already registered")
    _SPECS[spec.info.name] = spec
    return spec


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
        reader=_whole(read_idx_split),
        files=_idx_files(_MNIST_MD5, _MNIST_RAW_MD5),
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        resources=tuple(Resource(f"{s}.gz", m) for s, m in _MNIST_MD5.items()),
        layouts=("MNIST/raw",),
        how_to_get=_download_hint("mnist"),
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
        reader=_whole(read_idx_split),
        files=_idx_files(_FASHION_MD5, _FASHION_RAW_MD5),
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        resources=tuple(Resource(f"{s}.gz", m) for s, m in _FASHION_MD5.items()),
        layouts=("FashionMNIST/raw",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        how_to_get=_download_hint(
            "fashion-mnist", ", or on Debian/Ubuntu `apt-get install dataset-fashion-mnist`"
        ),
    )
)
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
        reader=_whole(read_cifar_split),
        files=(
            *(FileSpec((f,), md5=_CIFAR_MD5[f]) for split in SPLITS for f in CIFAR_FILES[split]),
            FileSpec((META_FILE,), md5=_CIFAR_MD5[META_FILE], required=False),
        ),
        base_url="https://www.cs.toronto.edu/~kriz/",
        resources=(Resource("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", archive=True),),
        folder="cifar-10-batches-py",
        how_to_get=_download_hint("cifar10"),
    )
)
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
        reader=_whole(read_stl10_split),
        files=(
            *(FileSpec((f,), md5=_STL_MD5[f]) for split in SPLITS for f in STL_FILES[split]),
            FileSpec((CLASS_NAMES_FILE,), required=False),
        ),
        base_url="http://ai.stanford.edu/~acoates/stl10/",
        resources=(Resource("stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb", archive=True),),
        folder="stl10_binary",
        how_to_get=_download_hint("stl10"),
    )
)
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
        how_to_get=_download_hint("tiny-imagenet"),
        label_reader=lambda root, info: label_names(root, read_wnids(root, info)),
    )
)


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
