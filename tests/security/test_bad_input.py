"""Bad input, systematically: a corpus of malformed, hostile and unusual requests sent to a real
``erc serve`` process (the ``server`` fixture: model ``tiny``, 1x28x28 greyscale; body limit 1 MiB;
8 images per request; 2000 x 2000 = 4M pixels per image).

The corpus is generated here, nothing is downloaded:

* **image files**, each sent through every route that takes images: ``:predict`` and ``:embed`` as
  a raw ``image/png`` body, as JSON ``{"instances": [{"b64": ...}]}`` and as a multipart upload, and
  ``/v2/models/tiny/infer`` as a ``BYTES`` tensor:

  - refused: a zero-byte body; text, HTML, SVG and magic-number-then-text files posing as images;
    PNG and JPEG truncated at several points; decompression bombs (headers declaring 100k x 100k
    PNG, 65500 x 65500 JPEG, 65535 x 65535 GIF pixels with a few bytes of data, and a PNG just over
    the server's pixel limit); a LAB TIFF (a colour mode Pillow cannot convert); a 50 MB body;
  - accepted, as docs/api.md "Image preprocessing" documents: an animated GIF (first frame, also
    when a later frame is truncated), a two-page TIFF whose second page is truncated, 16-bit PNG,
    32-bit float TIFF, CMYK TIFF and JPEG, palette PNG (with and without transparency), images with
    alpha, 1-bit, 1x1, 10000x1 and 1x10000 images. Lossless variants of a digit must give exactly
    the digit's probabilities; lossy ones its label;

* **JSON documents**: base64 that is not base64, JSON nested 10,000 levels deep, arrays of 100,000
  instances, invalid UTF-8; KServe v2 tensors with NaN, infinities, null, strings and booleans as
  FP32 values, negative / zero / huge / non-integer shapes, wrong datatypes, data lengths not
  matching the shape, ragged and 1000-deep data;

* **model names with path traversal** (``../``, URL-encoded and double-encoded, backslashes, NUL,
  absolute paths) on every route that takes a model name, sent verbatim (``http.client`` does not
  normalize ``..`` segments the way httpx does).

Every bad input gets the documented 4xx JSON error (docs/api.md "Errors") whose code and message
name the problem; after each one the server still answers a valid request with the same
probabilities as before. ``test_memory_stays_bounded_over_the_corpus`` sends the whole corpus three
times and compares the server's resident memory (RSS) before and after.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

LIMIT = 1024 * 1024  # ERC_MAX_BODY_BYTES of the ``server`` fixture
MAX_PIXELS = 2000 * 2000  # ERC_MAX_IMAGE_PIXELS of the ``server`` fixture
RSS_GROWTH_LIMIT = 100 * 1024 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width`` x ``height`` 8-bit grey pixels, with an IDAT
    of a few bytes: what a decompression bomb looks like before its pixels are inflated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + png_chunk(b"IEND", b"")
    )


def jpeg_bomb() -> bytes:
    """An 8x8 JPEG whose SOF0 segment is patched to declare 65500 x 65500 pixels."""
    data = bytearray(save(Image.new("L", (8, 8)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def gif_bomb() -> bytes:
    """A 1x1 GIF whose logical screen is patched to 65535 x 65535."""
    data = bytearray(save(Image.new("L", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


# -- the image corpus ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refused:
    build: Callable[[], bytes]
    status: int
    code: str
    fragment: str  # a part of the message that names the problem


FIFTY_MB = 50 * 1024 * 1024


@functools.cache
def _digit_png() -> bytes:
    """A synthetic 28x28 PNG for building truncated files (no dataset needed at import)."""
    rng = np.random.default_rng(0)
    return save(Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)), "PNG")


@functools.cache
def _digit_jpeg() -> bytes:
    return save(Image.open(io.BytesIO(_digit_png())), "JPEG", quality=90)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


REFUSED_IMAGES: dict[str, Refused] = {
    "zero-bytes": Refused(lambda: b"", 422, "invalid_image", "zero bytes"),
    "text-as-png": Refused(
        lambda: b"hello, I am plain text, not a PNG\n", 422, "invalid_image", "not an image"
    ),
    "html-as-png": Refused(
        lambda: b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        422,
        "invalid_image",
        "not an image",
    ),
    "svg-as-png": Refused(
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><circle r="9"/></svg>',
        422,
        "invalid_image",
        "not an image",
    ),
    "png-magic-then-text": Refused(
        lambda: b"\x89PNG\r\n\x1a\nthis is no chunk", 422, "invalid_image", "not an image"
    ),
    "png-signature-only": Refused(lambda: _digit_png()[:8], 422, "invalid_image", "not an image"),
    "png-cut-in-ihdr": Refused(lambda: _digit_png()[:20], 422, "invalid_image", "unreadable image header"),
    "png-truncated-half": Refused(
        lambda: _half(_digit_png()), 422, "invalid_image", "corrupt or truncated PNG image"
    ),
    "jpeg-soi-only": Refused(lambda: b"\xff\xd8", 422, "invalid_image", "not an image"),
    "jpeg-truncated-half": Refused(
        lambda: _half(_digit_jpeg()), 422, "invalid_image", "corrupt or truncated JPEG image"
    ),
    "jpeg-without-eoi": Refused(
        lambda: _digit_jpeg()[:-2], 422, "invalid_image", "corrupt or truncated JPEG image"
    ),
    "gif-header-only": Refused(lambda: b"GIF89a", 422, "invalid_image", "not an image"),
    "png-bomb-100000x100000": Refused(
        lambda: png_bomb(100_000, 100_000), 413, "limit_exceeded", "10000000000 pixels"
    ),
    "png-just-over-pixel-limit": Refused(
        lambda: png_bomb(2001, 2000),
        413,
        "limit_exceeded",
        f"2001x2000 = 4002000 pixels; the limit is {MAX_PIXELS}",
    ),
    "jpeg-bomb-65500x65500": Refused(jpeg_bomb, 413, "limit_exceeded", "4290250000 pixels"),
    "gif-bomb-65535x65535": Refused(gif_bomb, 413, "limit_exceeded", "4294836225 pixels"),
    "tiff-lab-colour-mode": Refused(
        lambda: save(Image.new("LAB", (28, 28), (50, 0, 0)), "TIFF"), 422, "invalid_image", "colour mode LAB"
    ),
    "body-50MB": Refused(lambda: b"\0" * FIFTY_MB, 413, "payload_too_large", f"limit of {LIMIT} bytes"),
}


@dataclass(frozen=True)
class Accepted:
    build: Callable[[np.ndarray, np.ndarray], bytes]  # (digit, another digit) -> file
    match: str  # "same": the plain digit's probabilities; "label": its label; "any": a valid answer
    size: tuple[int, int] | None = None  # original_size reported back


def _animated_gif(d: np.ndarray, other: np.ndarray) -> bytes:
    frames = [Image.fromarray(a) for a in (d, other, 255 - d)]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _gif_cut_in_second_frame(d: np.ndarray, other: np.ndarray) -> bytes:
    """The three-frame GIF cut in the middle of its second frame's data (the one- and two-frame
    files share its first bytes: the second frame lies between their ends)."""
    one = save(Image.fromarray(d), "GIF", save_all=True, duration=50, loop=0)
    two = save(
        Image.fromarray(d), "GIF", save_all=True, append_images=[Image.fromarray(other)], duration=50, loop=0
    )
    return _animated_gif(d, other)[: (len(one) + len(two)) // 2]


def _tiff_second_page_without_width(d: np.ndarray, other: np.ndarray) -> bytes:
    """A two-page TIFF whose second page's IFD lacks the ImageWidth tag (256 renamed 255)."""
    data = bytearray(save(Image.fromarray(d), "TIFF", save_all=True, append_images=[Image.fromarray(other)]))
    assert data[:4] == b"II*\0"
    first = struct.unpack_from("<I", data, 4)[0]
    n_tags = struct.unpack_from("<H", data, first)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * n_tags)[0]
    for i in range(struct.unpack_from("<H", data, second)[0]):
        entry = second + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 256:
            struct.pack_into("<H", data, entry, 255)
            return bytes(data)
    raise AssertionError("no ImageWidth tag on page 2")


