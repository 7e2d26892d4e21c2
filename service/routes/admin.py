"""Admin API: robustness audits of the served models, behind a bearer token.

With no ``ERC_ADMIN_TOKEN`` configured every admin route answers 404, as if it did not exist. A
missing or wrong token gets 401 (compared in constant time). See :mod:`service.audit.manager` for the
queueing policy. The routes read and write the shared job store, so any API replica answers for
any audit; they call it from the thread pool (a slow or unreachable database never blocks the event
loop that serves predictions) and answer 503 ``audit_store_unavailable`` while it is down.
"""

from __future__ import annotations

import io
import json
import math
import secrets
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, Response

from service.audit.engine import AuditSpec
from service.audit.manager import AuditManager
from service.audit.report import csp as report_csp
from service.audit.runner import checks_cost, default_eps
from service.audit.status import WITH_REPORT, JobStatus, status_groups
from service.errors import CapabilityMissing, Conflict, InvalidInput, LimitExceeded, NotFound, Unauthorized
from service.http import json_response
from service.payloads import ImagePayload, b64decode, decode_all
from service.routes.common import registry, settings_of
from service.schemas import Instance, error_responses, json_error_responses
from training.attacks import (
    AttackError,
    build_attacks,
    default_attacks,
    list_attacks,
    list_presets,
    require_queries_only,
)
from training.card import ModelCard
from training.data import dataset_info, is_folder
from training.data.folder import canonical_name
from training.formats import Capabilities


def audits(request: Request) -> AuditManager:
    manager: AuditManager = request.app.state.audits
    return manager


async def require_admin(request: Request) -> None:
    token = settings_of(request).admin_token
    expected = token.get_secret_value() if token is not None else ""
    if not expected:
        raise NotFound("not found")  # admin disabled: the routes do not exist
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    ok = scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), expected.encode())
    if not ok:
        raise Unauthorized(
            "missing or wrong admin token", headers={"WWW-Authenticate": 'Bearer realm="erc-admin"'}
        )


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

# Seeds go to torch.Generator.manual_seed, which takes 64 bits, with offsets added: 0 <= seed < 2**62.
SEED_MAX = 2**62 - 1


# Every attack and preset requests may name, from the registry (training.attacks).
ATTACK_NAMES = (*list_attacks(), *list_presets())


class AttackRequest(BaseModel):
    name: Literal[ATTACK_NAMES] = Field(  # type: ignore[valid-type]
        description="an attack, or a preset (autoattack: AutoAttack's standard suite, alone in the list)"
    )
    params: dict[str, int | float | str | bool] = Field(
        default_factory=dict, description="keyword arguments of the attack"
    )


class DataRequest(BaseModel):
    source: Literal["test", "upload"] = "test"
    dataset: str | None = Field(None, description="test split of this dataset (default: the model's)")
    n: int = Field(500, ge=1, description="samples drawn from the test split")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the draw")
    instances: list[Instance] | None = Field(None, description="uploaded images (source=upload)")
    labels: list[int] | None = Field(None, description="their true labels (source=upload)")


class AuditRequest(BaseModel):
    model: str
    data: DataRequest = Field(default_factory=DataRequest)
    attacks: list[AttackRequest] | None = Field(
        None,
        description="default: FGSM, PGD-40, APGD-CE-100 (those that implement the norm); "
        '[{"name": "autoattack"}] for AutoAttack\'s standard suite',
        min_length=1,
        max_length=8,
    )
    eps: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
        None, description="default: 0, half and all of the training eps", min_length=1, max_length=32
    )
    norm: Literal["linf", "l2"] = "linf"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 autocast (checked against fp32 on a subset); auto: bf16 on CUDA, fp32 on CPU",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the attacked model (auto: on CUDA only; falls back to eager)"
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the attacks")
    checks: bool = True


class AuditCreated(BaseModel):
    id: str
    status: JobStatus
    model: str
    estimated_work: float
    links: dict[str, str]


