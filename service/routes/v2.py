"""Open Inference Protocol (KServe v2) over HTTP/JSON.

Inputs: one tensor, either ``FP32`` ``[N, C, H, W]`` (or ``[C, H, W]``) with values in [0, 1], or
``BYTES`` ``[N]`` holding base64-encoded image files. Outputs: ``logits`` and ``probabilities``
(FP32 ``[N, m]``), ``embedding`` (FP32 ``[N, k]``), ``label`` (INT64 ``[N]``) and, for models whose
card has a fitted typicality score, ``prior_log_density`` and ``mahalanobis`` (FP32 ``[N]``) and
``atypical`` (BOOL ``[N]``); a request may name the subset it wants. The model version is the first
12 hex digits of the weights' sha256.

Deviation from the protocol text: errors use the service-wide ``{"error": {"code", "message"}}``
body rather than ``{"error": "message"}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import __version__, metrics
from service.errors import InvalidInput, LimitExceeded
from service.http import draining, json_response
from service.payloads import ImagePayload, b64decode
from service.routes.common import decode_batch, parse_json, read_body, registry, settings_of
from service.schemas import (
    InferResponse,
    Liveness,
    ModelMetadata,
    ModelReady,
    Readiness,
    ServerMetadata,
    error_responses,
)
from service.served_models import ServedModel

router = APIRouter(tags=["v2 (Open Inference Protocol)"])

OUTPUTS = ("logits", "probabilities", "embedding", "label")
TYPICALITY_OUTPUTS = ("prior_log_density", "mahalanobis", "atypical")
INFER_DOC: dict[str, Any] = {
    "response_model": InferResponse,
    "responses": error_responses(400, 404, 413, 422, 503),
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}},
        }
    },
}


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "erc-service", "version": __version__, "extensions": []})


@router.get("/v2/health/live", response_model=Liveness, summary="Server liveness")
async def live() -> Response:
    return json_response({"live": True})


@router.get(
    "/v2/health/ready",
    response_model=Readiness,
    responses={400: {"model": Readiness}},
    summary="Server readiness (200 ready, 400 not ready, as the protocol asks)",
)
async def ready(request: Request) -> Response:
    ok, _ = registry(request).readiness()
    ok = ok and not draining.is_set()
    return json_response({"ready": ok}, status=200 if ok else 400)


def _model(request: Request, name: str, version: str | None) -> ServedModel:
    reg = registry(request)
    return reg.get(name) if version is None else reg.get_version(name, version)


def _metadata(model: ServedModel) -> dict[str, Any]:
    card = model.card
    assert card is not None
    c, h, w = card.input_shape
    m = len(card.label_names)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "pytorch_erc",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, m]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, m]},
            *(
                [{"name": "embedding", "datatype": "FP32", "shape": [-1, card.embed_dim]}]
                if model.engine is None or model.engine.capabilities.embedding
                else []
            ),
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            *(
                [
                    {"name": "prior_log_density", "datatype": "FP32", "shape": [-1]},
                    {"name": "mahalanobis", "datatype": "FP32", "shape": [-1]},
                    {"name": "atypical", "datatype": "BOOL", "shape": [-1]},
                ]
                if model.engine is not None and model.engine.typicality is not None
                else []
            ),
        ],
    }


@router.get(
    "/v2/models/{name}",
    response_model=ModelMetadata,
    responses=error_responses(404, 503),
    summary="Model metadata",
)
async def model_metadata(name: str, request: Request) -> Response:
    return json_response(_metadata(_model(request, name, None)))


@router.get(
    "/v2/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=error_responses(404, 503),
    summary="Model metadata (one version)",
)
async def model_version_metadata(name: str, version: str, request: Request) -> Response:
    return json_response(_metadata(_model(request, name, version)))


@router.get(
    "/v2/models/{name}/ready",
    response_model=ModelReady,
    responses={400: {"model": ModelReady}, **error_responses(404)},
    summary="Model readiness (200 ready, 400 not ready)",
)
async def model_ready(name: str, request: Request) -> Response:
    reg = registry(request)
    if name not in reg.models:
        reg.get(name)  # 404 with the served names
    ok = reg.models[name].ready
    return json_response({"name": name, "ready": ok}, status=200 if ok else 400)


async def _infer(request: Request, model: ServedModel) -> Response:
    settings = settings_of(request)
    assert model.engine is not None and model.batcher is not None
    spec = model.engine.spec
    with model.batcher.expecting():
        doc = parse_json(await read_body(request, settings.max_body_bytes))
        if not isinstance(doc, dict):
            raise InvalidInput('body must be an inference request object with "inputs"')
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise InvalidInput('"inputs" must hold exactly one tensor object')
        tensor = inputs[0]
        for key in ("name", "shape", "datatype", "data"):
            if key not in tensor:
                raise InvalidInput(f'inputs[0] lacks "{key}"')
        wanted = _requested_outputs(
            doc.get("outputs"), typicality=model.engine.typicality is not None, engine=model.engine
        )
        datatype = tensor["datatype"]
        if datatype == "FP32":
            from service.imaging import tensor_from_values

            x = tensor_from_values(tensor["data"], tensor["shape"], spec, max_rows=settings.max_instances)
        elif datatype == "BYTES":
            x = await _bytes_input(tensor, spec, settings)
        else:
            raise InvalidInput(f"inputs[0].datatype {datatype!r} is not accepted; use FP32 or BYTES")
    out = await model.batcher.submit(x)
    metrics.IMAGES.labels(model=model.name, endpoint="infer").inc(len(out))
    metrics.observe_typicality(model.name, "infer", out)
    n = len(out)
    arrays: dict[str, tuple[str, Any]] = {
        "logits": ("FP32", out.logits),
        "probabilities": ("FP32", out.probabilities),
        "embedding": ("FP32", out.embedding),
        "label": ("INT64", out.label),
        "prior_log_density": ("FP32", out.prior_log_density),
        "mahalanobis": ("FP32", out.mahalanobis),
        "atypical": ("BOOL", out.atypical),
    }
    outputs = []
    for name in wanted:
        dtype, arr = arrays[name]
        outputs.append(
            {"name": name, "datatype": dtype, "shape": [n, *arr.shape[1:]], "data": arr.reshape(-1)}
        )
    response: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if isinstance(doc.get("id"), str):
        response["id"] = doc["id"]
    return json_response(response)


def _requested_outputs(requested: Any, *, typicality: bool, engine: Any = None) -> list[str]:
    known: tuple[str, ...] = OUTPUTS + TYPICALITY_OUTPUTS if typicality else OUTPUTS
    embedding = engine is None or engine.capabilities.embedding
    if not embedding:  # a model imported without an embedding output: not among the defaults
        known = tuple(k for k in known if k != "embedding")
    if requested is None:
        return list(known)
    if not isinstance(requested, list) or not requested:
        raise InvalidInput('"outputs" must be a non-empty list of {"name": ...} objects')
    names: list[str] = []
    for i, o in enumerate(requested):
        name = o.get("name") if isinstance(o, dict) else None
        if name == "embedding" and not embedding:
            engine.require_embedding(f'outputs[{i}] "embedding"')
        if not isinstance(name, str) or name not in known:
            extra = " (this model has no fitted typicality score)" if name in TYPICALITY_OUTPUTS else ""
            raise InvalidInput(f"outputs[{i}]: unknown output {name!r}{extra}; known: {', '.join(known)}")
        names.append(name)
    return names


async def _bytes_input(tensor: dict[str, Any], spec: Any, settings: Any) -> Any:
    shape, data = tensor["shape"], tensor["data"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise InvalidInput(f"shape must be a list of integers, got {shape!r}")
    if any(s < 0 for s in shape):
        raise InvalidInput(f"shape {shape} has a negative dimension")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"BYTES input shape must be [N] or [N, 1], got {shape}")
    if not isinstance(data, list):
        raise InvalidInput("BYTES input data must be a list of base64 strings")
    if len(data) != shape[0]:
        raise InvalidInput(f"BYTES input has {len(data)} elements; shape {shape} needs {shape[0]}")
    if shape[0] == 0:
        raise InvalidInput("input holds no images (N = 0)")
    if shape[0] > settings.max_instances:
        raise LimitExceeded(f"{shape[0]} images in one request; the limit is {settings.max_instances}")
    names = [f"inputs[0].data[{i}]" for i in range(len(data))]
    payload = ImagePayload([b64decode(d, n) for d, n in zip(data, names, strict=True)], names)
    x, _ = await decode_batch(payload, spec, settings)
    return x


@router.post("/v2/models/{name}/infer", summary="Inference", **INFER_DOC)
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, _model(request, name, None))


@router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference (one version)", **INFER_DOC)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, _model(request, name, version))
