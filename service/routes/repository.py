"""The model-repository API (Open Inference Protocol's repository extension, with TorchServe-style
versions and defaults), behind the admin token. The record lives in the shared store
(:mod:`service.repository`): a change said to any replica reaches every replica within
``ERC_REPOSITORY_POLL_S`` seconds; the replica that receives a load answers once it has loaded it.

| method | path | |
|---|---|---|
| POST | ``/v2/repository/index`` | every store entry and recorded version, its state on each replica |
| POST | ``/v2/repository/models/{name}/load`` | serve a store entry as a version of ``name`` |
| POST | ``/v2/repository/models/{name}/unload`` | stop serving ``name`` (one version, or all) |
| POST | ``/v2/repository/models/{name}/versions/{version}/default`` | make a loaded version the default |
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.audit.store import StoreError
from service.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from service.http import json_response
from service.repository import ModelRecords, Reconciler, RepositoryError, entry_dir
from service.routes.admin import require_admin
from service.routes.common import settings_of
from service.schemas import error_responses
from training.card import CardError, read_card

router = APIRouter(prefix="/v2/repository", tags=["repository"], dependencies=[Depends(require_admin)])


# Repository requests change what a deployment serves: no coercion ({"default": 0} is not false),
# no unknown keys.
STRICT = ConfigDict(extra="forbid", strict=True)


class RepositoryUnavailable(ServiceUnavailable):
    code = "repository_unavailable"


class LoadParameters(BaseModel):
    model_config = STRICT

    entry: str | None = Field(
        None, description="the model_store directory to serve as this version (default: the model's name)"
    )
    default: bool = Field(
        True, description="make it the default version (the first version of a model always is)"
    )


class LoadRequest(BaseModel):
    model_config = STRICT

    parameters: LoadParameters = Field(default_factory=LoadParameters)


class UnloadParameters(BaseModel):
    model_config = STRICT

    version: str | None = Field(None, description="unload this version only (sha256[:12]); default: all")


class UnloadRequest(BaseModel):
    model_config = STRICT

    parameters: UnloadParameters = Field(default_factory=UnloadParameters)


class IndexRequest(BaseModel):
    model_config = STRICT

    ready: bool | None = Field(None, description="only versions ready (true) or not ready (false)")


def _reconciler(request: Request) -> Reconciler:
    rec: Reconciler | None = getattr(request.app.state, "repository", None)
    if rec is None:
        raise NotFound("the model repository needs the admin routes (ERC_ADMIN_TOKEN)")
    return rec


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except StoreError as exc:
        raise RepositoryUnavailable(str(exc), headers={"Retry-After": "5"}) from None
    except RepositoryError as exc:
        raise Conflict(str(exc), code="repository_conflict") from None


def _state(replicas: list[dict[str, Any]]) -> str:
    """OIP's state of a version from its replicas' states."""
    states = {r["state"] for r in replicas}
    if not replicas:
        return "LOADING"
    if states == {"ready"}:
        return "READY"
    if "loading" in states:
        return "LOADING"
    if "unloading" in states:
        return "UNLOADING"
    return "UNAVAILABLE"


def build_index(records: ModelRecords, store: Any, fresh_s: float) -> list[dict[str, Any]]:
    """Every recorded version (with each live replica's state) and every store entry nothing serves."""
    rows = records.all()
    replicas = records.replicas(fresh_s)
    out = []
    for r in rows:
        held = [x for x in replicas if x["name"] == r.name and x["entry"] == r.entry]
        entry: dict[str, Any] = {
            "name": r.name,
            "version": r.version,
            "entry": r.entry,
            "default": r.is_default,
            "state": _state(held) if r.wanted else "UNAVAILABLE",
            "reason": "unloaded" if not r.wanted else next((x["reason"] for x in held if x["reason"]), ""),
            "replicas": {
                x["replica"]: {"state": x["state"], "reason": x["reason"], "load_seconds": x["load_seconds"]}
                for x in held
            },
        }
        out.append(entry)
    recorded = {r.entry for r in rows}
    if store.is_dir():
        for path in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if path.name in recorded:
                continue
            try:
                version = read_card(path).weights_sha256[:12]
                reason = "in the store, not loaded"
            except CardError as exc:
                version, reason = "", f"in the store, not loadable: {exc}"
            out.append({"name": path.name, "version": version, "entry": path.name, "default": False,
                        "state": "UNAVAILABLE", "reason": reason, "replicas": {}})  # fmt: skip
    return out


@router.post("/index", summary="Repository index", responses=error_responses(400, 401, 404, 503))
async def index(request: Request, body: IndexRequest | None = None) -> Response:
    rec = _reconciler(request)
    fresh_s = max(3 * rec.poll_s, 5.0)
    rows = await _call(build_index, rec.records, settings_of(request).model_store, fresh_s)
    if body is not None and body.ready is not None:
        rows = [r for r in rows if (r["state"] == "READY") == body.ready]
    return json_response(rows)


@router.post(
    "/models/{name}/load",
    summary="Load a model (version)",
    responses=error_responses(400, 401, 404, 409, 422, 503),
)
async def load(name: str, request: Request, body: LoadRequest | None = None) -> Response:
    rec = _reconciler(request)
    params = (body or LoadRequest()).parameters
    settings = settings_of(request)
    entry = params.entry or name
    try:
        path = entry_dir(settings.model_store, entry)
    except RepositoryError as exc:
        raise InvalidInput(str(exc)) from None
    if not path.is_dir():
        raise NotFound(f"no store entry {entry!r} in {settings.model_store}", code="entry_not_found")
    try:
        card = await run_in_threadpool(read_card, path)
    except CardError as exc:
        raise InvalidInput(f"store entry {entry!r} cannot be served: {exc}", code="invalid_model") from None
    record = await _call(rec.records.load, name, entry, card.weights_sha256[:12], make_default=params.default)
    state = await run_in_threadpool(rec.wait_for, name, entry, settings.repository_load_timeout_s)
    body_out: dict[str, Any] = {
        "name": name,
        "version": record.version,
        "entry": entry,
        "default": record.is_default,
    }
    if state is None:
        return json_response({**body_out, "state": "LOADING", "reason": "still loading here"}, status=202)
    if state.state == "failed":
        raise InvalidInput(f"model {name!r} ({entry}) failed to load: {state.reason}", code="load_failed")
    return json_response({**body_out, "state": "READY", "load_seconds": state.load_seconds})


@router.post(
    "/models/{name}/unload",
    summary="Unload a model (or one version)",
    responses=error_responses(400, 401, 404, 409, 503),
)
async def unload(name: str, request: Request, body: UnloadRequest | None = None) -> Response:
    rec = _reconciler(request)
    version = (body or UnloadRequest()).parameters.version
    done = await _call(rec.records.unload, name, version)
    await _call(rec.reconcile)
    return json_response({"name": name, "unloaded": [{"version": r.version, "entry": r.entry} for r in done]})


@router.post(
    "/models/{name}/versions/{version}/default",
    summary="Make a loaded version the default",
    responses=error_responses(401, 404, 409, 503),
)
async def set_default(name: str, version: str, request: Request) -> Response:
    rec = _reconciler(request)
    record = await _call(rec.records.set_default, name, version)
    await _call(rec.reconcile)
    return json_response({"name": name, "version": record.version, "entry": record.entry, "default": True})