def _rgba_white_with_digit_alpha(d: np.ndarray, _: np.ndarray) -> bytes:
    rgba = np.zeros((*d.shape, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = d  # composited over black: the digit again
    return save(Image.fromarray(rgba, "RGBA"), "PNG")


def _palette_with_transparency(d: np.ndarray, _: np.ndarray) -> bytes:
    img = Image.fromarray(d).convert("P")
    black = int(np.asarray(img)[d == 0][0])  # the palette index of black pixels
    return save(img, "PNG", transparency=black)  # transparent black, composited over black: unchanged


ACCEPTED_IMAGES: dict[str, Accepted] = {
    "gif-animated-3-frames": Accepted(_animated_gif, "same"),
    # A file whose later frames are broken is classified by its first frame: the frames after it
    # are never read (counting them crashed the server with IndexError / TypeError, a 500).
    "gif-animated-later-frame-truncated": Accepted(_gif_cut_in_second_frame, "same"),
    "tiff-2-pages-second-without-width": Accepted(_tiff_second_page_without_width, "same"),
    "png-16-bit": Accepted(
        lambda d, _: save(Image.fromarray(d.astype(np.uint16) * 257).convert("I;16"), "PNG"), "same"
    ),
    "tiff-32-bit-float": Accepted(
        lambda d, _: save(Image.fromarray(d.astype(np.float32) / 255.0, "F"), "TIFF"), "label"
    ),
    "tiff-cmyk": Accepted(lambda d, _: save(Image.fromarray(d).convert("CMYK"), "TIFF"), "same"),
    "jpeg-cmyk": Accepted(lambda d, _: save(Image.fromarray(d).convert("CMYK"), "JPEG", quality=95), "label"),
    "png-palette": Accepted(lambda d, _: save(Image.fromarray(d).convert("P"), "PNG"), "same"),
    "png-palette-transparency": Accepted(_palette_with_transparency, "same"),
    "png-grey-alpha-opaque": Accepted(
        lambda d, _: save(Image.fromarray(np.stack([d, np.full_like(d, 255)], -1), "LA"), "PNG"), "same"
    ),
    "png-rgba-digit-in-alpha": Accepted(_rgba_white_with_digit_alpha, "label"),
    "png-1-bit": Accepted(lambda d, _: save(Image.fromarray(d).convert("1"), "PNG"), "any"),
    "png-1x1": Accepted(lambda d, _: save(Image.new("L", (1, 1), 255), "PNG"), "any", (1, 1)),
    "png-10000x1": Accepted(lambda d, _: save(Image.new("L", (10000, 1), 128), "PNG"), "any", (10000, 1)),
    "png-1x10000": Accepted(lambda d, _: save(Image.new("L", (1, 10000), 128), "PNG"), "any", (1, 10000)),
}


# -- the routes that take images --------------------------------------------------------------------
CARRIERS = {
    "v1-predict-raw": ("/v1/models/tiny:predict", "raw"),
    "v1-predict-json": ("/v1/models/tiny:predict", "json"),
    "v1-predict-multipart": ("/v1/models/tiny:predict", "multipart"),
    "v1-embed-raw": ("/v1/models/tiny:embed", "raw"),
    "v1-embed-json": ("/v1/models/tiny:embed", "json"),
    "v1-embed-multipart": ("/v1/models/tiny:embed", "multipart"),
    "v2-infer-bytes": ("/v2/models/tiny/infer", "bytes"),
}
JSON_HEADERS = {"content-type": "application/json"}


def send_image(c: httpx.Client, carrier: str, data: bytes) -> httpx.Response:
    route, shape = CARRIERS[carrier]
    if shape == "raw":
        return c.post(route, content=data, headers={"content-type": "image/png"})
    if shape == "multipart":
        return c.post(route, files=[("file", ("upload.png", data, "image/png"))])
    if shape == "json":
        doc: dict[str, Any] = {"instances": [{"b64": b64(data)}], "parameters": {"return_embedding": True}}
    else:
        doc = {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [b64(data)]}]}
    return c.post(route, content=json.dumps(doc).encode(), headers=JSON_HEADERS)


