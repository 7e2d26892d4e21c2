"""Image decoding policy: formats, modes, orientation, sizes, and the errors for bad files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from service.errors import InvalidImage, InvalidInput, LimitExceeded
from service.imaging import InputSpec, decode_image, tensor_from_values

GREY = InputSpec(1, 28, 28)
RGB = InputSpec(3, 32, 32)
LIMIT = 4096 * 4096


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _digit() -> np.ndarray:
    arr = np.zeros((28, 28), np.uint8)
    arr[4:24, 12:16] = 255  # a "1"
    return arr


def test_grey_png_round_trips_exactly() -> None:
    arr = _digit()
    d = decode_image(_png(Image.fromarray(arr)), GREY, max_pixels=LIMIT)
    assert d.tensor.shape == (1, 28, 28) and d.tensor.dtype == torch.float32
    assert torch.equal(d.tensor[0], torch.from_numpy(arr).float() / 255)
    assert (d.format, d.mode, d.original_size, d.resized) == ("PNG", "L", (28, 28), False)


def test_rgb_to_grey_and_resize() -> None:
    img = Image.new("RGB", (56, 40), (255, 0, 0))
    d = decode_image(_png(img), GREY, max_pixels=LIMIT)
    assert d.tensor.shape == (1, 28, 28) and d.resized and d.original_size == (56, 40)
    assert torch.allclose(d.tensor, torch.full_like(d.tensor, 76 / 255), atol=1 / 255)  # luma of pure red


def test_grey_to_rgb() -> None:
    d = decode_image(_png(Image.fromarray(np.full((32, 32), 200, np.uint8))), RGB, max_pixels=LIMIT)
    assert d.tensor.shape == (3, 32, 32) and torch.allclose(d.tensor, torch.full((3, 32, 32), 200 / 255))


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    arr = np.full((28, 28), 65535, np.uint16)
    arr[0, 0] = 0
    img = Image.fromarray(arr)
    d = decode_image(_png(img), GREY, max_pixels=LIMIT)
    assert d.tensor[0, 1, 1] == 1.0 and d.tensor[0, 0, 0] == 0.0
    arr[:] = 32896  # mid-grey in 16 bits -> 128 in 8 bits
    d = decode_image(_png(Image.fromarray(arr)), GREY, max_pixels=LIMIT)
    assert abs(float(d.tensor[0, 5, 5]) - 128 / 255) < 1e-6


def test_alpha_is_composited_over_black() -> None:
    img = Image.new("RGBA", (28, 28), (255, 255, 255, 0))  # fully transparent white
    img.putpixel((3, 3), (255, 255, 255, 255))
    d = decode_image(_png(img), GREY, max_pixels=LIMIT)
    assert d.tensor.sum() == pytest.approx(1.0) and d.tensor[0, 3, 3] == 1.0


def test_palette_cmyk_and_bilevel_modes() -> None:
    pal = Image.fromarray(_digit()).convert("P")
    assert torch.equal(
        decode_image(_png(pal), GREY, max_pixels=LIMIT).tensor[0], torch.from_numpy(_digit()).float() / 255
    )
    buf = io.BytesIO()
    Image.new("CMYK", (28, 28), (0, 0, 0, 0)).save(buf, format="JPEG")  # CMYK white
    assert decode_image(buf.getvalue(), GREY, max_pixels=LIMIT).tensor.min() > 0.95
    bilevel = Image.fromarray(_digit()).convert("1")
    assert decode_image(_png(bilevel), GREY, max_pixels=LIMIT).tensor.max() == 1.0


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((20, 40), np.uint8)  # wide: 40 wide, 20 high
    arr[:, :5] = 255  # bright left edge
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=100)
    d = decode_image(buf.getvalue(), InputSpec(1, 40, 20), max_pixels=LIMIT)
    assert d.original_size == (20, 40), "displayed image is tall after the rotation"
    top = d.tensor[0, :5].mean()
    bottom = d.tensor[0, -5:].mean()
    assert top > 0.8 and bottom < 0.2, "the bright left edge is now at the top"


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (10, 250)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    d = decode_image(buf.getvalue(), GREY, max_pixels=LIMIT)
    assert d.tensor.max() < 0.1


@pytest.mark.parametrize("size", [(1, 1), (10000, 1)])
def test_extreme_shapes(size: tuple[int, int]) -> None:
    d = decode_image(_png(Image.new("L", size, 255)), GREY, max_pixels=LIMIT)
    assert d.tensor.shape == (1, 28, 28) and d.resized


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims ``width x height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding() -> None:
    # Pillow refuses this one itself (over twice its own limit) before our check; both are 413s.
    with pytest.raises(LimitExceeded, match="10000000000 pixels"):
        decode_image(_png_header(100_000, 100_000), GREY, max_pixels=LIMIT)
    with pytest.raises(LimitExceeded, match="5000x5000 = 25000000 pixels; the limit is 16777216"):
        decode_image(_png_header(5000, 5000), GREY, max_pixels=LIMIT)
    with pytest.raises(LimitExceeded, match="limit is 100"):
        decode_image(_png(Image.new("L", (11, 11))), GREY, max_pixels=100)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "zero bytes"),
        (b"<html><body>hi</body></html>", "not an image"),
        (b"just some text posing as an image", "not an image"),
    ],
)
def test_non_images(data: bytes, match: str) -> None:
    with pytest.raises(InvalidImage, match=match):
        decode_image(data, GREY, max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["EPS", "TGA", "ICO", "PCX", "SGI"])
def test_formats_outside_the_allowlist_are_refused(fmt: str) -> None:
    """Pillow reads these, but the service opens only its allowlist (EPS would run Ghostscript)."""
    buf = io.BytesIO()
    Image.fromarray(_digit()).convert("RGB" if fmt == "EPS" else "L").save(buf, format=fmt)
    Image.open(io.BytesIO(buf.getvalue())).verify()  # a real file Pillow itself would open
    with pytest.raises(InvalidImage, match="accepted format"):
        decode_image(buf.getvalue(), GREY, max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"])
def test_allowlisted_formats_decode(fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(_digit()).save(buf, format=fmt)
    assert decode_image(buf.getvalue(), GREY, max_pixels=LIMIT).format == fmt


def test_truncated_png_and_jpeg() -> None:
    png = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)))
    with pytest.raises(InvalidImage, match="corrupt or truncated PNG"):
        decode_image(png[: len(png) // 2], GREY, max_pixels=LIMIT)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        buf, format="JPEG"
    )
    jpg = buf.getvalue()
    with pytest.raises(InvalidImage, match="JPEG"):
        decode_image(jpg[: len(jpg) // 2], GREY, max_pixels=LIMIT)


def test_tensor_values_validation() -> None:
    ok = tensor_from_values([0.5] * 784, [1, 1, 28, 28], GREY, max_rows=4)
    assert ok.shape == (1, 1, 28, 28)
    nested = tensor_from_values(np.zeros((2, 1, 28, 28)).tolist(), [2, 1, 28, 28], GREY, max_rows=4)
    assert nested.shape == (2, 1, 28, 28)
    assert tensor_from_values([0.0] * 784, [1, 28, 28], GREY, max_rows=4).shape == (1, 1, 28, 28)
    cases = [
        ([0.5] * 784, [1, 3, 28, 28], "does not match"),
        ([0.5] * 783, [1, 1, 28, 28], "783 values"),
        ([float("nan")] + [0.0] * 783, [1, 1, 28, 28], "NaN"),
        ([float("inf")] + [0.0] * 783, [1, 1, 28, 28], "NaN or infinite"),
        ([2.0] * 784, [1, 1, 28, 28], r"\[0, 1\]"),
        ([-0.1] * 784, [1, 1, 28, 28], r"\[0, 1\]"),
        ([0.5] * 784, [-1, 1, 28, 28], "negative"),
        ([0.5] * 784, [1, 1, 28, "28"], "list of integers"),
        ([[0.5, 0.5], [0.5]], [1, 1, 28, 28], "regular"),
        ([], [0, 1, 28, 28], "no images"),
        (["a"] * 784, [1, 1, 28, 28], "numbers"),
    ]
    for data, shape, match in cases:
        with pytest.raises(InvalidInput, match=match):
            tensor_from_values(data, shape, GREY, max_rows=4)
    with pytest.raises(LimitExceeded):
        tensor_from_values([0.0] * 784 * 5, [5, 1, 28, 28], GREY, max_rows=4)
