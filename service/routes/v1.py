"""KServe v1 protocol (``/v1/models``, ``:predict``) and ``:embed``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import metrics
from service.http import json_response
from service.inference import Outputs
from service.payloads import embed_body, predict_body, prediction_options
from service.routes.common import decode_batch, image_payload, registry, settings_of
from service.schemas import (
    IMAGE_BODY,
    EmbedResponse,
    ModelList,
    ModelSummary,
    PredictResponse,
    error_responses,
)
from service.served_models import ServedModel

router = APIRouter(tags=["v1"])


@router.get("/v1/models", response_model=ModelList, summary="List served models with their card summaries")
async def list_models(request: Request) -> Response:
    reg = registry(request)
    return json_response(
        {"models": [m.summary() for m in reg.models.values()], "default_model": reg.default_name}
    )


@router.get(
    "/v1/models/{name}",
    response_model=ModelSummary,
    responses=error_responses(404),
    summary="One model's card summary",
)
async def get_model(name: str, request: Request) -> Response:
    reg = registry(request)
    model = reg.models.get(name)
    if model is None:
        reg.get(name)  # raises ModelNotServed with the list of served names
    assert model is not None
    return json_response(model.summary())


async def _run(
    request: Request, name: str, *, embed: bool = False
) -> tuple[ServedModel, Outputs, list[Any], dict[str, bool]]:
    """Read, validate (options first, then images), decode, and classify one request."""
    reg = registry(request)
    settings = settings_of(request)
    model = reg.get(name)
    assert model.batcher is not None and model.engine is not None
    with model.batcher.expecting():
        payload = await image_payload(request, settings)
        options = prediction_options(payload.params)
        if embed:
            model.engine.require_embedding(":embed")
        elif options["embedding"]:
            model.engine.require_embedding("return_embedding")
        x, decoded = await decode_batch(payload, model.engine.spec, settings)
    out = await model.batcher.submit(x)
    return model, out, decoded, options


@router.post(
    "/v1/models/{name}:predict",
    response_model=PredictResponse,
    responses=error_responses(400, 404, 413, 415, 422, 503),
    openapi_extra=IMAGE_BODY,
    summary="Classify images (JSON base64 instances, a raw image body, or multipart files)",
)
async def predict(name: str, request: Request) -> Response:
    model, out, decoded, options = await _run(request, name)
    assert model.card is not None and model.engine is not None
    metrics.IMAGES.labels(model=model.name, endpoint="predict").inc(len(out))
    metrics.observe_typicality(model.name, "predict", out)
    spec = model.engine.spec
    return json_response(
        predict_body(model.name, model.version, out, model.card.label_names, decoded, options, spec)
    )


@router.post(
    "/v1/models/{name}:embed",
    response_model=EmbedResponse,
    responses=error_responses(400, 404, 413, 415, 422, 503),
    openapi_extra=IMAGE_BODY,
    summary="Embeddings (the encoder's low-dimensional output) of images",
)
async def embed(name: str, request: Request) -> Response:
    model, out, decoded, _ = await _run(request, name, embed=True)
    assert model.card is not None and model.engine is not None
    metrics.IMAGES.labels(model=model.name, endpoint="embed").inc(len(out))
    metrics.observe_typicality(model.name, "embed", out)
    return json_response(
        embed_body(model.name, model.version, out, model.card.embed_dim, decoded, model.engine.spec)
    )
