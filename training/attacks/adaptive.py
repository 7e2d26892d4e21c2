"""An adaptive attack on the embedding-typicality detector (:mod:`training.typicality`): l_inf PGD
that misclassifies while keeping the embedding typical, the attack that knows the detector
(Carlini & Wagner 2017, "Adversarial examples are not easily detected"; Tramer et al. 2020).

It maximises ``CE(C(Q(x')), y) - lam * mahalanobis(Q(x'))`` with the project's l_inf step (random
start, step ``2.5 eps / steps``, projection) and returns the last iterate. It needs the model's
embedding (``forward_features`` / ``forward_head``) and the fitted score, so it is registered with
``needs=("typicality",)``: code that holds a typicality builds it
(``build_attack("adaptive-pgd", params, typicality=typ)``); requests cannot name it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from training.attacks.catalog import AttackDef, register
from training.attacks.steps import LinfStep, Radius, per_sample


def adaptive_pgd(
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Radius,
    typicality: Any,
    steps: int = 40,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """l_inf PGD against classifier and detector together.

    Args:
        model: an :class:`~training.models.EmbeddingClassifier` (images in [0, 1] ->
            ``forward_features`` -> ``forward_head`` logits).
        x: clean images ``[N, C, H, W]`` in [0, 1]; y: true labels ``[N]``.
        eps: radius, float or ``[N]``.
        typicality: a fitted :class:`~training.typicality.Typicality` (its differentiable
            ``mahalanobis_torch``).
        steps: gradient steps; lam: weight of the detector term.
        generator: RNG of the random start.

    Returns:
        The last iterate ``[N, C, H, W]``, in the ball and [0, 1], detached.
    """
    if steps < 1:
        raise ValueError(f"need steps >= 1, got {steps}")
    step = LinfStep()
    x = x.detach()
    eps_t = per_sample(eps, x)
    alpha = 2.5 * eps_t / steps
    x_adv = step.random_start(x, eps_t, generator).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        z = model.forward_features(x_adv)
        logits = model.forward_head(z)
        loss = (
            F.cross_entropy(logits.float(), y, reduction="sum")
            - lam * typicality.mahalanobis_torch(z.float()).sum()
        )
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = step.project(step.step(x_adv.detach(), grad, alpha), x, eps_t)
    return x_adv.detach()


ADAPTIVE_PGD = register(
    AttackDef(
        name="adaptive-pgd",
        fn=adaptive_pgd,
        norms=("linf",),
        defaults={"steps": 40, "lam": 1.0},
        label=lambda p: f"AdaptivePGD-{p['steps']}-lam{p['lam']:g}",
        cost=lambda p: p["steps"],
        description="PGD on CE minus lam x Mahalanobis distance: evades the typicality detector",
        needs=("typicality",),
    )
)

__all__ = ["adaptive_pgd"]
