"""Baseline networks of the paper's Figure 8 (MNIST LeNet-style, STL-10 CNN, Tiny ImageNet
VGG-style) and VGG19 for CIFAR-10, used by the ``none``, ``madry`` and ``rse`` methods.

They share the :class:`EmbeddingClassifier` interface: the "embedding" of a baseline is its
penultimate activation (500 for LeNet, 512 for VGG19, 256 for the STL-10 CNN, 4096 for the
Tiny ImageNet VGG) and the head is its last linear layer.

Reconstruction note: Figure 8's STL-10 and Tiny ImageNet columns are interleaved in the paper's
text. The STL-10 CNN printed there ends with 256 channels at 3x3 after five 2x2 pools (96 -> 3) and
a ``Linear(256, 10)`` head, which only fits with a global average pool in between; we add that
pool. The Tiny ImageNet column is VGG16-BN with ``Linear(2048, 4096)`` (64 -> 2x2x512).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from training.models import register_model
from training.models.base import EmbeddingClassifier
from training.models.er import VGG16, VGG19, assemble, flat_features, vgg_body, vgg_head
from training.models.layers import scaled


@register_model
def lenet_mnist(
    *,
    num_classes: int = 10,
    width: float = 1.0,
    in_chans: int = 1,
    input_size: Sequence[int] | None = None,
    **options: Any,
) -> EmbeddingClassifier:
    """Figure 8, MNIST: conv(1,20,5)-pool-conv(20,50,5)-pool-fc(800,500)-fc(500,10), ReLU."""
    c1, c2, h = scaled(20, width), scaled(50, width), scaled(500, width)
    convs: list[nn.Module] = [
        nn.Conv2d(in_chans, c1, kernel_size=5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, kernel_size=5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]
    features: list[nn.Module] = [
        *convs,
        nn.Flatten(),
        nn.Linear(flat_features(convs, in_chans, input_size, c2 * 4 * 4), h),
        nn.ReLU(inplace=True),
    ]
    return assemble(features, nn.Linear(h, num_classes), embed_dim=h, num_classes=num_classes, **options)


@register_model
def vgg19_cifar10(
    *,
    num_classes: int = 10,
    width: float = 1.0,
    in_chans: int = 3,
    input_size: Sequence[int] | None = None,
    **options: Any,
) -> EmbeddingClassifier:
    """VGG19 with BatchNorm for 32x32 inputs (5 pools -> 1x1x512) and a Linear(512, 10) head."""
    features = [*vgg_body(in_chans, VGG19, width, batch_norm=True), nn.Flatten()]
    h = flat_features(features, in_chans, input_size, scaled(512, width))
    return assemble(features, nn.Linear(h, num_classes), embed_dim=h, num_classes=num_classes, **options)


@register_model
def cnn_stl10(
    *,
    num_classes: int = 10,
    width: float = 1.0,
    in_chans: int = 3,
    input_size: Sequence[int] | None = None,
    **options: Any,
) -> EmbeddingClassifier:
    """Figure 8, STL-10: six 3x3 conv-BN(affine=False)-ReLU blocks with five pools, global pool,
    Linear(256, 10)."""
    cfg: tuple[int | str, ...] = (32, "M", 64, "M", 128, "M", 128, "M", 256, 256, "M")
    features: list[nn.Module] = []
    prev = in_chans
    for v in cfg:
        if v == "M":
            features.append(nn.MaxPool2d(2))
            continue
        assert isinstance(v, int)
        c = scaled(v, width)
        features += [nn.Conv2d(prev, c, 3, padding=1), nn.BatchNorm2d(c, affine=False), nn.ReLU(inplace=True)]
        prev = c
    features += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    flat_features(features, in_chans, input_size, prev)  # refuses an input too small for the pools
    return assemble(
        features, nn.Linear(prev, num_classes), embed_dim=prev, num_classes=num_classes, **options
    )


@register_model
def vgg16_tinyimagenet(
    *,
    num_classes: int = 200,
    width: float = 1.0,
    in_chans: int = 3,
    input_size: Sequence[int] | None = None,
    **options: Any,
) -> EmbeddingClassifier:
    """Figure 8, Tiny ImageNet: VGG16-BN (64 -> 2x2x512), Linear(2048,4096)-ReLU-Dropout x2, 200 classes.

    The head's last Linear is the classifier; everything before it is the "embedding" (4096).
    """
    h = scaled(4096, width)
    body = vgg_body(in_chans, VGG16, width, batch_norm=True)
    head = vgg_head(flat_features(body, in_chans, input_size, scaled(512, width) * 2 * 2), h, num_classes)
    features = [*body, nn.Flatten(), *list(head)[:-1]]
    return assemble(features, head[-1], embed_dim=h, num_classes=num_classes, **options)
