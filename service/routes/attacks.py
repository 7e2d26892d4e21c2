"""``GET /v1/attacks``: the attack registry as clients see it (read-only, no token): every attack a
request may name (``POST /admin/audits``, ``erc audit --attack``), its norms, parameters with
their defaults and allowed values, the presets and the default suite per norm. The console builds
its attack list from it. Built once from :func:`training.attacks.catalog.catalog`."""

from __future__ import annotations

from functools import cache
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.responses import Response

from service.http import json_response

router = APIRouter(tags=["v1"])


class AttackCatalog(BaseModel):
    norms: list[str]
    attacks: list[dict[str, Any]] = Field(
        description="name, label (with its defaults), description, norms, params (tunable, with their "
        "defaults), derived (tunable, by default derived from the others), choices (allowed values), "
        "gradient, iterative, minimum_norm"
    )
    presets: list[dict[str, Any]] = Field(description="name, label, description, norms, attacks (a cascade)")
    default: dict[str, dict[str, Any]] = Field(
        description="per norm: the suite an audit runs when it names no attack (label, attacks)"
    )


@cache
def _catalog() -> dict[str, Any]:
    from training.attacks.catalog import catalog

    return catalog()


@router.get("/v1/attacks", response_model=AttackCatalog, summary="The attacks and presets requests may name")
async def list_attacks() -> Response:
    return json_response(_catalog())