def _spec(
    req: AuditRequest, train_eps: float, input_size: int, caps: Capabilities | None = None
) -> AuditSpec:
    gradients = caps is None or caps.gradients
    try:
        if req.attacks is None:
            suite = default_attacks(req.norm, gradients=gradients)
        else:
            suite = build_attacks([(a.name, dict(a.params)) for a in req.attacks], req.norm)
    except AttackError as exc:
        raise InvalidInput(f"attacks: {exc}") from None
    try:  # a black-box model: white-box attacks refused, naming the query attacks that run
        require_queries_only(suite, gradients=gradients, why=caps.why_no_gradients if caps else "")
    except AttackError as exc:
        raise CapabilityMissing(f"attacks: {exc}", code="black_box_model") from None
    eps = req.eps if req.eps is not None else default_eps(train_eps)
    top = 1.0 if req.norm == "linf" else math.sqrt(input_size)
    for i, e in enumerate(eps):
        if not math.isfinite(e) or e < 0 or e > top:
            raise InvalidInput(f"eps[{i}] = {e} is outside [0, {top:g}] for {req.norm} on [0, 1] images")
    return AuditSpec(
        eps=sorted(set(eps)),
        suite=suite,
        precision=req.precision,
        compile=req.compile,
        seed=req.seed,
        checks=req.checks,
    )


def _check_dataset(name: str, card: ModelCard) -> None:
    """``data.dataset``: a named dataset of the model's input shape, or the model's own image folder
    (its test split is read with the card's size, channels and classes). Other folders are not read
    on an HTTP request's say-so: ``erc audit --dataset folder:DIR`` audits them."""
    if is_folder(name):
        if canonical_name(name) != card.dataset:
            raise InvalidInput(
                f"data.dataset: {name} is not this model's image folder ({card.dataset}); audit other "
                "folders with erc audit MODEL --dataset folder:DIR"
            )
        return
    try:
        shape = dataset_info(name).shape
    except KeyError as exc:  # unknown dataset: the message lists the known ones
        raise InvalidInput(f"data.dataset: {exc.args[0]}") from None
    if shape != tuple(card.input_shape):
        raise InvalidInput(f"dataset {name} has shape {shape}, the model takes {tuple(card.input_shape)}")


@router.post(
    "/audits",
    status_code=202,
    response_model=AuditCreated,
    responses=error_responses(400, 401, 404, 409, 413, 422, 503),
    summary="Start a robustness audit",
)
async def create_audit(req: AuditRequest, request: Request) -> Response:
    settings = settings_of(request)
    served = registry(request).get(req.model)
    assert served.card is not None and served.engine is not None
    card = served.card
    c, h, w = card.input_shape
    spec = _spec(req, card.train_eps, c * h * w, served.engine.capabilities)
    manager = audits(request)
    audit_id = manager.new_id()
    upload: bytes | None = None
    if req.data.source == "upload":
        if not req.data.instances or req.data.labels is None:
            raise InvalidInput("data.source=upload needs data.instances and data.labels")
        if len(req.data.instances) != len(req.data.labels):
            raise InvalidInput(f"{len(req.data.instances)} instances but {len(req.data.labels)} labels")
        n = len(req.data.labels)
        if n > settings.audit_max_n:
            raise LimitExceeded(f"{n} samples; the audit limit is {settings.audit_max_n}")
        bad = [v for v in req.data.labels if not 0 <= v < len(card.label_names)]
        if bad:
            raise InvalidInput(f"labels must lie in [0, {len(card.label_names)}); got {bad[:5]}")
        names = [f"data.instances[{i}]" for i in range(n)]
        payload = ImagePayload(
            [b64decode(inst.b64, nm + ".b64") for inst, nm in zip(req.data.instances, names, strict=True)],
            names,
        )
        x, _ = decode_all(payload, served.engine.spec, settings.max_image_pixels)
        # The decoded images (uint8 pixels) travel with the audit in the store: a worker on another
        # host runs it.
        buf = io.BytesIO()
        np.savez_compressed(buf, x=x.numpy(), y=np.asarray(req.data.labels, dtype=np.int64))
        upload = buf.getvalue()
    else:
        n = min(req.data.n, settings.audit_max_n)
        if req.data.n > settings.audit_max_n:
            raise LimitExceeded(f"data.n = {req.data.n}; the audit limit is {settings.audit_max_n}")
        if req.data.dataset:
            _check_dataset(req.data.dataset, card)
    work = spec.work(n) + checks_cost(spec, n)
    if work > settings.audit_max_work:
        raise LimitExceeded(
            f"this audit costs {work:.3g} forward-backward passes (samples x eps levels x attack steps); "
            f"the limit is {settings.audit_max_work:.3g} (ERC_AUDIT_MAX_WORK): fewer samples, eps levels "
            "or steps"
        )
    request_record = req.model_dump(exclude={"data": {"instances"}})
    request_record["data"]["n"] = n
    # What any worker needs to run it; where and how (device, threads, priority) is the worker's.
    job: dict[str, Any] = {
        "weights_sha256": card.weights_sha256,
        "entry": served.entry,  # the store directory of the version served (the repository's versions)
        "data": {"source": req.data.source, "dataset": req.data.dataset, "n": n, "seed": req.data.seed},
        "spec": spec.to_dict(),
        "request": request_record,
        "work": work,
    }
    body = await run_in_threadpool(manager.submit, audit_id, req.model, job, upload)
    return json_response(
        {k: body[k] for k in ("id", "status", "model", "estimated_work", "links")},
        status=202,
        headers={"Location": f"/admin/audits/{audit_id}"},
    )