@dataclass
class Answer:
    label: int | None
    probabilities: np.ndarray | None
    embedding: np.ndarray | None


def answer(carrier: str, r: httpx.Response) -> Answer:
    """The one image's label, probabilities and embedding, from any route's response."""
    assert r.status_code == 200, r.text
    doc = r.json()
    if carrier.startswith("v1-predict"):
        (p,) = doc["predictions"]
        emb = np.array(p["embedding"]) if "embedding" in p else None
        return Answer(p["label"], np.array(p["probabilities"]), emb)
    if carrier.startswith("v1-embed"):
        (emb,) = doc["embeddings"]
        assert len(emb) == doc["embed_dim"]
        return Answer(None, None, np.array(emb))
    out = {o["name"]: o for o in doc["outputs"]}
    return Answer(
        out["label"]["data"][0], np.array(out["probabilities"]["data"]), np.array(out["embedding"]["data"])
    )


@dataclass
class Baseline:
    digit: np.ndarray
    other: np.ndarray
    png: bytes
    label: int
    probabilities: np.ndarray
    embedding: np.ndarray


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30.0)) as c:
        yield c


@pytest.fixture(scope="module")
def baseline(client, mnist_sample) -> Baseline:
    """The server's answer for the sample digit it classifies right most confidently (the reference
    for everything below: lossless variants of it must get exactly these probabilities)."""
    best: tuple[float, int, Answer] | None = None
    for i, png in enumerate(mnist_sample.pngs[:32]):
        a = answer("v1-predict-json", send_image(client, "v1-predict-json", png))
        assert a.probabilities is not None
        if a.label == mnist_sample.labels[i] and (best is None or a.probabilities.max() > best[0]):
            best = (float(a.probabilities.max()), i, a)
    assert best is not None and best[0] > 0.5, "the tiny model reads none of the sample digits"
    _, i, a = best
    assert a.label is not None and a.probabilities is not None and a.embedding is not None
    other = next(j for j, lab in enumerate(mnist_sample.labels) if lab != a.label)
    return Baseline(
        mnist_sample.images[i],
        mnist_sample.images[other],
        mnist_sample.pngs[i],
        a.label,
        a.probabilities,
        a.embedding,
    )


