"""The types every reader returns: :class:`DataError`, :class:`DatasetInfo`, :class:`ImageSet`.

Kept apart from the readers so that each format module, the registry and the downloader can
import them without importing one another.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from training.errors import ErcError

__all__ = ["DataError", "DatasetInfo", "ImageSet", "checksum_file", "md5_bytes", "subset_indices"]

_CHUNK = 1 << 20


class DataError(ErcError):
    """A data file is missing, corrupt, truncated or disagrees with its siblings or checksum.

    The message always names the offending path and what is wrong with it; ``path`` holds that
    path too (``None`` where no single file is to blame, e.g. "no folder holds the dataset").
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: geometry, classes and preprocessing."""

    name: str  # canonical name: "mnist", "fashion-mnist", "cifar10", "stl10", "tiny-imagenet"
    channels: int  # C of the [N, C, H, W] images
    height: int  # H in pixels
    width: int  # W in pixels
    num_classes: int  # labels lie in [0, num_classes)
    label_names: tuple[str, ...]  # index -> human-readable name; () until known (Tiny ImageNet)
    train_eps: float | None  # l_inf radius of adversarial training in [0, 1] pixel units; None: no default
    mean: tuple[float, ...] | None  # per-channel normalization applied inside the model, or None
    std: tuple[float, ...] | None  # per-channel std for that normalization, or None

    def __post_init__(self) -> None:
        if self.label_names and len(self.label_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.label_names)} label names for {self.num_classes} classes"
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"{self.name}: give both mean and std, or neither")
        for stat in (self.mean, self.std):
            if stat is not None and len(stat) != self.channels:
                raise ValueError(
                    f"{self.name}: {len(stat)} normalization values for {self.channels} channels"
                )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.height, self.width)


def subset_indices(total: int, n: int | None, seed: int = 0) -> torch.Tensor | None:
    """Indices of ``n`` samples drawn without replacement from ``range(total)``, in ascending order.

    Returns ``None`` (meaning "all of them") when ``n`` is None or ``n >= total``. The draw is a
    ``torch.randperm`` under a generator seeded with ``seed``, so it is the same on every call;
    readers that can skip decoding (Tiny ImageNet) use it to pick exactly the samples that
    :meth:`ImageSet.subset` would pick from the full set.
    """
    if n is None or n >= total:
        return None
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    gen = torch.Generator().manual_seed(seed)
    # Sorted so that a subset keeps the files' order: friendlier to disk caches and to debugging.
    return torch.randperm(total, generator=gen)[:n].sort().values


@dataclass
class ImageSet:
    """A labelled split held in memory.

    ``images`` is uint8 of shape [N, C, H, W] (contiguous, values 0..255); ``labels`` is int64 of
    shape [N] with values in [0, info.num_classes).
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if tuple(self.images.shape[1:]) != self.info.shape:
            raise ValueError(
                f"images are {tuple(self.images.shape[1:])}, {self.info.name} is {self.info.shape}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if self.labels.numel() and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= self.info.num_classes
        ):
            raise ValueError(f"labels outside [0, {self.info.num_classes})")
        self.images = self.images.contiguous()
        self.labels = self.labels.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, n: int | None, seed: int = 0) -> ImageSet:
        """``n`` samples drawn at random (without replacement, deterministic for ``seed``).

        The whole set (``self``) is returned when ``n`` is None or ``n >= len(self)``. The chosen
        samples keep their original relative order.
        """
        idx = subset_indices(len(self), n, seed)
        if idx is None:
            return self
        return ImageSet(self.images[idx], self.labels[idx], self.info)

    def as_float(self) -> torch.Tensor:
        """Images as float32 in [0, 1], shape [N, C, H, W]."""
        return unit_float(self.images)


def unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]: ``pixel / 255``, the one input scaling of every model
    here (datasets, the service's decoded requests)."""
    return pixels.to(torch.float32).div_(255.0)


def from_numpy(
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.integer],
    info: DatasetInfo,
) -> ImageSet:
    """Wrap reader output (uint8 [N, C, H, W], integer [N]) as an :class:`ImageSet` without copying."""
    return ImageSet(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64, copy=False)),
        info,
    )


def checksum_file(path: str | os.PathLike[str]) -> str:
    """MD5 of a file's bytes as 32 lowercase hex digits (read in 1 MiB chunks)."""
    # md5 because that is what the datasets' publishers and torchvision list; it guards against
    # corruption, not tampering.
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def md5_bytes(data: bytes) -> str:
    """MD5 hex digest of an in-memory buffer."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()
