"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import metrics
from service.http import draining, json_response
from service.routes.common import registry
from service.schemas import Liveness, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Liveness, summary="Liveness: the process answers (no model needed)")
async def healthz() -> Response:
    return json_response({"live": True})


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Readiness: the default model is loaded and warm and its queue is not full; per-model detail "
    "and, with the admin routes on, whether the audit store answers (reported, not required)",
)
async def readyz(request: Request) -> Response:
    ok, detail = registry(request).readiness()
    body: dict[str, Any] = {"ready": ok, "draining": False, "models": detail}
    manager = request.app.state.audits
    if manager is not None:
        # Reported, not required: predictions are served whether or not the audit store answers.
        body["audits"] = manager.readiness()
    if draining.is_set():  # shutting down: keep serving, but send no new traffic here
        return json_response({**body, "ready": False, "draining": True}, status=503)
    return json_response(body, status=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def prometheus() -> Response:
    body, ctype = metrics.render()
    return Response(body, media_type=ctype)