def assert_error(r: httpx.Response, status: int, code: str | tuple[str, ...], fragment: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    codes = (code,) if isinstance(code, str) else code
    assert set(err) == {"code", "message"} and err["code"] in codes, err
    assert fragment in err["message"], err
    assert "Traceback" not in err["message"]


def assert_still_serving(server, client: httpx.Client, baseline: Baseline) -> None:
    """The process is alive and a valid request gets exactly the answer it got before."""
    assert server.proc.poll() is None, server.log.read_text()[-3000:]
    a = answer("v1-predict-raw", send_image(client, "v1-predict-raw", baseline.png))
    assert a.label == baseline.label
    assert a.probabilities is not None and np.allclose(a.probabilities, baseline.probabilities, atol=1e-6)


# -- image files through every route ------------------------------------------------------------------
@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("case", REFUSED_IMAGES)
def test_bad_image_is_refused_with_a_4xx_naming_it(server, client, baseline, case, carrier) -> None:
    bad = REFUSED_IMAGES[case]
    r = send_image(client, carrier, bad.build())
    assert_error(r, bad.status, bad.code, bad.fragment)
    if bad.code != "payload_too_large":  # the message says which image of the request it was
        where = {
            "raw": "body: ",
            "json": "instances[0]: ",
            "bytes": "inputs[0].data[0]: ",
            "multipart": "file 'file': ",
        }
        assert r.json()["error"]["message"].startswith(where[CARRIERS[carrier][1]]), r.text
    assert_still_serving(server, client, baseline)


@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("case", ACCEPTED_IMAGES)
def test_unusual_but_valid_image_is_classified(server, client, baseline, case, carrier) -> None:
    good = ACCEPTED_IMAGES[case]
    data = good.build(baseline.digit, baseline.other)
    r = send_image(client, carrier, data)
    a = answer(carrier, r)
    if a.label is not None:
        assert 0 <= a.label <= 9
    if a.probabilities is not None:
        assert a.probabilities.sum() == pytest.approx(1.0, abs=1e-4)
    if good.match == "same":
        for mine, ref in ((a.probabilities, baseline.probabilities), (a.embedding, baseline.embedding)):
            assert mine is None or np.allclose(mine, ref, atol=1e-5), (mine, ref)
    if good.match in ("same", "label") and a.label is not None:
        assert a.label == baseline.label
    info = r.json()["predictions"][0]["input"] if carrier.startswith("v1-predict") else None
    if info is not None and good.size is not None:
        assert info["original_size"] == list(good.size) and info["resized"] is True, info
    if info is not None and case.startswith("gif"):
        assert info["format"] == "GIF" and info["original_size"] == [28, 28], info


# -- JSON documents ----------------------------------------------------------------------------------------
def _v2(
    data: Any = None, shape: Any = (1, 1, 28, 28), datatype: Any = "FP32", **extra: Any
) -> dict[str, Any]:
    if data is None:
        data = [0.5] * 784
    tensor = {
        "name": "input",
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "datatype": datatype,
    }
    return {"inputs": [{**tensor, "data": data, **extra}]}


def _raw_v2(data_token: bytes, n: int = 784) -> bytes:
    """An FP32 request whose first value is ``data_token`` verbatim (NaN, Infinity: not JSON)."""
    head = b'{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ['
    return head + data_token + b", 0.5" * (n - 1) + b"]}]}"


def _deep(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"a": ' * depth + inner + b"}" * depth


@dataclass(frozen=True)
class BadJson:
    body: Callable[[], bytes]
    status: int
    code: str
    fragment: str


def J(doc: Any) -> Callable[[], bytes]:
    return lambda: json.dumps(doc).encode()


def R(raw: bytes) -> Callable[[], bytes]:
    return lambda: raw


# KServe v1 JSON, sent to :predict and :embed
V1_JSON: dict[str, BadJson] = {
    "b64-not-base64": BadJson(J({"instances": [{"b64": "this is *not* base64!"}]}), 422, "invalid_input", "instances[0].b64: not valid base64"),
    "b64-bad-padding": BadJson(J({"instances": [{"b64": "aGk"}]}), 422, "invalid_input", "not valid base64"),
    "b64-data-url": BadJson(J({"instances": [{"b64": "data:image/png;base64," + b64(png_bomb(2, 2))}]}), 422, "invalid_input", "not valid base64"),
    "b64-non-ascii": BadJson(J({"instances": [{"b64": "ññññ"}]}), 422, "invalid_input", "not valid base64"),
    "b64-lone-surrogate": BadJson(R(b'{"instances": [{"b64": "\\ud800"}]}'), 422, "invalid_input", "not valid base64"),
    "b64-plain-string-not-base64": BadJson(J({"instances": ["%%%%"]}), 422, "invalid_input", "instances[0]: not valid base64"),
    "b64-number": BadJson(J({"instances": [{"b64": 12345}]}), 422, "invalid_input", "expected a base64 string, got int"),
    "b64-null": BadJson(J({"instances": [{"b64": None}]}), 422, "invalid_input", "expected a base64 string"),
    "b64-of-html": BadJson(J({"instances": [{"b64": b64(b"<html>hi</html>")}]}), 422, "invalid_image", "not an image"),
    "json-10000-deep-arrays": BadJson(R(b"[" * 10000 + b"]" * 10000), 400, "bad_request", "malformed JSON"),
    "json-10000-deep-objects": BadJson(R(_deep(10000)), 400, "bad_request", "malformed JSON"),
    "json-10000-deep-in-instances": BadJson(R(b'{"instances": ' + b"[" * 10000 + b"]" * 10000 + b"}"), 400, "bad_request", "malformed JSON"),
    "json-100000-instances-strings": BadJson(J({"instances": ["aGk="] * 100_000}), 413, "limit_exceeded", "100000 instances in one request; the limit is 8"),
    "json-100000-instances-objects": BadJson(J({"instances": [{"b64": "aGk="}] * 100_000}), 413, "payload_too_large", f"limit of {LIMIT} bytes"),
    "json-top-level-array-100000": BadJson(J(["aGk="] * 100_000), 422, "invalid_input", "must be a JSON object"),
    "json-invalid-utf8": BadJson(R(b'{"instances": [{"b64": "\xff\xfe\xfd"}]}'), 400, "bad_request", "malformed JSON"),
    "json-truncated": BadJson(R(b'{"instances": [{"b64": "aGk='), 400, "bad_request", "malformed JSON"),
    "json-instances-nan": BadJson(R(b'{"instances": NaN}'), 422, "invalid_input", '"instances" must be a list'),
    "json-parameters-not-object": BadJson(J({"instances": ["aGk="], "parameters": [1]}), 422, "invalid_input", '"parameters" must be an object'),
    "json-parameter-not-boolean": BadJson(J({"instances": ["aGk="], "parameters": {"return_embedding": [True]}}), 422, "invalid_input", "return_embedding"),
}  # fmt: skip

# KServe v2 (Open Inference Protocol), sent to /v2/models/tiny/infer and its /versions/{v}/infer
V2_JSON: dict[str, BadJson] = {
    "fp32-nan": BadJson(R(_raw_v2(b"NaN")), 422, "invalid_input", "NaN or infinite"),
    "fp32-nan-nested": BadJson(R(json.dumps(_v2([[[0.5] * 28] * 27 + [[0.5] * 27 + [0.25]]], shape=[1, 28, 28])).replace("0.25", "NaN").encode()), 422, "invalid_input", "NaN or infinite"),
    "fp32-infinity": BadJson(R(_raw_v2(b"Infinity")), 422, "invalid_input", "NaN or infinite"),
    "fp32-minus-infinity": BadJson(R(_raw_v2(b"-Infinity")), 422, "invalid_input", "NaN or infinite"),
    "fp32-overflow-1e999": BadJson(R(_raw_v2(b"-1e999")), 422, "invalid_input", "NaN or infinite"),
    "fp32-100000-digit-number": BadJson(R(_raw_v2(b"1" * 100_000)), 400, "bad_request", "malformed JSON"),
    "fp32-out-of-range": BadJson(J(_v2([255.0] * 784)), 422, "invalid_input", "[0, 1]"),
    "fp32-null-values": BadJson(J(_v2([None] * 784)), 422, "invalid_input", "JSON numbers only"),
    "fp32-string-values": BadJson(J(_v2(["0.5"] * 784)), 422, "invalid_input", "JSON numbers only; it holds strings"),
    "fp32-boolean-values": BadJson(J(_v2([True] * 784)), 422, "invalid_input", "JSON numbers only; it holds booleans"),
    "fp32-object-values": BadJson(J(_v2([{"v": 0.5}] * 784)), 422, "invalid_input", "JSON numbers only"),
    "fp32-base64-image": BadJson(J(_v2([b64(_digit_png())], shape=[1])), 422, "invalid_input", "does not match"),
    "shape-negative-batch": BadJson(J(_v2(shape=[-1, 1, 28, 28])), 422, "invalid_input", "negative dimension"),
    "shape-negative-channels": BadJson(J(_v2(shape=[1, -1, 28, 28])), 422, "invalid_input", "negative dimension"),
    "shape-negative-height-width": BadJson(J(_v2(shape=[1, 1, -28, -28])), 422, "invalid_input", "negative dimension"),
    "shape-zero-batch": BadJson(J(_v2([], shape=[0, 1, 28, 28])), 422, "invalid_input", "N = 0"),
    "shape-huge-batch": BadJson(J(_v2(shape=[2**62, 1, 28, 28])), 413, "limit_exceeded", "the limit is 8"),
    "shape-beyond-int64": BadJson(J(_v2(shape=[10**30, 1, 28, 28])), 422, "invalid_input", "list of integers"),  # orjson: a float
    "shape-huge-width": BadJson(J(_v2(shape=[1, 1, 28, 2**40])), 422, "invalid_input", "does not match"),
    "shape-floats": BadJson(J(_v2(shape=[1.0, 1, 28, 28])), 422, "invalid_input", "list of integers"),
    "shape-booleans": BadJson(J(_v2(shape=[True, 1, 28, 28])), 422, "invalid_input", "list of integers"),
    "shape-string": BadJson(J(_v2(shape="1,1,28,28")), 422, "invalid_input", "list of integers"),
    "shape-empty": BadJson(J(_v2(shape=[])), 422, "invalid_input", "does not match"),
    "datatype-int8": BadJson(J(_v2(datatype="INT8")), 422, "invalid_input", "'INT8' is not accepted"),
    "datatype-fp64": BadJson(J(_v2(datatype="FP64")), 422, "invalid_input", "'FP64' is not accepted"),
    "datatype-lowercase-fp32": BadJson(J(_v2(datatype="fp32")), 422, "invalid_input", "'fp32' is not accepted"),
    "datatype-null": BadJson(J(_v2(datatype=None)), 422, "invalid_input", "None is not accepted"),
    "datatype-list": BadJson(J(_v2(datatype=["FP32"])), 422, "invalid_input", "is not accepted"),
    "datatype-bytes-with-numbers": BadJson(J(_v2([0.5], shape=[1], datatype="BYTES")), 422, "invalid_input", "expected a base64 string, got float"),
    "data-length-short": BadJson(J(_v2([0.5] * 783)), 422, "invalid_input", "783 values; shape [1, 1, 28, 28] needs 784"),
    "data-length-long": BadJson(J(_v2([0.5] * 785)), 422, "invalid_input", "785 values"),
    "data-length-100000": BadJson(J(_v2([0.5] * 100_000)), 422, "invalid_input", "100000 values"),
    "data-empty": BadJson(J(_v2([])), 422, "invalid_input", "0 values"),
    "data-scalar": BadJson(J(_v2(0.5)), 422, "invalid_input", "1 values"),
    "data-ragged": BadJson(J(_v2([[0.5] * 28] * 27 + [[0.5] * 27], shape=[1, 28, 28])), 422, "invalid_input", "not a (regular) array"),
    "data-nested-1000-deep": BadJson(R(b'{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ' + b"[" * 1000 + b"0.5" + b"]" * 1000 + b"}]}"), 422, "invalid_input", "not a (regular) array"),
    "bytes-length-mismatch": BadJson(J(_v2(["aGk="], shape=[3], datatype="BYTES")), 422, "invalid_input", "needs 3"),
    "bytes-negative-shape": BadJson(J(_v2(["aGk="], shape=[-1], datatype="BYTES")), 422, "invalid_input", "negative dimension"),
    "bytes-100000-instances": BadJson(J(_v2(["aGk="] * 100_000, shape=[100_000], datatype="BYTES")), 413, "limit_exceeded", "100000 images in one request; the limit is 8"),
    "bytes-not-base64": BadJson(J(_v2(["not base64!"], shape=[1], datatype="BYTES")), 422, "invalid_input", "inputs[0].data[0]: not valid base64"),
    "bytes-data-not-list": BadJson(J(_v2("aGk=", shape=[1], datatype="BYTES")), 422, "invalid_input", "must be a list"),
    "fp32-100000-rows": BadJson(J(_v2([0.5], shape=[100_000, 1, 28, 28])), 413, "limit_exceeded", "100000 images in one request"),
    "json-10000-deep-objects": BadJson(R(_deep(10000)), 400, "bad_request", "malformed JSON"),
    "json-10000-deep-in-data": BadJson(R(b'{"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ' + b"[" * 10000 + b"]" * 10000 + b"}]}"), 400, "bad_request", "malformed JSON"),
    "json-invalid-utf8": BadJson(R(b'{"inputs": [{"name": "\xff\xfe"}]}'), 400, "bad_request", "malformed JSON"),
    "inputs-two-tensors": BadJson(J({"inputs": _v2()["inputs"] * 2}), 422, "invalid_input", "exactly one tensor"),
    "inputs-not-objects": BadJson(J({"inputs": [[0.5] * 784]}), 422, "invalid_input", "exactly one tensor"),
    "tensor-without-data": BadJson(J({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}]}), 422, "invalid_input", 'lacks "data"'),
    "body-a-json-array": BadJson(J([_v2()]), 422, "invalid_input", "must be an inference request object"),
}  # fmt: skip


