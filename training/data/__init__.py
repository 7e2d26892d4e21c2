"""Datasets of the ER-Classifier paper (plus Fashion-MNIST), read from their original files.

Readers, one per on-disk format, with no torchvision:

- ``mnist``, ``fashion-mnist``: gzipped (or plain) IDX files (:mod:`training.data.idx`);
- ``cifar10``: the pickled "python version" batches, through a restricted unpickler
  (:mod:`training.data.cifar`);
- ``stl10``: the column-major binary files (:mod:`training.data.stl10`);
- ``tiny-imagenet``: JPEG folders, decoded once and cached (:mod:`training.data.tiny_imagenet`);
- ``folder:PATH``: your own images, one folder per class, decoded once by the service's decoder
  and cached (:mod:`training.data.folder`).

Every split comes back as an :class:`ImageSet`: uint8 images [N, C, H, W] and int64 labels [N].
Splits are "train" and "test" (the labelled evaluation split; Tiny ImageNet's ``val/``).
Anything wrong with the files raises :class:`DataError`, whose message names the file.
Each family's module declares its datasets (:class:`~training.data.datasets.DatasetSpec`) once and
registers them; importing this package imports every module in it, so the registry is complete.
Where the files are looked for is described in :mod:`training.data.datasets`; downloading with
checksum verification is :func:`training.data.download.download`.

Example::

    from training.data import load_split
    test = load_split("cifar10", "test", n=1000, seed=0)
    x, y = test.as_float(), test.labels  # [1000, 3, 32, 32] in [0, 1], [1000]
"""

import importlib
import pkgutil

from training.data.core import DataError, DatasetInfo, ImageSet
from training.data.datasets import (
    dataset_info,
    describe,
    list_datasets,
    load_split,
    resolve_data_dir,
)
from training.data.folder import FolderOptions, is_folder

# Every module of the package that holds a dataset family registers its specs (the others, none).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DataError",
    "DatasetInfo",
    "FolderOptions",
    "ImageSet",
    "dataset_info",
    "describe",
    "is_folder",
    "list_datasets",
    "load_split",
    "resolve_data_dir",
]
