"""ER-Classifier encoders, classifiers (paper Figures 9-10) and the latent discriminator.

Every builder takes keyword arguments:

- ``embed_dim``: embedding size k (defaults from Table 3: MNIST 4, CIFAR-10 16, STL-10 16,
  Tiny ImageNet 20);
- ``num_classes``: number of logits;
- ``width``: channel / hidden-width multiplier (1.0 is the paper's size; 0.25 is a slim variant
  for CPU training);
- ``variational``: the encoder emits (mu, log-variance) for VAE-CLA; inference uses mu;
- ``mean`` / ``std``: optional per-channel normalization applied inside the model;
- ``noise_init`` / ``noise_inner`` / ``ensemble``: Random Self-Ensemble noise layers (0 disables);
- ``in_chans`` / ``input_size``: input channels and ``(height, width)`` when they differ from the
  paper's dataset (image folders). The convolutions stay the paper's; the layer after the last one
  is sized for what they give on that input (a dry run on zeros), so a 40x40 input gets Figure 9's
  encoder with a ``Linear(1024 * 2 * 2, k)``. Inputs too small for the network's downsampling are
  refused with the size it needs.

Deviation from the figures, on purpose: the CIFAR-10 classifier's last layer prints
``out_features=16`` in Figure 10, which cannot be right for 10 classes; we use ``num_classes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from training.models import register_model
from training.models.base import EmbeddingClassifier, GaussianEncoder
from training.models.layers import Conv2d, GaussianNoise, Normalize, scaled


def _normalize(mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalize | None:
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError("give both mean and std, or neither")
    return Normalize(mean, std)


def flat_features(
    layers: Sequence[nn.Module], in_chans: int, input_size: Sequence[int] | None, default: int
) -> int:
    """Features ``layers`` produce for one ``[in_chans, H, W]`` input, flattened; ``default`` (the
    paper's geometry) when ``input_size`` is None. A dry run on zeros, in eval mode, without grad."""
    if input_size is None:
        return default
    h, w = (int(v) for v in input_size)
    body = nn.Sequential(*layers)
    was = body.training
    body.eval()
    try:
        with torch.no_grad():
            out = body(torch.zeros(1, in_chans, h, w))
    except RuntimeError as exc:  # a convolution or pool larger than what is left of the image
        raise ValueError(f"a {w}x{h} input is too small for this network's downsampling ({exc})") from None
    finally:
        body.train(was)
    if out.numel() == 0:
        raise ValueError(f"a {w}x{h} input is too small for this network's downsampling (nothing is left)")
    return int(out[0].numel())


def _dcgan_body(in_chans: int, chans: Sequence[int]) -> list[nn.Module]:
    """4x4 stride-2 convolutions, no bias, BatchNorm after all but the first (Figure 9, MNIST/STL)."""
    layers: list[nn.Module] = []
    prev = in_chans
    for i, c in enumerate(chans):
        layers.append(Conv2d(prev, c, kernel_size=4, stride=2, padding=1, bias=False))
        if i > 0:
            layers.append(nn.BatchNorm2d(c))
        layers.append(nn.ReLU(inplace=True))
        prev = c
    return layers


def vgg_body(in_chans: int, cfg: Sequence[int | str], width: float, batch_norm: bool) -> list[nn.Module]:
    """VGG feature layers from a config list (ints: 3x3 convs, "M": 2x2 max-pool)."""
    layers: list[nn.Module] = []
    prev = in_chans
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(v, int)
        c = scaled(v, width)
        layers.append(nn.Conv2d(prev, c, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c))
        layers.append(nn.ReLU(inplace=True))
        prev = c
    return layers


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19 = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
)


def _bn_mlp_classifier(embed_dim: int, num_classes: int, width: float) -> nn.Sequential:
    """Linear(k,500)-BN-ReLU-Linear(500,256)-BN-ReLU-Linear(256,m) (Figure 9 MNIST, Figure 10 STL-10)."""
    h1, h2 = scaled(500, width), scaled(256, width)
    return nn.Sequential(
        nn.Linear(embed_dim, h1),
        nn.BatchNorm1d(h1),
        nn.ReLU(inplace=True),
        nn.Linear(h1, h2),
        nn.BatchNorm1d(h2),
        nn.ReLU(inplace=True),
        nn.Linear(h2, num_classes),
    )


def with_rse_noise(body: list[nn.Module], noise_init: float, noise_inner: float) -> list[nn.Module]:
    """Insert RSE noise layers before every convolution: ``noise_init`` before the first, then
    ``noise_inner`` (Liu et al. 2017, Section 3.1). Identity when both are 0."""
    if noise_init == 0 and noise_inner == 0:
        return body
    out: list[nn.Module] = []
    first = True
    for layer in body:
        if isinstance(layer, nn.Conv2d):
            out.append(GaussianNoise(noise_init if first else noise_inner))
            first = False
        out.append(layer)
    return out