@pytest.mark.parametrize("route", ["/v1/models/tiny:predict", "/v1/models/tiny:embed"])
@pytest.mark.parametrize("case", V1_JSON)
def test_bad_v1_json_is_refused_with_a_4xx_naming_it(server, client, baseline, case, route) -> None:
    bad = V1_JSON[case]
    body = bad.body()
    assert len(body) <= LIMIT or bad.code == "payload_too_large"  # each case tests what it says
    assert_error(client.post(route, content=body, headers=JSON_HEADERS), bad.status, bad.code, bad.fragment)
    assert_still_serving(server, client, baseline)


@pytest.fixture(scope="module")
def version(client) -> str:
    return str(client.get("/v2/models/tiny").json()["versions"][0])


@pytest.mark.parametrize("versioned", [False, True], ids=["infer", "versions-infer"])
@pytest.mark.parametrize("case", V2_JSON)
def test_bad_v2_tensor_is_refused_with_a_4xx_naming_it(
    server, client, baseline, version, case, versioned
) -> None:
    bad = V2_JSON[case]
    body = bad.body()
    assert len(body) <= LIMIT or bad.code == "payload_too_large"
    route = f"/v2/models/tiny/versions/{version}/infer" if versioned else "/v2/models/tiny/infer"
    assert_error(client.post(route, content=body, headers=JSON_HEADERS), bad.status, bad.code, bad.fragment)
    assert_still_serving(server, client, baseline)


