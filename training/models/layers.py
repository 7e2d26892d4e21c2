"""Small building blocks shared by the architectures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model, so every caller speaks [0, 1] images.

    Mean and std are buffers (not parameters): attacks see them as constants, and they travel
    with the state dict.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class GaussianNoise(nn.Module):
    """Random Self-Ensemble noise layer (Liu et al. 2017): ``x + N(0, std^2)``.

    Active in training *and* inference, as in the RSE paper; ``std == 0`` makes it an identity.
    """

    def __init__(self, std: float) -> None:
        super().__init__()
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.std == 0.0:
            return x
        return x + torch.randn_like(x) * self.std

    def extra_repr(self) -> str:
        return f"std={self.std}"


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier (slim variants for CPU training); never below 1."""
    if width <= 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    return max(1, round(channels * width))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes a single-position output as one matrix product.

    When the kernel covers the whole zero-padded input, so that the output is 1x1 (the last
    convolution of the paper's Figure 9 encoder: 512 channels of 3x3 -> 1024 channels of 1x1,
    4x4 kernel, padding 1), the convolution *is* a linear map of the padded input window:
    ``linear(pad(x)[..., :k, :k].flatten(1), weight.flatten(1))``, the same products and the same
    parameters (gradients included), only summed in another order. On the CPU that is several
    times faster: oneDNN re-lays-out the whole 8.4 M-weight kernel on every call (about 11 ms per
    forward at any batch size on a 2-core VM; docs/benchmarks.md), a matrix product reads it as
    it is. Any other shape runs the ordinary convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._single_position(x):
            (kh, kw), (ph, pw) = self.kernel_size, cast(tuple[int, int], self.padding)
            window = nn.functional.pad(x, (pw, pw, ph, ph))[..., :kh, :kw]
            if self.weight.is_contiguous():  # flatten both in (C, H, W) order: views, no copy
                cols, weight = window.flatten(1), self.weight.flatten(1)
            else:  # channels_last weights: flatten both in (H, W, C) order instead
                nhwc = (0, 2, 3, 1)
                cols, weight = window.permute(nhwc).flatten(1), self.weight.permute(nhwc).flatten(1)
            return nn.functional.linear(cols, weight, self.bias)[..., None, None]
        return super().forward(x)

    def _single_position(self, x: torch.Tensor) -> bool:
        if x.dim() != 4 or self.groups != 1 or self.padding_mode != "zeros" or self.dilation != (1, 1):
            return False
        if not isinstance(self.padding, tuple):  # "same" / "valid" strings
            return False
        spans = zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, strict=True)
        return all(0 <= size + 2 * pad - k < stride for size, k, stride, pad in spans)
