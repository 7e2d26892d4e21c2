"""The error tree mapped to HTTP, in one place, and the JSON response helpers."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import get_route_path

from service.errors import ServiceError

log = logging.getLogger(__name__)

# Set by the first shutdown signal when a drain period is configured (service/server.py): /readyz
# then answers 503 while requests are still served.
draining = threading.Event()


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
}


def allowed_methods(request: Request) -> str | None:
    """The ``Allow`` header of a 405: every method of the resource the URL names, or None for a path
    the OpenAPI document does not describe (the framework's header stands).

    The framework lists the methods of the first route whose path matches: one of several where a
    path has one route per method (``GET`` alone for ``/admin/audits``, which also takes ``POST``),
    or a less specific template (``/v1/models/{name}`` for ``/v1/models/x:predict``). The OpenAPI
    paths are the route table (every route is documented); the most specific template matching the
    URL (the most literal characters) names the resource; ``HEAD`` comes with ``GET``.
    """
    path = get_route_path(request.scope)
    best: tuple[int, set[str]] | None = None
    for template, operations in request.app.openapi().get("paths", {}).items():
        literals = re.split(r"{[^}]*}", template)
        if re.fullmatch("[^/]+".join(map(re.escape, literals)), path):
            methods = {m.upper() for m in operations if m.upper() in _METHODS}
            specificity = sum(map(len, literals))
            if methods and (best is None or specificity > best[0]):
                best = (specificity, methods)
    if best is None:
        return None
    methods = best[1] | ({"HEAD"} if "GET" in best[1] else set())
    return ", ".join(sorted(methods))


def install_handlers(app: FastAPI) -> None:
    async def service_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:
            allow = allowed_methods(request)
            if allow:
                headers = {**(headers or {}), "Allow": allow}
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), message, headers)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_input", "; ".join(parts) or "invalid request")

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error: %s", exc)
        return error_response(500, "internal_error", "internal error; see the server log")

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson-encoded response (numpy arrays serialized natively)."""
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)