def test_the_v2_helper_builds_valid_requests(client, baseline) -> None:
    """The corpus' valid base (``_v2()`` with the digit's values) is answered: each bad case above
    differs from a valid request only in what it names."""
    values = (baseline.digit.astype(np.float32) / 255).ravel().tolist()
    r = client.post("/v2/models/tiny/infer", json=_v2(values))
    assert answer("v2-infer-fp32", r).label == baseline.label
    raw = _raw_v2(b"0.5").replace(b", 0.5", b", 0.25", 1)
    assert client.post("/v2/models/tiny/infer", content=raw, headers=JSON_HEADERS).status_code == 200


# -- bodies that never end, or are too large --------------------------------------------------------------
def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"\0" * size


@pytest.mark.parametrize(
    "route,ctype",
    [
        ("/v1/models/tiny:predict", "image/png"),
        ("/v1/models/tiny:embed", "application/json"),
        ("/v2/models/tiny/infer", "application/json"),
    ],
    ids=["v1-predict-raw", "v1-embed-json", "v2-infer"],
)
def test_50mb_body_without_content_length_is_cut_off_at_the_limit(
    server, client, baseline, route, ctype
) -> None:
    t0 = time.perf_counter()
    r = client.post(route, content=_chunks(FIFTY_MB), headers={"content-type": ctype})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, "payload_too_large", f"exceeds the limit of {LIMIT} bytes")
    assert time.perf_counter() - t0 < 20
    assert_still_serving(server, client, baseline)


