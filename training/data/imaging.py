"""Image file bytes -> model input, as the model card says: the one decoder of the project.

The service (FastAPI routes, TorchServe handler, admin uploads) and the image-folder datasets
(:mod:`training.data.folder`) both decode through :func:`decode_pixels`, so a model is trained on
exactly the pixels it is later served. The service maps this module's errors to its HTTP error
tree (:mod:`service.imaging`); the library never imports the service.

Preprocessing policy (reported back in every response as ``preprocessing`` and stored in model
cards):

1. decode with Pillow; the first frame of animated images; EXIF orientation applied;
2. 16-bit and 32-bit greyscale scaled to 8 bits; palette, CMYK and other modes converted;
3. transparency composited over a black background (MNIST-style digits are light on dark);
4. converted to the model's channels: greyscale by ITU-R 601-2 luma, or RGB;
5. resized to the model's input size with Pillow's antialiased bilinear filter, stretching (the
   aspect ratio is not kept), when the size differs;
6. scaled to floats in [0, 1]: ``x = pixel / 255``.

Limits: an empty buffer, a non-image, a corrupt or truncated image raise :class:`ImageDecodeError`;
an image whose header declares more than ``max_pixels`` pixels raises :class:`ImageTooLarge`
*before* any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from training.data.core import unit_float
from training.errors import ErcError

__all__ = [
    "ACCEPTED_FORMATS",
    "GREY_MODES",
    "Decoded",
    "ImageDecodeError",
    "ImageTooLarge",
    "InputSpec",
    "Pixels",
    "Probe",
    "decode_image",
    "decode_pixels",
    "probe_image",
]

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is an error, never half an image


class ImageDecodeError(ErcError):
    """Bytes that are not a usable image: empty, not an accepted format, corrupt or truncated."""


class ImageTooLarge(ImageDecodeError):
    """An image whose header declares more pixels than allowed (checked before decoding)."""


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
class Pixels:
    """One decoded image as the model's uint8 pixels (what dataset caches hold)."""

    array: npt.NDArray[np.uint8]  # [C, H, W], values 0..255, C-contiguous
    original_size: tuple[int, int]  # (width, height) as stored, after EXIF rotation
    format: str
    mode: str  # Pillow's mode of the file before conversion ("L", "RGB", "P", "I;16", ...)
    resized: bool


@dataclass
class Decoded(Pixels):
    """One decoded image of a request: its :class:`Pixels`, and what the service reports of the file.

    The service batches the pixels as uint8 and scales them to [0, 1] in the inference thread
    (:func:`service.imaging.unit_range`): the event loop that decodes them runs no torch op.
    """

    @property
    def tensor(self) -> torch.Tensor:
        """``[C, H, W]`` float32 in [0, 1]: ``pixel / 255``, the network's input."""
        return unit_float(torch.from_numpy(self.array))

    def info(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "mode": self.mode,
            "original_size": list(self.original_size),
            "resized": self.resized,
        }


@dataclass(frozen=True)
class Probe:
    """What an image's header says, without decoding its pixels."""

    format: str
    width: int  # after EXIF rotation
    height: int
    mode: str

    @property
    def grey(self) -> bool:
        """Whether the image holds no colour (its conversion to RGB would give three equal planes)."""
        return self.mode in GREY_MODES


# Pillow modes without colour: decoded to one channel they lose nothing.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# EXIF orientations 5-8 rotate by 90 degrees: the stored width and height swap on display.
_TRANSPOSED = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112

# Formats Pillow may open. An allowlist: Pillow's other plugins include EPS, whose decoder runs
# Ghostscript on the file where it is installed, and rarely used parsers of old formats.
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


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