def assemble(
    features: list[nn.Module],
    classifier: nn.Module,
    *,
    embed_dim: int,
    num_classes: int,
    embed_from: int | None = None,
    variational: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    noise_init: float = 0.0,
    noise_inner: float = 0.0,
    ensemble: int = 1,
) -> EmbeddingClassifier:
    """The options every architecture shares, in one place.

    ``features`` are the encoder's layers; with ``embed_from`` set (ER encoders) they end in a
    flatten and a ``Linear(embed_from, k)`` embedding layer (``2k`` outputs for VAE encoders),
    otherwise (baselines) the features themselves are the embedding. Normalization (``mean``,
    ``std``), RSE noise layers and the inference ensemble are added here.
    """
    features = with_rse_noise(features, noise_init, noise_inner)
    if embed_from is not None:
        fc = nn.Linear(embed_from, 2 * embed_dim if variational else embed_dim)
        body = nn.Sequential(*features, nn.Flatten(), fc)
        encoder: nn.Module = GaussianEncoder(body, embed_dim) if variational else body
    elif variational:
        raise ValueError("only ER encoders can be variational")
    else:
        encoder = nn.Sequential(*features)
    return EmbeddingClassifier(
        encoder,
        classifier,
        embed_dim=embed_dim,
        num_classes=num_classes,
        normalize=_normalize(mean, std),
        ensemble=ensemble,
    )


# Every builder takes these keyword options besides its own (see ``assemble``): variational, mean,
# std, noise_init, noise_inner, ensemble.


@register_model
def er_mnist(
    *,
    embed_dim: int = 4,
    num_classes: int = 10,
    width: float = 1.0,
    in_chans: int = 1,
    input_size: Sequence[int] | None = None,
    **options: Any,
) -> EmbeddingClassifier:
    """Figure 9, MNIST: 4 conv layers 128-256-512-1024 (28->14->7->3->1), fc 1024->k; BN-MLP head."""
    chans = [scaled(c, width) for c in (128, 256, 512, 1024)]
    body = _dcgan_body(in_chans, chans)
    return assemble(
        body,
        _bn_mlp_classifier(embed_dim, num_classes, width),
        embed_dim=embed_dim,
        num_classes=num_classes,
        embed_from=flat_features(body, in_chans, input_size, chans[-1]),
        **options,
    )


@register_model
def er_stl10(
    *,
    embed_dim: int = 16,
    num_classes: int = 10,
    width: float = 1.0,
    in_chans: int = 3,
    input_size: Sequence[int] | None = None,
    **options: Any,
) -> EmbeddingClassifier:
    """Figure 10, STL-10: 5 stride-2 convs 128..2048 then a 3x3 stride-2 conv (96->...->3->1)."""
    chans = [scaled(c, width) for c in (128, 256, 512, 1024, 2048)]
    last = scaled(2048, width)
    body = [
        *_dcgan_body(in_chans, chans),
        nn.Conv2d(chans[-1], last, kernel_size=3, stride=2, bias=False),
        nn.BatchNorm2d(last),
        nn.ReLU(True),
    ]
    return assemble(
        body,
        _bn_mlp_classifier(embed_dim, num_classes, width),
        embed_dim=embed_dim,
        num_classes=num_classes,
        embed_from=flat_features(body, in_chans, input_size, last),
        **options,
    )


@register_model
def er_cifar10(
    *,
    embed_dim: int = 16,
    num_classes: int = 10,
    width: float = 1.0,
    in_chans: int = 3,
    input_size: Sequence[int] | None = None,
    **options: Any,
) -> EmbeddingClassifier:
    """Figure 10, CIFAR-10: VGG19 features without BatchNorm (32->1), fc 512->k; dropout MLP head."""
    h = scaled(512, width)
    classifier = nn.Sequential(
        nn.Linear(embed_dim, h),
        nn.Dropout(0.5),
        nn.Linear(h, h),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(h, h),
        nn.ReLU(inplace=True),
        nn.Linear(h, num_classes),
    )
    body = vgg_body(in_chans, VGG19, width, batch_norm=False)
    return assemble(
        body,
        classifier,
        embed_dim=embed_dim,
        num_classes=num_classes,
        embed_from=flat_features(body, in_chans, input_size, scaled(512, width)),
        **options,
    )


def vgg_head(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """Linear-ReLU-Dropout twice, then Linear: the VGG classifier (Tiny ImageNet, Figures 8 and 10)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )


@register_model
def er_tinyimagenet(
    *,
    embed_dim: int = 20,
    num_classes: int = 200,
    width: float = 1.0,
    in_chans: int = 3,
    input_size: Sequence[int] | None = None,
    **options: Any,
) -> EmbeddingClassifier:
    """Figure 10, Tiny ImageNet: VGG16-BN features, global average pool, fc 512->k; 4096-4096 head."""
    body = [*vgg_body(in_chans, VGG16, width, batch_norm=True), nn.AdaptiveAvgPool2d(1)]
    return assemble(
        body,
        vgg_head(embed_dim, scaled(4096, width), num_classes),
        embed_dim=embed_dim,
        num_classes=num_classes,
        embed_from=flat_features(body, in_chans, input_size, scaled(512, width)),
        **options,
    )


def build_discriminator(embed_dim: int, width: float = 1.0) -> nn.Sequential:
    """Latent critic (Figure 10): Linear(k,512)-ReLU x4 -> Linear(512,1) -> LogSigmoid; ``[N,k] -> [N,1]``."""
    h = scaled(512, width)
    layers: list[nn.Module] = [nn.Linear(embed_dim, h), nn.ReLU(inplace=True)]
    for _ in range(3):
        layers += [nn.Linear(h, h), nn.ReLU(inplace=True)]
    layers += [nn.Linear(h, 1), nn.LogSigmoid()]
    return nn.Sequential(*layers)