def test_too_many_multipart_files_is_the_instance_limit(server, client, baseline) -> None:
    files = [("file", (f"{i}.png", baseline.png, "image/png")) for i in range(9)]
    r = client.post("/v1/models/tiny:predict", files=files)
    assert_error(r, 413, "limit_exceeded", "the limit is 8")
    fields = {f"field{i}": "1" for i in range(9)}
    r = client.post("/v1/models/tiny:predict", files=files[:1], data=fields)
    assert_error(r, 413, "limit_exceeded", "form fields")
    r = client.post("/v1/models/tiny:predict", files=files[:8])
    assert [p["label"] for p in r.json()["predictions"]] == [baseline.label] * 8


# -- model names with path traversal ------------------------------------------------------------------------
TRAVERSAL_NAMES = {
    "dotdot": "..",
    "dotdot-slash": "../../etc/passwd",
    "dotdot-into-store": "../tiny",
    "url-encoded-slash": "..%2F..%2Fetc%2Fpasswd",
    "url-encoded-dots": "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "url-encoded-dotdot-only": "%2E%2E",
    "double-encoded": "%252e%252e%252fetc%252fpasswd",
    "backslashes": "..%5C..%5Cwindows%5Cwin.ini",
    "absolute-path": "/etc/passwd",
    "absolute-encoded": "%2Fetc%2Fpasswd",
    "windows-absolute": "C:%5CWindows%5Cwin.ini",
    "nul-byte": "tiny%00.png",
    "dot-segment-back-to-tiny": "x/../tiny",
    "overlong-utf8-dots": "%c0%ae%c0%ae%c0%af",
}
TRAVERSAL_ROUTES = {
    "v1-predict": ("POST", "/v1/models/{}:predict"),
    "v1-embed": ("POST", "/v1/models/{}:embed"),
    "v2-infer": ("POST", "/v2/models/{}/infer"),
    "v2-versions-infer": ("POST", "/v2/models/tiny/versions/{}/infer"),
    "v1-model": ("GET", "/v1/models/{}"),
    "v2-model": ("GET", "/v2/models/{}"),
    "v2-model-ready": ("GET", "/v2/models/{}/ready"),
}


