"""Request payloads and response bodies, with no web framework: the FastAPI routes and the
TorchServe handler both parse ``{"instances": [{"b64": ...}], "parameters": {...}}`` and raw image
bodies with these functions and build the same ``:predict`` / ``:embed`` JSON with them.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.errors import InvalidImage, InvalidInput, LimitExceeded, ServiceError
from service.imaging import Decoded, InputSpec, decode_image
from service.inference import Outputs, predictions


@dataclass
class ImagePayload:
    images: list[bytes]
    where: list[str]  # how each image is named in error messages ("instances[2]", "body", ...)
    params: dict[str, Any] = field(default_factory=dict)


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


def prediction_options(params: dict[str, Any]) -> dict[str, bool]:
    """``return_embedding`` (default false) and ``return_probabilities`` (default true)."""
    return {
        "embedding": flag(params.get("return_embedding"), "return_embedding", False),
        "probabilities": flag(params.get("return_probabilities"), "return_probabilities", True),
    }


def parse_instances(doc: Any, limit: int) -> ImagePayload:
    """KServe v1 JSON: ``{"instances": [{"b64": "<image file>"} | "<base64>", ...], "parameters": {}}``."""
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


def decode_all(payload: ImagePayload, spec: InputSpec, max_pixels: int) -> tuple[torch.Tensor, list[Decoded]]:
    """All images of one request as uint8 pixels ``[n, C, H, W]`` (the engine scales them to [0, 1]:
    :func:`service.imaging.unit_range`); errors name the offending image."""
    decoded = []
    for data, name in zip(payload.images, payload.where, strict=True):
        try:
            decoded.append(decode_image(data, spec, max_pixels=max_pixels))
        except ServiceError as exc:
            exc.message = f"{name}: {exc.message}"
            raise
    if not decoded:
        raise InvalidImage("no images in the request")
    # One torch call per request, none per image: torch ops on the event loop hand the GIL back and
    # forth with the inference thread (docs/benchmarks.md, "uint8 pixels").
    pixels = decoded[0].array[None] if len(decoded) == 1 else np.stack([d.array for d in decoded])
    return torch.from_numpy(pixels), decoded


def predict_body(
    model: str,
    version: str,
    out: Outputs,
    label_names: list[str],
    decoded: list[Decoded],
    options: dict[str, bool],
    spec: InputSpec,
) -> dict[str, Any]:
    """The ``:predict`` response (numpy arrays inside; serialize with orjson OPT_SERIALIZE_NUMPY)."""
    return {
        "model": model,
        "model_version": version,
        "predictions": predictions(out, label_names, **options, extra=[{"input": d.info()} for d in decoded]),
        "preprocessing": spec.policy,
    }


def embed_body(
    model: str, version: str, out: Outputs, embed_dim: int, decoded: list[Decoded], spec: InputSpec
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "model_version": version,
        "embed_dim": embed_dim,
        "embeddings": out.embedding,
        "inputs": [d.info() for d in decoded],
        "preprocessing": spec.policy,
    }
    if out.mahalanobis is not None:
        body["typicality"] = [out.typicality(i) for i in range(len(out))]
    return body
