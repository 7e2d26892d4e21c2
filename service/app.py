"""The FastAPI application: factory, lifespan (load, verify and warm the models, start their
batchers; stop them), routers, error handlers and the request-metrics middleware.

Nothing is loaded at import: ``create_app()`` builds an app, its lifespan loads the models.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__, metrics
from service.attack_check.pool import AttackPool
from service.audit.manager import AuditManager
from service.embedding_map import EmbeddingMaps
from service.errors import ServiceError
from service.http import error_response, install_handlers
from service.repository import ModelRecords, Reconciler
from service.routes import admin, attack, attacks, console, health, repository, v1, v2
from service.schemas import component_schemas
from service.served_models import ModelRegistry
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


class MetricsMiddleware:
    """Request count and duration by method, route *template* and status (pure ASGI, low overhead)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = (scope["method"], template, str(status))
            metrics.HTTP_REQUESTS.labels(*labels).inc()
            metrics.HTTP_DURATION.labels(*labels).observe(time.perf_counter() - start)


class HeadAsGet:
    """``HEAD`` on every ``GET`` resource (RFC 9110 9.3.2: the ``GET`` response without its body).

    FastAPI's routes answer only the methods they declare, so ``HEAD /healthz`` was a 405 whose
    ``Allow`` header listed ``HEAD``. Here a ``HEAD`` request runs as ``GET`` on a copy of the scope
    and the body is dropped (the headers, ``Content-Length`` included, are those of the ``GET``), so
    the OpenAPI document keeps one operation per route. The server still sees ``HEAD``; the
    matched route is copied back for the metrics middleware around this one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, without_body)
        finally:
            if "route" in as_get:
                scope["route"] = as_get["route"]


class FastPath:
    """The inference routes without the framework's per-request machinery.

    ``POST /v1/models/{name}:predict``, ``:embed`` and ``/v2/models/{name}/infer`` are served here by
    calling the *same endpoint functions* the FastAPI routes declare (so behaviour, errors and the
    OpenAPI description are shared), skipping FastAPI's routing, dependency solving and exception
    middleware stack, which cost more CPU per request than decoding an MNIST image. Every other
    request passes through to the application.
    """

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.routes = [
            (re.compile(r"^/v1/models/(?P<name>[^/]+):predict$"), v1.predict, "/v1/models/{name}:predict"),
            (re.compile(r"^/v1/models/(?P<name>[^/]+):embed$"), v1.embed, "/v1/models/{name}:embed"),
            (re.compile(r"^/v2/models/(?P<name>[^/]+)/infer$"), v2.infer, "/v2/models/{name}/infer"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for regex, endpoint, template in self.routes:
                match = regex.match(path)
                if match is not None:
                    await self._serve(scope, receive, send, endpoint, match.group("name"), template)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, endpoint: Any, name: str, template: str
    ) -> None:
        start = time.perf_counter()
        scope["app"] = self.fastapi_app
        request = Request(scope, receive)
        try:
            response = await endpoint(name, request)
        except ServiceError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
        except Exception as exc:
            log.exception("unhandled error on %s: %s", template, exc)
            response = error_response(500, "internal_error", "internal error; see the server log")
        await response(scope, receive, send)
        labels = ("POST", template, str(response.status_code))
        metrics.HTTP_REQUESTS.labels(*labels).inc()
        metrics.HTTP_DURATION.labels(*labels).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        remote = None
        if settings.model_process_socket is not None:  # an HTTP process of several (service/multiproc)
            from service.multiproc.remote import RemoteReconciler, RemoteRegistry

            remote = RemoteRegistry(settings)
            remote.start()
            registry: ModelRegistry = remote
        else:
            registry = ModelRegistry(settings)
            registry.load_all()
        app.state.registry = registry
        # The audit store only matters with the admin routes on; without a token there is no way
        # to request an audit, so no database is opened (or created).
        manager = AuditManager(settings) if _admin_enabled(settings) else None
        app.state.audits = manager
        if manager is not None:
            manager.start()
            # The model repository's record shares the audit store's database (service/repository.py).
            records, poll_s = ModelRecords(manager.store), settings.repository_poll_s
            app.state.repository = (
                Reconciler(registry, records, poll_s)
                if remote is None
                else RemoteReconciler(remote, records, poll_s)
            )
            app.state.repository.start()
        app.state.attacks = AttackPool(settings)  # worker processes start with the first :attack
        batch = min(settings.max_batch_size, settings.max_queue)
        app.state.embedding_maps = EmbeddingMaps(settings.embedding_map_n, batch)
        ok, _ = registry.readiness()
        log.info("startup done in %.2f s; ready=%s", time.perf_counter() - t0, ok)
        try:
            yield
        finally:
            app.state.attacks.stop()
            if getattr(app.state, "repository", None) is not None:
                app.state.repository.stop()
            if manager is not None:
                manager.stop()
                metrics.AUDIT_STORE.snapshot = None
            registry.stop()
            if remote is not None:
                await remote.close()
            log.info("models and audits stopped")

    app = FastAPI(
        title="ER-Classifier service",
        version=__version__,
        description=(
            "Robust image classification with the ER-Classifier: predictions, embeddings, KServe v1 and v2 "
            "(Open Inference Protocol), Prometheus metrics. Every error is "
            '`{"error": {"code": ..., "message": ...}}`.'
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_handlers(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(repository.router)
    app.include_router(attack.router)
    app.include_router(attacks.router)
    app.include_router(console.router)
    app.add_middleware(HeadAsGet)
    app.add_middleware(MetricsMiddleware)  # added last, so outermost: it sees HEAD as HEAD

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(component_schemas())
            _validation_errors_as_served(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _admin_enabled(settings: Settings) -> bool:
    token = settings.admin_token
    return token is not None and bool(token.get_secret_value())


def _validation_errors_as_served(schema: dict[str, Any]) -> None:
    """FastAPI documents a 422 of ``{"detail": [...]}`` (HTTPValidationError) on every route with
    parameters; the service answers a validation error with the service-wide error body
    (:func:`service.http.install_handlers`). Document what is served."""
    fastapi_422 = {"$ref": "#/components/schemas/HTTPValidationError"}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422", {})
            if response.get("content", {}).get("application/json", {}).get("schema") == fastapi_422:
                operation["responses"]["422"] = {"description": "invalid input", "content": error}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def build_asgi(settings: Settings | None = None) -> ASGIApp:
    """What the HTTP server runs: the FastAPI app, behind the inference fast path when enabled
    (outermost, so those requests skip every framework middleware)."""
    settings = settings or get_settings()
    app = create_app(settings)
    return FastPath(app, app) if settings.fast_path else app