def raw_request(
    url: str, method: str, path: str, body: bytes = b"", ctype: str = "image/png"
) -> tuple[int, dict]:
    """One request with ``path`` sent verbatim (no normalization of ``..`` or re-encoding)."""
    host = urlsplit(url).netloc
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        headers = {"content-type": ctype} if method == "POST" else {}
        conn.request(method, path, body=body if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        assert resp.getheader("content-type", "").startswith("application/json")
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_raw_requests_reach_the_model(server, baseline) -> None:
    """The traversal tests' client is sound: the same request with the real name is answered."""
    status, doc = raw_request(server.url, "POST", "/v1/models/tiny:predict", baseline.png)
    assert status == 200 and doc["predictions"][0]["label"] == baseline.label


@pytest.mark.parametrize("route", TRAVERSAL_ROUTES)
@pytest.mark.parametrize("name", TRAVERSAL_NAMES)
def test_model_name_path_traversal_is_a_404(server, client, baseline, model_store, name, route) -> None:
    method, template = TRAVERSAL_ROUTES[route]
    status, doc = raw_request(server.url, method, template.format(TRAVERSAL_NAMES[name]), baseline.png)
    assert status == 404, doc
    assert doc["error"]["code"] in ("model_not_found", "not_found", "version_not_found"), doc
    text = json.dumps(doc)
    assert str(model_store) not in text and "root:" not in text and "[fonts]" not in text
    assert_still_serving(server, client, baseline)


# -- the whole corpus, three times: memory -------------------------------------------------------------------
def _corpus(baseline: Baseline, version: str) -> Iterator[tuple[str, Callable[[httpx.Client, str], int]]]:
    """Every input above as (id, send), ``send`` returning the status code."""
    for case, bad in REFUSED_IMAGES.items():
        for carrier in CARRIERS:
            yield (
                f"{case}/{carrier}",
                lambda c, url, b=bad, k=carrier: send_image(c, k, b.build()).status_code,
            )
    for case, good in ACCEPTED_IMAGES.items():
        for carrier in CARRIERS:
            yield (
                f"{case}/{carrier}",
                lambda c, url, g=good, k=carrier: (
                    send_image(c, k, g.build(baseline.digit, baseline.other)).status_code
                ),
            )
    for case, js in V1_JSON.items():
        for route in ("/v1/models/tiny:predict", "/v1/models/tiny:embed"):
            yield (
                f"{case}/{route}",
                lambda c, url, j=js, p=route: c.post(p, content=j.body(), headers=JSON_HEADERS).status_code,
            )
    for case, js in V2_JSON.items():
        for route in ("/v2/models/tiny/infer", f"/v2/models/tiny/versions/{version}/infer"):
            yield (
                f"{case}/{route}",
                lambda c, url, j=js, p=route: c.post(p, content=j.body(), headers=JSON_HEADERS).status_code,
            )
    for route in ("/v1/models/tiny:predict", "/v2/models/tiny/infer"):
        yield (
            f"chunked-50MB/{route}",
            lambda c, url, p=route: (
                c.post(p, content=_chunks(FIFTY_MB), headers={"content-type": "image/png"}).status_code
            ),
        )
    for name in TRAVERSAL_NAMES.values():
        for method, template in TRAVERSAL_ROUTES.values():
            yield (
                f"{name}/{template}",
                lambda c, url, m=method, p=template.format(name): raw_request(url, m, p, baseline.png)[0],
            )


def test_memory_stays_bounded_over_the_corpus(server, client, baseline, version, capsys) -> None:
    proc = psutil.Process(server.proc.pid)
    for _ in range(20):  # warm-up: valid requests on every route
        for carrier in CARRIERS:
            answer(carrier, send_image(client, carrier, baseline.png))
    rss_before = proc.memory_info().rss
    corpus = list(_corpus(baseline, version))
    statuses: dict[str, set[int]] = {}
    t0 = time.perf_counter()
    for _ in range(3):
        for case, send in corpus:
            statuses.setdefault(case, set()).add(send(client, server.url))
    seconds = time.perf_counter() - t0
    rss_after = proc.memory_info().rss
    growth = rss_after - rss_before
    with capsys.disabled():
        print(
            f"\n[bad input] {len(corpus)} requests x 3 in {seconds:.1f} s; server RSS "
            f"{rss_before / 2**20:.1f} MiB before, {rss_after / 2**20:.1f} MiB after "
            f"({growth / 2**20:+.1f} MiB; limit {RSS_GROWTH_LIMIT / 2**20:.0f} MiB)"
        )
    # every answer a 200 (valid images) or a 4xx; the same every time
    assert all(len(s) == 1 for s in statuses.values()), {k: s for k, s in statuses.items() if len(s) > 1}
    bad = {k: s for k, s in statuses.items() if not all(v == 200 or 400 <= v < 500 for v in s)}
    assert not bad, bad
    refused = [k for k in statuses if k.split("/")[0] in REFUSED_IMAGES]
    assert all(statuses[k] != {200} for k in refused)
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew by {growth / 2**20:.1f} MiB"
    assert_still_serving(server, client, baseline)
    for carrier in CARRIERS:
        a = answer(carrier, send_image(client, carrier, baseline.png))
        assert a.embedding is None or np.allclose(a.embedding, baseline.embedding, atol=1e-6)
        assert a.probabilities is None or np.allclose(a.probabilities, baseline.probabilities, atol=1e-6)
