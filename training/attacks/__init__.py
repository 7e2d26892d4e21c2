"""Adversarial attacks as plain functions over a model (torch only; shared by training and service).

``ATTACKS`` maps a name to its function; every attack follows the contract described in
:mod:`training.attacks.pgd`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from training.attacks.apgd import apgd, apgd_checkpoints, dlr_loss
from training.attacks.cw import cw_l2, rms_to_l2
from training.attacks.pgd import fgsm, margin_loss, pgd
from training.attacks.square import square_linf
from training.attacks.steps import L2Step, LinfStep, get_step, per_sample

ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "pgd": pgd,
    "fgsm": fgsm,
    "apgd": apgd,
    "cw": cw_l2,
    "square": square_linf,
}


def get_attack(name: str) -> Callable[..., Any]:
    try:
        return ATTACKS[name]
    except KeyError:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}") from None


__all__ = [
    "ATTACKS",
    "L2Step",
    "LinfStep",
    "apgd",
    "apgd_checkpoints",
    "cw_l2",
    "dlr_loss",
    "fgsm",
    "get_attack",
    "get_step",
    "margin_loss",
    "per_sample",
    "pgd",
    "rms_to_l2",
    "square_linf",
]
