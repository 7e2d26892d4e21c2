"""Bytes -> model input, as the model card says. Shared by the FastAPI routes and TorchServe.

Preprocessing policy (reported back in every response as ``preprocessing``):

1. decode with Pillow; the first frame of animated images; EXIF orientation applied;
2. 16-bit and 32-bit greyscale scaled to 8 bits; palette, CMYK and other modes converted;
3. transparency composited over a black background (MNIST-style digits are light on dark);
4. converted to the model's channels: greyscale by ITU-R 601-2 luma, or RGB;
5. resized to the model's input size with Pillow's antialiased bilinear filter, stretching (the
   aspect ratio is not kept), when the size differs;
6. scaled to floats in [0, 1]: ``x = pixel / 255``.

Limits: an empty body, a non-image, a corrupt or truncated image give :class:`InvalidImage` (422);
an image whose header declares more than ``max_pixels`` pixels gives :class:`LimitExceeded` (413)
*before* any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.errors import InvalidImage, InvalidInput, LimitExceeded

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is an error, never half an image


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: ``[C, H, W]`` floats in [0, 1]."""

    channels: int
    height: int
    width: int

    @classmethod
    def from_shape(cls, shape: list[int] | tuple[int, ...]) -> InputSpec:
        c, h, w = (int(v) for v in shape)
        if c not in (1, 3):
            raise ValueError(f"models take 1 or 3 channels, the card says {c}")
        return cls(c, h, w)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @functools.cached_property
    def policy(self) -> dict[str, str]:
        """The preprocessing applied, in words (computed once per model; do not mutate)."""
        color = "greyscale (ITU-R 601-2 luma)" if self.channels == 1 else "RGB"
        return {
            "resize": f"antialiased bilinear stretch to {self.width}x{self.height} when the size differs; "
            "aspect ratio not kept",
            "color": f"converted to {color}; transparency composited over black; 16-bit scaled to 8-bit",
            "orientation": "EXIF orientation applied; first frame of animations",
            "scale": "pixel / 255 -> [0, 1]",
        }


@dataclass
class Decoded:
    tensor: torch.Tensor  # [C, H, W] float32 in [0, 1]
    original_size: tuple[int, int]  # (width, height) as sent, after EXIF rotation
    format: str
    mode: str
    resized: bool

    def info(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "mode": self.mode,
            "original_size": list(self.original_size),
            "resized": self.resized,
        }


_NOT_NUMBERS = {
    "U": "strings",
    "S": "strings",
    "b": "booleans",
    "O": "null, objects, or integers beyond 64 bits",
}

_HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit greyscale and float images -> 8-bit greyscale."""
    arr = np.asarray(img)
    if img.mode == "F":
        scaled = (
            np.clip(arr, 0.0, 1.0) * 255.0
            if arr.size and float(np.nanmax(arr)) <= 1.0
            else np.clip(arr, 0, 255)
        )
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8), "L")
    arr = arr.astype(np.int64)
    if arr.size and arr.max() > 255:
        arr = np.clip(arr, 0, 65535) // 257  # 16-bit range -> 8-bit
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img


# Formats Pillow may open. An allowlist: Pillow's other plugins include EPS, whose decoder runs
# Ghostscript on the file where it is installed, and rarely used parsers of old formats.
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


def decode_image(data: bytes, spec: InputSpec, *, max_pixels: int) -> Decoded:
    """One image file -> ``[C, H, W]`` float tensor in [0, 1] (see the module docstring)."""
    if not data:
        raise InvalidImage("empty image: zero bytes")
    try:
        # Our own pixel limit (below) is the one that counts; Pillow still refuses outright anything
        # over twice its default limit (DecompressionBombError). No warnings.catch_warnings() here:
        # it rewrites the process-wide filter list on every call, costly on the hot path.
        img: Image.Image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        head = data[:16]
        raise InvalidImage(
            f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)}; "
            f"{len(data)} bytes starting {head!r})"
        ) from None
    except Image.DecompressionBombError as exc:
        # Pillow's own hard limit (twice Image.MAX_IMAGE_PIXELS), hit before the size is known here.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{found.group(1)} pixels" if found else "more pixels than Pillow opens"
        raise LimitExceeded(
            f"image declares {declared}; the limit is {max_pixels} (decompression bomb)"
        ) from None
    except Exception as exc:  # malformed headers raise assorted errors inside Pillow's plugins
        raise InvalidImage(f"unreadable image header: {exc}") from None
    fmt = img.format or "unknown"
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"{fmt} image with empty size {width}x{height}")
    if width * height > max_pixels:
        raise LimitExceeded(
            f"{fmt} image declares {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        # Image.open leaves animations (GIF, APNG, WebP, multi-page TIFF) on their first frame: only
        # that frame is read. (Counting frames with n_frames would walk, and trip over, every later
        # frame of the file.) Pillow's plugins signal corrupt data with assorted exception types
        # (OSError, SyntaxError, TypeError, IndexError, KeyError, NotImplementedError, ...).
        img.load()
        img = ImageOps.exif_transpose(img) or img
    except Exception as exc:
        raise InvalidImage(f"corrupt or truncated {fmt} image: {type(exc).__name__}: {exc}") from None
    mode = img.mode
    original = img.size
    try:
        if img.mode in _HIGH_DEPTH:
            img = _to_8bit(img)
        img = _flatten_alpha(img)
        if img.mode != spec.mode:
            img = img.convert(spec.mode)
    except (ValueError, OSError) as exc:  # e.g. LAB TIFFs: Pillow converts LAB to nothing
        raise InvalidImage(
            f"{fmt} image in colour mode {mode} cannot be converted to {spec.mode}: {exc}"
        ) from None
    resized = img.size != (spec.width, spec.height)
    if resized:
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a writable copy for torch.from_numpy
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # -> [C, H, W]
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    return Decoded(tensor, original, fmt, mode, resized)


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
