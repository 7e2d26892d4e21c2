"""Adversarial attacks as plain functions over a model (torch only; shared by training and service).

Every attack keeps the contract described in :mod:`training.attacks.pgd` and declares itself once
in its own module (:class:`~training.attacks.catalog.AttackDef`); importing this package imports
every module in it, so the registry is complete and a new attack is one file plus its tests.
Build attacks with :func:`build_attack` (or :func:`build_attacks` for requests that may name a
preset such as ``autoattack``).
"""

from __future__ import annotations

import importlib
import pkgutil

from training.attacks.catalog import (
    ATTACKS,
    PRESETS,
    Attack,
    AttackDef,
    AttackError,
    Model,
    Preset,
    Suite,
    build_attack,
    build_attacks,
    default_attacks,
    get_attack_def,
    list_attacks,
    list_presets,
    require_queries_only,
)

# Every module of the package registers what it defines (catalog and steps define no attack).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from training.attacks.apgd import apgd, apgd_checkpoints, apgd_targeted, dlr_loss, dlr_targeted_loss  # noqa: E402
from training.attacks.cw import cw_l2, rms_to_l2  # noqa: E402
from training.attacks.fab import fab_targeted, project_linf  # noqa: E402
from training.attacks.pgd import fgsm, margin_loss, pgd  # noqa: E402
from training.attacks.square import square_linf  # noqa: E402
from training.attacks.steps import L2Step, LinfStep, get_step, per_sample  # noqa: E402

__all__ = [
    "ATTACKS",
    "PRESETS",
    "Attack",
    "AttackDef",
    "AttackError",
    "L2Step",
    "LinfStep",
    "Model",
    "Preset",
    "Suite",
    "apgd",
    "apgd_checkpoints",
    "apgd_targeted",
    "build_attack",
    "build_attacks",
    "cw_l2",
    "default_attacks",
    "dlr_loss",
    "dlr_targeted_loss",
    "fab_targeted",
    "fgsm",
    "get_attack_def",
    "get_step",
    "list_attacks",
    "list_presets",
    "margin_loss",
    "per_sample",
    "pgd",
    "project_linf",
    "require_queries_only",
    "rms_to_l2",
    "square_linf",
]
