"""Request reading shared by the routes: bounded bodies, image payloads in their three shapes
(JSON with base64 instances, a raw image body, multipart uploads), and decoding off the hot path
when images are large."""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.errors import (
    BadRequest,
    InvalidImage,
    InvalidInput,
    LimitExceeded,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from service.imaging import Decoded, InputSpec, decode_image
from service.settings import Settings

# Below this many bytes of images per request, decoding inline on the event loop costs less than a
# hop to a worker thread (tens of microseconds for an MNIST-sized PNG); above it, a thread.
INLINE_DECODE_BYTES = 64 * 1024

IMAGE_TYPES = ("image/", "application/octet-stream")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes (413) whether or not Content-Length is
    sent; the body is cached on the request so ``request.form()`` can parse it afterwards."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # starlette re-reads the cached body for form parsing
    return body


def parse_json(body: bytes) -> Any:
    """orjson on the hot path. When it refuses a body, Python's parser gets a second look: it
    accepts the NaN / Infinity tokens and overflowing numbers that many clients emit, so that such
    tensors are refused with the precise 422 of the value check rather than a generic 400."""
    if not body:
        raise BadRequest("empty request body; expected JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequest(f"malformed JSON: {exc}") from None


def b64decode(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"{where}: expected a base64 string, got {type(text).__name__}")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{where}: not valid base64 ({exc})") from None


def flag(value: Any, name: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise InvalidInput(f"parameter {name!r} must be a boolean, got {value!r}")


@dataclass
class ImagePayload:
    images: list[bytes]
    where: list[str]  # how each image is named in error messages
    params: dict[str, Any] = field(default_factory=dict)


def _instances(doc: Any, limit: int) -> ImagePayload:
    if not isinstance(doc, dict):
        raise InvalidInput('body must be a JSON object like {"instances": [{"b64": "..."}]}')
    instances = doc.get("instances", doc.get("inputs"))
    if not isinstance(instances, list):
        raise InvalidInput('"instances" must be a list of {"b64": "<base64 image file>"} objects')
    if not instances:
        raise InvalidInput('"instances" is empty')
    if len(instances) > limit:
        raise LimitExceeded(f"{len(instances)} instances in one request; the limit is {limit}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput('"parameters" must be an object')
    images, where = [], []
    for i, inst in enumerate(instances):
        name = f"instances[{i}]"
        if isinstance(inst, dict) and "b64" in inst:
            images.append(b64decode(inst["b64"], f"{name}.b64"))
        elif isinstance(inst, str):
            images.append(b64decode(inst, name))
        else:
            raise InvalidInput(f'{name}: expected {{"b64": "<base64 image file>"}}')
        where.append(name)
    return ImagePayload(images, where, params)


async def image_payload(request: Request, settings: Settings) -> ImagePayload:
    """Images from a JSON, raw-image or multipart request (415 for anything else)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    body = await read_body(request, settings.max_body_bytes)
    query = dict(request.query_params)
    if ctype == "application/json" or (not ctype and body[:1] in (b"{", b"[")):
        payload = _instances(parse_json(body), settings.max_instances)
    elif ctype.startswith(IMAGE_TYPES) or (not ctype and body):
        payload = ImagePayload([body], ["body"])
    elif ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_instances, max_fields=settings.max_instances)
        except ServiceError:
            raise
        except Exception as exc:  # starlette raises HTTPException / MultiPartException variants
            raise BadRequest(f"malformed multipart body: {getattr(exc, 'detail', exc)}") from None
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise InvalidInput("multipart body holds no file parts")
        payload = ImagePayload([await f.read() for _, f in files], [f"file {k!r}" for k, _ in files])
        params = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        payload.params = params
    elif not ctype:
        raise InvalidInput("empty request body; send an image, JSON instances or multipart files")
    else:
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r} is not read here; send application/json, image/* or multipart/form-data"
        )
    payload.params = {**query, **payload.params}
    return payload


def _decode_all(images: list[bytes], where: list[str], spec: InputSpec, max_pixels: int) -> list[Decoded]:
    out = []
    for data, name in zip(images, where, strict=True):
        try:
            out.append(decode_image(data, spec, max_pixels=max_pixels))
        except ServiceError as exc:
            exc.message = f"{name}: {exc.message}"
            raise
    return out


async def decode_batch(
    payload: ImagePayload, spec: InputSpec, settings: Settings
) -> tuple[torch.Tensor, list[Decoded]]:
    """All images of a request as one ``[n, C, H, W]`` tensor (decoded in a thread when large)."""
    size = sum(len(b) for b in payload.images)
    args = (payload.images, payload.where, spec, settings.max_image_pixels)
    decoded = (
        _decode_all(*args) if size <= INLINE_DECODE_BYTES else await run_in_threadpool(_decode_all, *args)
    )
    if not decoded:
        raise InvalidImage("no images in the request")
    x = decoded[0].tensor[None] if len(decoded) == 1 else torch.stack([d.tensor for d in decoded])
    return x, decoded
