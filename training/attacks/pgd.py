"""Projected gradient descent (Madry et al., 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks") and FGSM (Goodfellow et al., 2015) as plain functions.

Contract shared by every attack in this package:

- ``model`` maps images ``[N, C, H, W]`` in [0, 1] to logits ``[N, classes]``;
- the attack returns adversarial images of ``x``'s shape, inside the eps ball and in [0, 1];
- the model's mode (train/eval) is never changed and no gradient is left on its parameters
  (gradients come from ``torch.autograd.grad`` with respect to the input only);
- ``eps`` may be a float or a tensor ``[N]`` of per-sample radii.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from training.attacks.catalog import AttackDef, Model, register
from training.attacks.steps import Radius, get_step, per_sample


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` per sample (positive once misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return other - true


def _loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample losses summed, so each sample's input gradient does not depend on the batch size."""
    if name == "ce":
        return F.cross_entropy(logits.float(), y, reduction="sum")
    if name == "margin":
        return margin_loss(logits.float(), y).sum()
    raise ValueError(f"unknown attack loss {name!r}; known: ce, margin")


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Radius,
    alpha: Radius | None = None,
    steps: int = 40,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    loss: str = "ce",
    keep_best: bool = True,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted PGD in the ``norm`` ball of radius ``eps`` around ``x``.

    Args:
        model: images in [0, 1] -> logits.
        x: clean images ``[N, C, H, W]`` in [0, 1].
        y: true labels ``[N]`` (int64).
        eps: radius, float or ``[N]``.
        alpha: step size; default ``2.5 * eps / steps`` (Madry et al.), the same for l_2.
        steps: gradient steps per restart.
        norm: ``"linf"`` or ``"l2"``.
        restarts: independent runs; a sample counts as robust only if every restart fails, and
            the returned image is the first one found that fools the model.
        random_start: start uniformly inside the ball (else at ``x``).
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (CW margin).
        keep_best: return, per sample, the first iterate that was misclassified (a stronger
            evaluation); ``False`` returns each restart's last iterate, as the original PGD and
            torchattacks do.
        early_stop: with ``keep_best``, stop attacking a sample once it is fooled (its result
            is decided; AutoAttack does the same): identical outcome, less work on weak models.
        generator: RNG for the random starts (reproducible attacks).

    Returns:
        Adversarial images ``[N, C, H, W]``, detached.
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    step = get_step(norm)
    x = x.detach()
    y = y.detach()
    eps_t = per_sample(eps, x)
    alpha_t = per_sample(alpha, x) if alpha is not None else 2.5 * eps_t / max(steps, 1)

    best = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    every = torch.arange(x.shape[0], device=x.device)

    def record(rows: torch.Tensor, candidate: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Keep ``candidate`` for the samples ``rows`` it fools that nothing fooled before; returns
        the mask (over ``rows``) of those it fools."""
        hit = logits.argmax(dim=1) != y[rows]
        new = hit & ~fooled[rows]
        best[rows[new]] = candidate[new]
        fooled[rows[hit]] = True
        return hit

    prune = keep_best and early_stop
    for r in range(restarts):
        # With keep_best, a sample fooled once is decided: later steps and restarts skip it.
        rows = (~fooled).nonzero().squeeze(1) if prune else every
        if len(rows) == 0:
            break
        x0, y0, e0, a0 = x[rows], y[rows], eps_t[rows], alpha_t[rows]
        x_adv = step.random_start(x0, e0, generator) if random_start else x0.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            (grad,) = torch.autograd.grad(_loss(loss, logits, y0), x_adv)
            with torch.no_grad():
                x_adv = x_adv.detach()
                if keep_best:
                    hit = record(rows, x_adv, logits)
                    if prune and bool(hit.any()):
                        keep = ~hit
                        rows, x0, y0, e0, a0 = rows[keep], x0[keep], y0[keep], e0[keep], a0[keep]
                        x_adv, grad = x_adv[keep], grad[keep]
                        if len(rows) == 0:
                            break
                x_adv = step.project(step.step(x_adv, grad, a0), x0, e0)
        if len(rows) == 0:
            continue
        with torch.no_grad():
            record(rows, x_adv, model(x_adv))
            if r == restarts - 1:
                # Never fooled: the last restart's final iterate (a valid point of the ball) stands.
                never = ~fooled[rows]
                best[rows[never]] = x_adv[never]
    return best.detach()


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: Radius, loss: str = "ce") -> torch.Tensor:
    """Fast gradient sign method: one l_inf step of size eps from the clean image."""
    return pgd(model, x, y, eps=eps, alpha=eps, steps=1, random_start=False, loss=loss, keep_best=False)


def _pgd_label(p: dict[str, object]) -> str:
    loss = "" if p["loss"] == "ce" else f"{str(p['loss']).upper()}-"
    restarts = f"x{p['restarts']}" if p["restarts"] != 1 else ""
    last = " last-iterate" if not p["keep_best"] else ""
    return f"PGD-{loss}{p['steps']}{restarts}{last}"


PGD = register(
    AttackDef(
        name="pgd",
        fn=pgd,
        norms=("linf", "l2"),
        defaults={"steps": 40, "restarts": 1, "loss": "ce", "keep_best": True},
        label=_pgd_label,
        cost=lambda p: p["steps"] * p["restarts"],
        description="projected gradient descent (Madry et al. 2018), random start, step 2.5*eps/steps",
        choices={"loss": ("ce", "margin")},
    )
)
FGSM = register(
    AttackDef(
        name="fgsm",
        fn=fgsm,
        norms=("linf",),
        defaults={},
        label=lambda p: "FGSM",
        cost=lambda p: 1.0,
        iterative=False,
        description="fast gradient sign method (Goodfellow et al. 2015): one sign step of size eps",
        choices={"loss": ("ce", "margin")},
    )
)
