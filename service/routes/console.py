"""The web console (``/`` and ``/console``: static files of the package, no build step) and the
embedding map it draws (``GET /v1/models/{name}/embedding-map``).

Every console response carries a strict Content-Security-Policy: scripts, styles, images and
requests from this origin only (nothing inline, nothing from elsewhere), no frames, no forms, no
plugins. Audit reports open in a tab of their own from a ``blob:`` URL the console makes (the admin
token goes in a header, never in a URL); such a document inherits the console's policy, which
therefore also allows the report's one ``<style>`` block by its hash and its inline ``data:`` plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.audit.report import style_hash
from service.embedding_map import EmbeddingMaps
from service.errors import NotFound
from service.http import json_response
from service.routes.common import registry, settings_of
from service.schemas import EmbeddingMap, error_responses, json_error_responses

router = APIRouter(tags=["console"])

STATIC = Path(__file__).resolve().parent.parent / "static" / "console"
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        f"style-src 'self' {style_hash()}",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
HTML = {200: {"content": {"text/html": {}}, "description": "the console page"}}


def _file(name: str, request: Request) -> Response:
    if not settings_of(request).console:
        raise NotFound("the console is turned off on this server (ERC_CONSOLE=false)", code="not_found")
    media = ASSETS.get(name)
    if media is None:
        raise NotFound(f"no console file {name!r}; there are {', '.join(sorted(ASSETS))}")
    return Response((STATIC / name).read_bytes(), media_type=media, headers=HEADERS)


PAGE: dict[str, Any] = {
    "response_class": Response,
    "responses": {**HTML, **json_error_responses(404)},
    "summary": "The console",
}


@router.get("/", **PAGE)
async def root(request: Request) -> Response:
    return _file("index.html", request)


@router.get("/console", **PAGE)
async def console(request: Request) -> Response:
    return _file("index.html", request)


@router.get(
    "/console/{asset}",
    response_class=Response,
    responses={
        200: {"content": {"text/javascript": {}, "text/css": {}, "text/html": {}}, "description": "a file"},
        **json_error_responses(404),
    },
    summary="The console's script and style sheet",
)
async def console_asset(asset: str, request: Request) -> Response:
    return _file(asset, request)


@router.get(
    "/v1/models/{name}/embedding-map",
    response_model=EmbeddingMap,
    responses=error_responses(404, 503),
    summary="The model's test-set embeddings projected to 2-D (the audit report's PCA), with the "
    "projection, to place any embedding on the map",
)
async def embedding_map(name: str, request: Request) -> Response:
    model = registry(request).get(name)
    maps: EmbeddingMaps = request.app.state.embedding_maps
    return json_response(await maps.get(model))