def _open(source: bytes | IO[bytes], size_hint: int, max_pixels: int) -> Image.Image:
    """Open (header only) with the format allowlist; the error messages the service reports."""
    fh = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        # Our own pixel limit (below) is the one that counts; Pillow still refuses outright anything
        # over twice its default limit (DecompressionBombError). No warnings.catch_warnings() here:
        # it rewrites the process-wide filter list on every call, costly on the hot path.
        return Image.open(fh, formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        fh.seek(0)
        head = fh.read(16)
        raise ImageDecodeError(
            f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)}; "
            f"{size_hint} bytes starting {head!r})"
        ) from None
    except Image.DecompressionBombError as exc:
        # Pillow's own hard limit (twice Image.MAX_IMAGE_PIXELS), hit before the size is known here.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{found.group(1)} pixels" if found else "more pixels than Pillow opens"
        raise ImageTooLarge(
            f"image declares {declared}; the limit is {max_pixels} (decompression bomb)"
        ) from None
    except Exception as exc:  # malformed headers raise assorted errors inside Pillow's plugins
        raise ImageDecodeError(f"unreadable image header: {exc}") from None


def _check_size(img: Image.Image, max_pixels: int) -> tuple[str, int, int]:
    fmt = img.format or "unknown"
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{fmt} image with empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{fmt} image declares {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    return fmt, width, height


def probe_image(source: bytes | IO[bytes], *, max_pixels: int, size_hint: int = 0) -> Probe:
    """Format, displayed size and mode from an image's header, without decoding its pixels.

    ``source`` is the file's bytes or an open binary file; the same errors as :func:`decode_pixels`
    for anything the header already shows (empty, not an image, too many pixels).
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError("empty image: zero bytes")
        size_hint = len(source)
    with _open(source, size_hint, max_pixels) as img:
        fmt, width, height = _check_size(img, max_pixels)
        try:
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:  # a broken EXIF block is found (and reported) when the pixels are decoded
            orientation = 1
        if orientation in _TRANSPOSED:
            width, height = height, width
        return Probe(fmt, width, height, img.mode)


def decode_pixels(data: bytes, spec: InputSpec, *, max_pixels: int) -> Pixels:
    """One image file -> the model's uint8 pixels ``[C, H, W]`` (see the module docstring)."""
    if not data:
        raise ImageDecodeError("empty image: zero bytes")
    img = _open(data, len(data), max_pixels)
    fmt, _, _ = _check_size(img, max_pixels)
    try:
        # Image.open leaves animations (GIF, APNG, WebP, multi-page TIFF) on their first frame: only
        # that frame is read. (Counting frames with n_frames would walk, and trip over, every later
        # frame of the file.) Pillow's plugins signal corrupt data with assorted exception types
        # (OSError, SyntaxError, TypeError, IndexError, KeyError, NotImplementedError, ...).
        img.load()
        img = ImageOps.exif_transpose(img) or img
    except Exception as exc:
        raise ImageDecodeError(f"corrupt or truncated {fmt} image: {type(exc).__name__}: {exc}") from None
    mode = img.mode
    original = img.size
    try:
        if img.mode in _HIGH_DEPTH:
            img = _to_8bit(img)
        img = _flatten_alpha(img)
        if img.mode != spec.mode:
            img = img.convert(spec.mode)
    except (ValueError, OSError) as exc:  # e.g. LAB TIFFs: Pillow converts LAB to nothing
        raise ImageDecodeError(
            f"{fmt} image in colour mode {mode} cannot be converted to {spec.mode}: {exc}"
        ) from None
    resized = img.size != (spec.width, spec.height)
    if resized:
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy, dataset arrays)
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # -> [C, H, W]
    return Pixels(np.ascontiguousarray(arr), original, fmt, mode, resized)


def decode_image(data: bytes, spec: InputSpec, *, max_pixels: int) -> Decoded:
    """One image file -> :class:`Decoded` (its pixels, and ``.tensor`` in [0, 1]): :func:`decode_pixels`
    with what the service reports about the file."""
    px = decode_pixels(data, spec, max_pixels=max_pixels)
    return Decoded(px.array, px.original_size, px.format, px.mode, px.resized)
