"""``POST /v1/models/{name}:attack``: does this prediction hold under a small PGD attack?

The request is read and validated like ``:predict`` (same three body forms, same decoding); the
clean images are classified by the model's batcher (the ``:predict`` path); PGD runs in the attack
pool's worker process (:mod:`service.attack_check.pool`), never on the event loop or the batcher;
the returned 8-bit adversarial images are decoded from their own PNG bytes and classified by the
batcher again, so ``flipped`` is exactly what ``:predict`` answers for the returned PNG.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import metrics
from service.attack_check.body import attack_body, encode_png
from service.attack_check.check import Limits, parse_params
from service.attack_check.pool import AttackPool
from service.errors import CapabilityMissing, Forbidden, LimitExceeded
from service.http import json_response
from service.payloads import ImagePayload, decode_all, prediction_options
from service.routes.admin import require_admin
from service.routes.common import decode_batch, image_payload, registry, settings_of
from service.schemas import ATTACK_BODY, AttackResponse, error_responses
from service.settings import Settings

router = APIRouter(tags=["v1"])


def attack_pool(request: Request) -> AttackPool:
    pool: AttackPool = request.app.state.attacks
    return pool


async def authorize(request: Request, settings: Settings) -> None:
    """``ERC_ATTACK_ACCESS``: public, admin (the admin bearer token, 401 without it) or off (403)."""
    if settings.attack_access == "off":
        raise Forbidden(
            "the :attack operation is turned off on this server (ERC_ATTACK_ACCESS=off)",
            code="attack_disabled",
        )
    if settings.attack_access == "admin":
        token = settings.admin_token
        if token is None or not token.get_secret_value():
            raise Forbidden(
                ":attack is restricted to the admin token (ERC_ATTACK_ACCESS=admin) and this server has "
                "none (ERC_ADMIN_TOKEN)",
                code="attack_disabled",
            )
        await require_admin(request)


@router.post(
    "/v1/models/{name}:attack",
    response_model=AttackResponse,
    responses={
        **error_responses(400, 401, 403, 404, 413, 415, 422),
        429: {
            "description": "the attack queue is full",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
        },
        **error_responses(503),
    },
    openapi_extra=ATTACK_BODY,
    summary="Attack images with PGD within eps: clean and adversarial predictions, the adversarial PNG, "
    "flipped or held, optionally the smallest flipping eps",
)
async def attack(name: str, request: Request) -> Response:
    settings = settings_of(request)
    await authorize(request, settings)
    model = registry(request).get(name)
    assert model.batcher is not None and model.engine is not None and model.card is not None
    card, spec = model.card, model.engine.spec
    caps = model.engine.capabilities
    if not caps.gradients:  # :attack is PGD, a white-box attack: refused before reading the body
        raise CapabilityMissing(
            f"{model.name}: :attack runs PGD, which needs input gradients, and this model has none "
            f"({caps.why_no_gradients}); audit it with a query attack instead "
            '(POST /admin/audits with {"attacks": [{"name": "square"}]})',
            code="black_box_model",
        )
    with model.batcher.expecting():
        payload = await image_payload(request, settings)
        n = len(payload.images)
        if n > settings.attack_max_instances:
            raise LimitExceeded(
                f"{n} images in one :attack request; the limit is {settings.attack_max_instances} "
                "(ERC_ATTACK_MAX_INSTANCES)"
            )
        limits = Limits(settings.attack_max_steps, settings.attack_max_restarts, settings.attack_max_work)
        params = parse_params(payload.params, default_eps=card.train_eps, limits=limits, n=n)
        options = prediction_options(payload.params)
        if options["embedding"]:
            model.engine.require_embedding("return_embedding")
        x, decoded = await decode_batch(payload, spec, settings)
    clean = await model.batcher.submit(x)
    clean_u8 = x.numpy()  # the decoded pixels, as the attack process takes them
    job = {
        "model_dir": str(model.path),
        "weights_sha256": card.weights_sha256,
        "clean": clean_u8,
        "labels": clean.label,
        "params": asdict(params),
    }
    work = await attack_pool(request).run(job, model.name)
    adversarial_u8: np.ndarray = work["adversarial"]
    pngs = [encode_png(a) for a in adversarial_u8]
    # Classified from the PNG bytes returned, through the :predict path, so that flipped is exactly
    # what :predict answers for them.
    where = [f"adversarial[{i}]" for i in range(n)]
    xa, _ = decode_all(ImagePayload(pngs, where), spec, settings.max_image_pixels)
    adversarial = await model.batcher.submit(xa)
    body = attack_body(
        model=model.name,
        version=model.version,
        label_names=card.label_names,
        params=params,
        clean=clean,
        adversarial=adversarial,
        clean_u8=clean_u8,
        adversarial_pngs=pngs,
        adversarial_u8=adversarial_u8,
        decoded=decoded,
        options=options,
        spec=spec,
        work=work,
    )
    flips = sum(r["flipped"] for r in body["results"])
    metrics.ATTACK_REQUESTS.labels(model=model.name, outcome="done").inc()
    metrics.ATTACK_IMAGES.labels(model=model.name).inc(n)
    metrics.ATTACK_FLIPS.labels(model=model.name).inc(flips)
    metrics.IMAGES.labels(model=model.name, endpoint="attack").inc(2 * n)
    return json_response(body)
