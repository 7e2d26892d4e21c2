"""Registry of architectures, built by name (``create_model("er_mnist", embed_dim=4)``).

Architectures follow the paper's Figures 8-10; each builder returns an
:class:`~training.models.base.EmbeddingClassifier` (or, for the discriminator, an ``nn.Module``)
and accepts keyword arguments only. ``arch_for(dataset, family)`` maps a dataset name to its
architecture, so datasets of the same geometry (MNIST and Fashion-MNIST) share one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
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


def arch_for(dataset: str, family: str) -> str:
    """Architecture name for a dataset and a family (``"er"`` or ``"baseline"``)."""
    if dataset not in _ARCH_DATASET:
        known = ", ".join(sorted(_ARCH_DATASET))
        raise UnknownName(f"no architecture for dataset {dataset!r}; known: {known}")
    if family not in _FAMILY_PREFIX:
        raise UnknownName(f"unknown model family {family!r}; known: {', '.join(sorted(_FAMILY_PREFIX))}")
    suffix = _ARCH_DATASET[dataset]
    return f"{_FAMILY_PREFIX[family][suffix]}_{suffix}"


# Import for the registration side effect; at the bottom so the decorators above exist.
from training.models import baselines, er  # noqa: E402, F401
from training.models.base import EmbeddingClassifier, GaussianEncoder  # noqa: E402
from training.models.er import build_discriminator  # noqa: E402

__all__ = [
    "EmbeddingClassifier",
    "GaussianEncoder",
    "arch_for",
    "build_discriminator",
    "create_model",
    "list_models",
    "register_model",
]
