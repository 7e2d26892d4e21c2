"""Registry of architectures, built by name (``create_model("er_mnist", embed_dim=4)``).

Architectures follow the paper's Figures 8-10; each builder returns an
:class:`~training.models.base.EmbeddingClassifier` (or, for the discriminator, an ``nn.Module``)
and accepts keyword arguments only. ``arch_for(dataset, family)`` maps a dataset name to its
architecture, so datasets of the same geometry (MNIST and Fashion-MNIST) share one; any other
dataset (an image folder) gets the paper's network of the closest input geometry
(:func:`closest_geometry`), its first and last layers fitted to the input (``in_chans``,
``input_size``).
"""

from __future__ import annotations

import fnmatch
import importlib
import math
import pkgutil
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from training.errors import UnknownName

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register an architecture builder under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a glob pattern, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture; unknown names raise ``KeyError`` listing the known ones."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise UnknownName(f"unknown architecture {name!r}; known: {', '.join(list_models())}") from None
    return builder(**kwargs)


# Dataset geometry -> architecture suffix. Fashion-MNIST has MNIST's geometry.
_ARCH_DATASET = {
    "mnist": "mnist",
    "fashion-mnist": "mnist",
    "cifar10": "cifar10",
    "stl10": "stl10",
    "tiny-imagenet": "tinyimagenet",
}
# Family -> architecture prefix per dataset suffix (baselines of Figure 8, VGG19 on CIFAR-10).
_FAMILY_PREFIX = {
    "er": {"mnist": "er", "cifar10": "er", "stl10": "er", "tinyimagenet": "er"},
    "baseline": {"mnist": "lenet", "cifar10": "vgg19", "stl10": "cnn", "tinyimagenet": "vgg16"},
}


# The input each architecture suffix was designed for: (channels, side in pixels) of the paper's
# datasets (Figure 9: MNIST 28; Figure 10: CIFAR-10 32, Tiny ImageNet 64, STL-10 96).
GEOMETRY = {"mnist": (1, 28), "cifar10": (3, 32), "tinyimagenet": (3, 64), "stl10": (3, 96)}


def closest_geometry(shape: Sequence[int]) -> str:
    """The architecture suffix whose paper input is closest to ``shape`` = (C, H, W).

    Among the networks whose paper input is no larger than the image's shorter side (their
    downsampling then fits: STL-10's encoder needs 96 pixels, the VGGs 32), the closest in scale
    (``|log(side / paper side)|`` with side = sqrt(H * W)), since the depth of the downsampling is
    what ties a network to an image size; equal scales go to the network of the same channel count.
    28 -> Figure 9, 32 and 48 -> CIFAR-10's encoder, 64 and 80 -> Tiny ImageNet's, 96 and up ->
    STL-10's; images under 28 pixels get Figure 9's (it takes 16 and up).
    """
    c, h, w = (int(v) for v in shape)
    side = math.sqrt(h * w)
    fitting = [s for s in GEOMETRY if GEOMETRY[s][1] <= min(h, w)] or ["mnist"]
    return min(fitting, key=lambda s: (round(abs(math.log(side / GEOMETRY[s][1])), 9), GEOMETRY[s][0] != c))


def arch_for(dataset: str, family: str, shape: Sequence[int] | None = None) -> str:
    """Architecture name for a dataset and a family (``"er"`` or ``"baseline"``).

    A dataset that is not one of the paper's (an image folder) needs its ``shape`` (C, H, W): it gets
    the family's network of the :func:`closest_geometry`.
    """
    if family not in _FAMILY_PREFIX:
        raise UnknownName(f"unknown model family {family!r}; known: {', '.join(sorted(_FAMILY_PREFIX))}")
    if dataset in _ARCH_DATASET:
        suffix = _ARCH_DATASET[dataset]
    elif shape is not None:
        suffix = closest_geometry(shape)
    else:
        known = ", ".join(sorted(_ARCH_DATASET))
        raise UnknownName(f"no architecture for dataset {dataset!r}; known: {known} (or give its shape)")
    return f"{_FAMILY_PREFIX[family][suffix]}_{suffix}"


# Below this many training images, an image folder gets a compact network (see folder_arch).
SMALL_SET = 20_000
# The ER encoders with BatchNorm and few layers (Figure 9's four and Figure 10's STL-10 six 4x4
# stride-2 convolutions), by the smallest image side they take.
_COMPACT_ER = (("mnist", 16), ("stl10", 96))


def folder_arch(family: str, shape: Sequence[int], train_n: int) -> tuple[str, str]:
    """(architecture, why) for an image folder of ``train_n`` training images of ``shape`` (C, H, W).

    From :data:`SMALL_SET` images up, the paper's network of the :func:`closest_geometry`. Below,
    the ER family takes the compact encoder of the paper that fits the image size (Figure 9's four
    4x4 stride-2 convolutions with BatchNorm below 96 pixels, STL-10's six from 96): the paper's
    CIFAR-10 encoder is a VGG19 stack without BatchNorm and Tiny ImageNet's a VGG16-BN with a
    4096-wide head, both sized for 50,000-100,000 images. Measured on 180-image folders
    (docs/own-data.md): at 32 pixels the CIFAR-10 encoder stayed at chance (loss ln 3) for 6
    epochs where Figure 9's reached 100 % in 2; at 64 pixels Tiny ImageNet's stayed at 67 % for
    4 epochs (3x slower per epoch) where Figure 9's reached 87 %. The baselines keep their VGGs,
    which have BatchNorm and train on small sets.
    """
    closest = arch_for("folder", family, shape)
    if family != "er" or train_n >= SMALL_SET:
        return closest, f"the paper's network for the closest input geometry ({train_n} training images)"
    side = min(int(shape[1]), int(shape[2]))
    suffix = [s for s, least in _COMPACT_ER if side >= least][-1] if side >= 16 else "mnist"
    arch = f"{_FAMILY_PREFIX[family][suffix]}_{suffix}"
    if arch == closest:
        return arch, f"the paper's network for the closest input geometry ({train_n} training images)"
    return arch, (
        f"a compact encoder for a small set: {train_n} training images < {SMALL_SET:,}; "
        f"the paper's {closest} is a VGG stack sized for 50,000+ images that does not train on so few"
    )


# Every module of the package registers the architectures it defines, as the attacks do; at the
# bottom so the decorator above exists. A new architecture module needs no line here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
from training.models.base import EmbeddingClassifier, GaussianEncoder  # noqa: E402
from training.models.er import build_discriminator  # noqa: E402

__all__ = [
    "GEOMETRY",
    "EmbeddingClassifier",
    "GaussianEncoder",
    "arch_for",
    "build_discriminator",
    "closest_geometry",
    "create_model",
    "folder_arch",
    "list_models",
    "register_model",
]