async def _audit(request: Request, audit_id: str) -> dict[str, Any]:
    audit = await run_in_threadpool(audits(request).get, audit_id)
    if audit is None:
        raise NotFound(f"no audit {audit_id!r}", code="audit_not_found")
    return audit


class AuditStatuses(BaseModel):
    """The audit states, grouped by what a client may do with an audit in them."""

    all: list[JobStatus]
    active: list[JobStatus] = Field(description="a worker runs it: progress and time left")
    pending: list[JobStatus] = Field(description="it may still change: poll again")
    finished: list[JobStatus] = Field(description="it will not change any more")
    cancellable: list[JobStatus] = Field(description="DELETE /admin/audits/{id} cancels it")
    with_report: list[JobStatus] = Field(description="GET /admin/audits/{id}/report has its report")


class AuditStatus(BaseModel):
    id: str
    model: str
    status: JobStatus
    progress: dict[str, Any] | None = None
    error: str | None = None
    links: dict[str, str]


class AuditList(BaseModel):
    audits: list[AuditStatus] = Field(description="the newest first (more fields than listed here)")
    statuses: AuditStatuses


@router.get(
    "/audits",
    response_model=AuditList,
    responses=error_responses(401, 404, 503),
    summary="Recent audits, newest first, and what each status allows",
)
async def list_audits(request: Request) -> Response:
    recent = await run_in_threadpool(audits(request).list)
    return json_response({"audits": recent, "statuses": status_groups()})


@router.get(
    "/audits/{audit_id}",
    responses=error_responses(401, 404, 503),
    summary="Status, progress, and when done the full result",
)
async def get_audit(audit_id: str, request: Request) -> Response:
    body = await _audit(request, audit_id)
    if body["status"] in WITH_REPORT:
        result, _ = await run_in_threadpool(audits(request).result, audit_id)
        body["result"] = json.loads(result) if result else None
    return json_response(body)


@router.get(
    "/audits/{audit_id}/report",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}}, **json_error_responses(401, 404, 409, 503)},
    summary="Self-contained HTML report of a finished audit",
)
async def audit_report(audit_id: str, request: Request) -> Response:
    audit = await _audit(request, audit_id)
    if audit["status"] not in WITH_REPORT:
        raise Conflict(f"audit {audit_id} is {audit['status']}; the report exists once it is done")
    _, html = await run_in_threadpool(audits(request).result, audit_id)
    if html is None:  # deleted between the two reads (ERC_AUDIT_KEEP)
        raise NotFound(f"no audit {audit_id!r}", code="audit_not_found")
    headers = {"Content-Security-Policy": report_csp(), "X-Content-Type-Options": "nosniff"}
    return HTMLResponse(html, headers=headers)


@router.delete("/audits/{audit_id}", responses=error_responses(401, 404, 409, 503), summary="Cancel an audit")
async def cancel_audit(audit_id: str, request: Request) -> Response:
    audit = await run_in_threadpool(audits(request).cancel, audit_id)
    if audit is None:
        raise NotFound(f"no audit {audit_id!r}", code="audit_not_found")
    return json_response(audit)
