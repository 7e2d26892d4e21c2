"""Bytes -> model input for the service: :mod:`training.data.imaging` (the one decoder, shared with
the image-folder datasets so that training and serving see the same pixels) with its errors mapped
to the service's error tree, and v2 tensor validation.

Errors: an empty body, a non-image, a corrupt or truncated image give :class:`InvalidImage` (422);
an image whose header declares more than ``max_pixels`` pixels gives :class:`LimitExceeded` (413)
*before* any pixel is decoded (decompression bombs). The preprocessing policy is documented in
:mod:`training.data.imaging`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.errors import InvalidImage, InvalidInput, LimitExceeded
from training.data import imaging
from training.data.core import unit_float
from training.data.imaging import ACCEPTED_FORMATS, Decoded, InputSpec

__all__ = ["ACCEPTED_FORMATS", "Decoded", "InputSpec", "decode_image", "tensor_from_values", "unit_range"]

_NOT_NUMBERS = {
    "U": "strings",
    "S": "strings",
    "b": "booleans",
    "O": "null, objects, or integers beyond 64 bits",
}


def unit_range(x: torch.Tensor) -> torch.Tensor:
    """The network's input from either form a request's rows travel in: uint8 pixels (decoded image
    files; scaled by 1/255 here) or float32 already in [0, 1] (KServe v2 ``FP32`` tensors)."""
    return unit_float(x) if x.dtype == torch.uint8 else x


def decode_image(data: bytes, spec: InputSpec, *, max_pixels: int) -> Decoded:
    """One image file -> :class:`Decoded` (uint8 pixels); bad images raise the service's errors."""
    try:
        return imaging.decode_image(data, spec, max_pixels=max_pixels)
    except imaging.ImageTooLarge as exc:
        raise LimitExceeded(str(exc)) from None
    except imaging.ImageDecodeError as exc:
        raise InvalidImage(str(exc)) from None


def tensor_from_values(data: Any, shape: list[int], spec: InputSpec, *, max_rows: int) -> torch.Tensor:
    """A KServe v2 FP32 input -> ``[N, C, H, W]`` float tensor, validated.

    ``data`` may be flat (row-major) or nested; ``shape`` must be ``[N, C, H, W]`` with the model's
    ``C, H, W`` (or ``[C, H, W]`` for one image). Values must be finite and in [0, 1].
    """
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise InvalidInput(f"shape must be a list of integers, got {shape!r}")
    if any(s < 0 for s in shape):
        raise InvalidInput(f"shape {shape} has a negative dimension")
    expected = [spec.channels, spec.height, spec.width]
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or shape[1:] != expected:
        raise InvalidInput(
            f"input shape {shape} does not match the model's [N, {', '.join(map(str, expected))}]"
        )
    if shape[0] == 0:
        raise InvalidInput("input holds no images (N = 0)")
    if shape[0] > max_rows:
        raise LimitExceeded(f"{shape[0]} images in one request; the limit is {max_rows}")
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"input data is not a (regular) array of numbers: {exc}") from None
    if raw.dtype.kind not in "iuf":  # numpy would parse "0.5" strings and take true as 1.0
        what = _NOT_NUMBERS.get(raw.dtype.kind, f"values of type {raw.dtype}")
        raise InvalidInput(f"FP32 input data must hold JSON numbers only; it holds {what}")
    arr = raw.astype(np.float32, copy=False)
    count = int(np.prod(shape))
    if arr.size != count:
        raise InvalidInput(f"input data has {arr.size} values; shape {shape} needs {count}")
    if not np.isfinite(arr).all():
        raise InvalidInput("input data holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInput(f"input values must lie in [0, 1] (images scaled by 1/255); got [{lo:g}, {hi:g}]")
    return torch.from_numpy(arr.reshape(shape).copy())
