"""Carlini & Wagner's untargeted l_2 attack (2017, "Towards Evaluating the Robustness of Neural
Networks").

The attack searches the smallest l_2 perturbation that flips the prediction. The image is written
as ``x_adv = (tanh(w) + 1) / 2``, so it lies in [0, 1] for any ``w`` and Adam can optimize ``w``
without projections; the objective per sample is

    ||x_adv - x||_2^2 + c * max(z_y - max_{i != y} z_i, -kappa)

and a binary search over ``c`` (per sample) trades distance against success. The function keeps
the attack contract of :mod:`training.attacks.pgd`: it returns adversarial images, not distances
(the caller measures ``(x_adv - x).flatten(1).norm(dim=1)``), and a sample never fooled comes back
unchanged (distance 0).

Details the paper leaves open, as settled here: every round of the search restarts from ``x`` with a
fresh Adam; early abort looks at the whole batch's objective every ``steps // 10`` steps (so one
sample still improving keeps the round going); an example counts only when it is misclassified by
more than ``kappa``. The attack is deterministic.

Units: the ER-Classifier paper reports l_2 perturbations as a root mean square over the image's
values, ``||d||_2 / sqrt(C * H * W)``; :func:`rms_to_l2` converts such a radius to the plain l_2
radius that ``eps`` here (and every l_2 attack in this package) expects.
"""

from __future__ import annotations

import math

import torch

from training.attacks.catalog import AttackDef, Model, register
from training.attacks.pgd import margin_loss
from training.attacks.steps import Radius, per_sample

# x = 0 or 1 would need w = -inf or +inf: shrink the box slightly before atanh.
_TANH_MARGIN = 1e-6
# Abort the inner loop once the loss has improved by less than this fraction over a tenth of the steps.
_ABORT_REL = 1e-4


def rms_to_l2(rms: Radius, x: torch.Tensor) -> Radius:
    """A root-mean-square radius ``||d||_2 / sqrt(C * H * W)`` as an l_2 radius for images like ``x``.

    Args:
        rms: float or tensor ``[N]``.
        x: a batch ``[N, C, H, W]`` (only its per-sample size is used).

    Returns:
        ``rms * sqrt(C * H * W)``, of the same type as ``rms``.
    """
    return rms * math.sqrt(x[0].numel())


def _to_w(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``(tanh(w) + 1) / 2``, with [0, 1] shrunk by 1e-6 so the result stays finite."""
    return torch.atanh((2 * x - 1).clamp(-1 + _TANH_MARGIN, 1 - _TANH_MARGIN))


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).float().pow(2).sum(dim=1)


def cw_l2(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    c: float = 1e-2,
    binary_steps: int = 9,
    steps: int = 1000,
    lr: float = 0.01,
    kappa: float = 0.0,
    abort_early: bool = True,
    eps: Radius | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted Carlini-Wagner l_2 attack.

    Args:
        model: images in [0, 1] -> logits ``[N, K]``.
        x: clean images ``[N, C, H, W]`` in [0, 1].
        y: true labels ``[N]`` (int64).
        c: initial trade-off constant of every sample.
        binary_steps: rounds of the search over ``c``. After a round that found an adversarial
            example ``c`` is bisected downwards; after a failure it is multiplied by 10 until a
            first success, then bisected upwards.
        steps: Adam steps per round (each round restarts from ``x`` with a fresh optimizer).
        lr: Adam learning rate on ``w``.
        kappa: confidence: an example counts only when ``max_{i != y} z_i - z_y > kappa``.
        abort_early: end a round when the batch objective has improved by less than 0.01 % over
            the last ``steps // 10`` steps.
        eps: optional l_2 radius (float or ``[N]``): a sample whose smallest example lies farther
            than ``eps`` is returned unchanged, so "robust at eps" can be read off the output.
        generator: unused (the attack is deterministic); accepted for the shared attack signature.

    Returns:
        Images ``[N, C, H, W]`` in [0, 1], detached: per sample the adversarial example of smallest
        l_2 distance found over all rounds and steps, or ``x`` itself where none was found (or none
        within ``eps``).
    """
    del generator  # deterministic: starts from x, no random draws
    if binary_steps < 1 or steps < 1:
        raise ValueError(f"need binary_steps >= 1 and steps >= 1, got {binary_steps}, {steps}")
    if c <= 0 or kappa < 0:
        raise ValueError(f"need c > 0 and kappa >= 0, got c={c}, kappa={kappa}")
    x = x.detach()
    y = y.detach()
    n = x.shape[0]
    w0 = _to_w(x)

    const = torch.full((n,), c, dtype=torch.float32, device=x.device)
    lower = torch.zeros_like(const)
    upper = torch.full_like(const, math.inf)
    best_sq = torch.full_like(const, math.inf)
    best = x.clone()
    check_every = max(steps // 10, 1)

    for _ in range(binary_steps):
        # Each round starts again from x with fresh Adam moments, as in the paper's search.
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        prev = math.inf
        for i in range(steps):
            x_adv = (torch.tanh(w) + 1) / 2
            logits = model(x_adv)
            sq = _sq_dist(x_adv, x)
            # margin_loss is max_{i != y} z_i - z_y; f of the paper is max(-margin, -kappa).
            margin = margin_loss(logits.float(), y)
            objective = sq + const * torch.clamp(-margin, min=-kappa)
            total = objective.sum()
            (grad,) = torch.autograd.grad(total, w)
            with torch.no_grad():
                success = (margin > kappa) & (logits.argmax(dim=1) != y)
                found |= success
                closer = success & (sq < best_sq)
                best_sq = torch.where(closer, sq, best_sq)
                best[closer] = x_adv.detach()[closer]
            if abort_early and i % check_every == 0:
                value = float(total.detach())
                if math.isfinite(prev) and value > prev - _ABORT_REL * abs(prev):
                    break
                prev = value
            # The optimizer owns only w; its gradient is set by hand so nothing reaches the model.
            w.grad = grad
            opt.step()
            w.grad = None
        with torch.no_grad():
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            bounded = torch.isfinite(upper)
            const = torch.where(bounded, (lower + upper) / 2, const * 10)

    keep = torch.isfinite(best_sq)
    if eps is not None:
        radius = per_sample(eps, x).reshape(n).float()
        keep &= (best - x).flatten(1).float().norm(dim=1) <= radius
    return torch.where(keep.reshape(-1, *([1] * (x.ndim - 1))), best, x).detach()


CW = register(
    AttackDef(
        name="cw",
        fn=cw_l2,
        norms=("l2",),
        defaults={"steps": 100, "binary_steps": 5, "lr": 0.1},
        label=lambda p: f"CW-{p['binary_steps']}x{p['steps']}",
        cost=lambda p: p["steps"] * p["binary_steps"],
        iterative=False,
        minimum_norm=True,
        description="Carlini-Wagner l2 (2017): Adam in tanh space, binary search over c; smallest example",
    )
)

__all__ = ["cw_l2", "rms_to_l2"]
