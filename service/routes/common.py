"""Reading requests in the FastAPI routes: bounded bodies, JSON, and image payloads in their three
shapes (JSON with base64 instances, a raw image body, multipart uploads)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.errors import (
    BadRequest,
    InvalidInput,
    LimitExceeded,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from service.imaging import Decoded, InputSpec
from service.payloads import ImagePayload, decode_all, parse_instances
from service.served_models import ModelRegistry
from service.settings import Settings

# Below this many bytes of images per request, decoding inline on the event loop costs less than a
# hop to a worker thread (tens of microseconds for an MNIST-sized PNG); above it, a thread.
INLINE_DECODE_BYTES = 64 * 1024

IMAGE_TYPES = ("image/", "application/octet-stream")


def registry(request: Request) -> ModelRegistry:
    """The app's model registry (created in the lifespan)."""
    reg: ModelRegistry = request.app.state.registry
    return reg


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


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


async def image_payload(request: Request, settings: Settings) -> ImagePayload:
    """Images from a JSON, raw-image or multipart request (415 for anything else)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    body = await read_body(request, settings.max_body_bytes)
    query = dict(request.query_params)
    if ctype == "application/json" or (not ctype and body[:1] in (b"{", b"[")):
        payload = parse_instances(parse_json(body), settings.max_instances)
    elif ctype.startswith(IMAGE_TYPES) or (not ctype and body):
        payload = ImagePayload([body], ["body"])
    elif ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_instances, max_fields=settings.max_instances)
        except ServiceError:
            raise
        except Exception as exc:  # starlette raises HTTPException / MultiPartException variants
            detail = str(getattr(exc, "detail", exc))
            if detail.startswith("Too many"):  # starlette max_files / max_fields: a limit, not bad syntax
                what = "files" if "files" in detail else "form fields"
                raise LimitExceeded(
                    f"more than {settings.max_instances} {what} in one multipart request; "
                    f"the limit is {settings.max_instances}"
                ) from None
            raise BadRequest(f"malformed multipart body: {detail}") from None
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise InvalidInput("multipart body holds no file parts")
        payload = ImagePayload([await f.read() for _, f in files], [f"file {k!r}" for k, _ in files])
        payload.params = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    elif not ctype:
        raise InvalidInput("empty request body; send an image, JSON instances or multipart files")
    else:
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r} is not read here; send application/json, image/* or multipart/form-data"
        )
    payload.params = {**query, **payload.params}
    return payload


async def decode_batch(
    payload: ImagePayload, spec: InputSpec, settings: Settings
) -> tuple[torch.Tensor, list[Decoded]]:
    """All images of a request as one ``[n, C, H, W]`` tensor (decoded in a thread when large)."""
    size = sum(len(b) for b in payload.images)
    args = (payload, spec, settings.max_image_pixels)
    return decode_all(*args) if size <= INLINE_DECODE_BYTES else await run_in_threadpool(decode_all, *args)
