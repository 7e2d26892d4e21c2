"""Auto-PGD (APGD) of Croce & Hein, 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks" (ICML 2020), Algorithm 1.

APGD is PGD without a step-size parameter: it starts with step ``eta = 2 * eps``, adds momentum to
every step, and at a few checkpoints halves the step (per sample) and jumps back to the best point
found so far whenever progress stalls. Losses: cross-entropy (APGD-CE) and the Difference of Logits
Ratio (APGD-DLR), which is invariant to shifting and rescaling the logits. APGD-T
(:func:`apgd_targeted`) runs the same algorithm on the targeted DLR loss against each of the
most likely other classes in turn, as AutoAttack's standard suite does.

The function follows the attack contract of :mod:`training.attacks.pgd` (ball and box, mode and
parameters untouched, per-sample ``eps``, ``generator`` for every random draw, losses in float32
under a caller's autocast, "keep best" over iterates and restarts).

Where this differs from the letter of Algorithm 1, and why:

- The checkpoint test runs right after ``f(x^(w_j))`` is known, so condition 1 counts exactly the
  ``w_j - w_{j-1}`` loss comparisons of its window; on a restart ``x^(w_j)`` becomes ``x_max`` and
  the gradient stored with ``x_max`` is reused (no extra pass). The paper's loop tests at ``k = w_j``
  after ``x^(w_j + 1)`` was formed, one iterate later.
- Condition 2 at the first checkpoint compares with ``f(x^(0))`` and "no halving at w_0", as the
  formula reads for ``w_0 = 0``.
- ``steps`` counts gradient evaluations; the last iterate gets one forward pass more.
- Restarts beyond the first only attack samples that no earlier run fooled (AutoAttack's practice).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.nn import functional as F

from training.attacks.catalog import AttackDef, Model, register
from training.attacks.steps import L2Step, LinfStep, Radius, get_step, per_sample

# Checkpoint schedule of the paper in hundredths, so that p_j stays exact: p_0 = 0, p_1 = 0.22,
# p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06). In floats 0.22 + 0.19 = 0.41000000000000003,
# whose ceil(p * 100) would wrongly be 42.
_P1, _DECAY, _MIN_GAP = 22, 3, 6


def apgd_checkpoints(steps: int) -> list[int]:
    """Checkpoints ``w_j = ceil(p_j * steps)`` of APGD, from ``w_0 = 0``, strictly increasing.

    Only checkpoints ``< steps`` are returned (a later one could not change any iterate); for a
    small ``steps`` two ``p_j`` can round to the same iteration and the duplicate is dropped.
    ``apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    marks = [0]
    prev, cur = 0, _P1
    while cur < 100:
        w = -(-cur * steps // 100)  # ceil of an exact integer ratio
        if marks[-1] < w < steps:
            marks.append(w)
        prev, cur = cur, cur + max(cur - prev - _DECAY, _MIN_GAP)
    return marks


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio per sample: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``.

    ``pi`` sorts the logits in decreasing order. Positive once misclassified; larger is stronger
    for the attacker. Needs at least 3 classes.

    Args:
        logits: ``[N, K]`` with ``K >= 3`` (computed in float32).
        y: true labels ``[N]``.

    Returns:
        ``[N]`` float32 losses.
    """
    z = logits.float()
    if z.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {z.shape[1]}")
    top = z.topk(3, dim=1).values
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(dim=1)
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR per sample: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``.

    Croce & Hein (2020), Section 3.2: the attacker raises the target's logit over the true one; the
    denominator (top logit minus the mean of the third and fourth) keeps the loss invariant to
    shifting and rescaling the logits. With 3 classes the denominator is ``z_pi1 - z_pi3`` (there
    is no fourth logit; the same invariances hold). With 2 classes no such denominator exists (it
    would make the loss a constant sign), so the loss is the plain margin ``-(z_y - z_t)``: the
    target is then the only other class and APGD-T is the margin-loss APGD.

    Args:
        logits: ``[N, K]`` with ``K >= 2`` (computed in float32).
        y: true labels ``[N]``; target: target labels ``[N]``.

    Returns:
        ``[N]`` float32 losses; positive once the target's logit exceeds the true one.
    """
    z = logits.float()
    true = z.gather(1, y[:, None]).squeeze(1)
    tgt = z.gather(1, target[:, None]).squeeze(1)
    if z.shape[1] == 2:
        return tgt - true
    if z.shape[1] < 2:
        raise ValueError(f"a targeted loss needs at least 2 classes, got {z.shape[1]}")
    top = z.sort(dim=1, descending=True).values
    below = 0.5 * (top[:, 2] + top[:, 3]) if z.shape[1] >= 4 else top[:, 2]
    return -(true - tgt) / (top[:, 0] - below + 1e-12)


def _ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": _ce_loss, "dlr": dlr_loss}


def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))


def _start(
    step: LinfStep | L2Step, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator | None
) -> torch.Tensor:
    """Random start: uniform in the l_inf ball; for l_2 a Gaussian direction scaled onto the sphere of
    radius eps (the authors' choice for APGD-l2), then clipped to [0, 1] (which only moves it closer)."""
    if isinstance(step, LinfStep):
        return step.random_start(x, eps, gen)
    direction = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)
    return (x + eps * direction / _flat_norm(direction).clamp_min(1e-12)).clamp(0.0, 1.0)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample mask ``[N]`` as ``[N, 1, 1, 1]`` for ``torch.where`` over a batch like ``like``."""
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


class _RunResult(NamedTuple):
    """One APGD run over a sub-batch: the paper's output (x_max, f_max) plus the first fooling point."""

    x_max: torch.Tensor  # [n, C, H, W] highest-loss iterate
    f_max: torch.Tensor  # [n] its loss
    x_fool: torch.Tensor  # [n, C, H, W] first misclassified iterate (meaningful where fooled)
    fooled: torch.Tensor  # [n] bool


def _run(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: torch.Tensor,
    step: LinfStep | L2Step,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    rho: float,
    alpha: float,
    checkpoints: set[int],
    gen: torch.Generator | None,
) -> _RunResult:
    """Algorithm 1 on a batch, vectorized: every per-sample decision is a mask, never a Python branch.

    Iterates are indexed as in the paper: the loop body at ``k`` evaluates ``f(x^(k))`` and its
    gradient (one forward/backward each), then builds ``x^(k+1)``; ``x^(steps)`` gets a final
    forward pass only. So ``steps`` is the number of gradient evaluations.
    """
    n = x.shape[0]
    eta = 2.0 * eps
    x_cur = _start(step, x, eps, gen)
    x_prev = x_cur
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    x_fool = x_cur.clone()
    # Filled at k = 0 (f(x^(0)) is the first f_max and the value "at checkpoint w_0").
    f_max = f_prev = f_max_last = torch.empty(0)
    x_max = g_max = torch.empty(0)
    n_up = torch.zeros(n, dtype=torch.long, device=x.device)  # loss increases since the last checkpoint
    reduced_last = torch.zeros(n, dtype=torch.bool, device=x.device)
    last_w = 0

    for k in range(steps + 1):
        if k < steps:
            x_cur.requires_grad_(True)
            logits = model(x_cur)
            f = loss_fn(logits, y)
            (grad,) = torch.autograd.grad(f.sum(), x_cur)
            x_cur = x_cur.detach()
        else:
            with torch.no_grad():
                logits = model(x_cur)
                f = loss_fn(logits, y)
        with torch.no_grad():
            f = f.detach()
            hit = (logits.argmax(dim=1) != y) & ~fooled
            x_fool[hit] = x_cur[hit]
            fooled |= hit
            if k == 0:
                f_max, f_max_last, x_max, g_max = f.clone(), f.clone(), x_cur.clone(), grad.clone()
            else:
                n_up += f > f_prev
                better = f > f_max
                f_max = torch.where(better, f, f_max)
                x_max[better] = x_cur[better]
                if k < steps:
                    g_max[better] = grad[better]
            f_prev = f
            if k == steps:
                break

            if k in checkpoints:
                # Condition 1: fewer than rho * (w_j - w_{j-1}) of the steps since the last checkpoint
                # increased the loss. Condition 2: the step was not halved at the last checkpoint and
                # f_max has not improved since (f_max never decreases, so equality means no gain).
                cond1 = n_up < rho * (k - last_w)
                cond2 = ~reduced_last & (f_max == f_max_last)
                reduce = cond1 | cond2
                eta = torch.where(_rows(reduce, x), eta / 2, eta)
                # Restart from x_max; its stored gradient saves a forward/backward pass.
                x_cur = torch.where(_rows(reduce, x), x_max, x_cur)
                grad = torch.where(_rows(reduce, x), g_max, grad)
                f_prev = torch.where(reduce, f_max, f_prev)
                reduced_last = reduce
                f_max_last = f_max.clone()
                n_up.zero_()
                last_w = k

            z = step.project(step.step(x_cur, grad, eta), x, eps)
            if k == 0:
                x_next = z  # x^(1): a plain projected step, there is no x^(-1) for momentum
            else:
                x_next = step.project(x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - x_prev), x, eps)
            x_prev, x_cur = x_cur, x_next
    return _RunResult(x_max, f_max, x_fool, fooled)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _runs(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Radius,
    norm: str,
    steps: int,
    rho: float,
    alpha: float,
    losses: list[Callable[[torch.Tensor], LossFn]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One :func:`_run` per entry of ``losses`` (restarts, targets), each only on the samples no
    earlier run fooled (AutoAttack's practice), with the loss that entry builds for those rows.

    Returns per sample the first misclassified iterate found, else the point of highest loss.
    """
    step = get_step(norm)
    eps_t = per_sample(eps, x)
    checkpoints = set(apgd_checkpoints(steps)[1:])
    out = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
    for loss_for in losses:
        idx = (~fooled).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        res = _run(
            model, x[idx], y[idx], eps_t[idx], step, loss_for(idx), steps, rho, alpha, checkpoints, generator
        )
        with torch.no_grad():
            out[idx[res.fooled]] = res.x_fool[res.fooled]
            fooled[idx[res.fooled]] = True
            keep = ~res.fooled & (res.f_max > best_loss[idx])
            out[idx[keep]] = res.x_max[keep]
            best_loss[idx[keep]] = res.f_max[keep]
    return out.detach()


def apgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Radius,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce",
    rho: float = 0.75,
    alpha: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted APGD (Croce & Hein, 2020, Algorithm 1) in the ``norm`` ball of radius ``eps``.

    Args:
        model: images in [0, 1] -> logits ``[N, K]``.
        x: clean images ``[N, C, H, W]`` in [0, 1].
        y: true labels ``[N]`` (int64).
        eps: radius, float or ``[N]``; the initial step size is ``2 * eps`` for both norms.
        norm: ``"linf"`` (sign steps) or ``"l2"`` (normalized-gradient steps).
        steps: gradient evaluations per restart (the paper's N_iter); checkpoints from
            :func:`apgd_checkpoints`.
        restarts: independent runs from random starts; restarts after the first only attack the
            samples no earlier run has fooled (as AutoAttack does), so they never weaken the result.
        loss: ``"ce"`` (cross-entropy) or ``"dlr"`` (Difference of Logits Ratio, needs >= 3 classes).
        rho: condition-1 threshold: the step is halved when fewer than this fraction of the steps
            since the last checkpoint increased the loss.
        alpha: momentum weight of the new step (``1 - alpha`` goes to the previous displacement).
        generator: RNG for the random starts (reproducible attacks).

    Returns:
        Adversarial images ``[N, C, H, W]`` in [0, 1], within ``eps`` of ``x``, detached: per sample
        the first iterate (over all iterates and restarts) that the model misclassifies; for a sample
        never fooled, the point of highest loss over all restarts (Algorithm 1's ``x_max``).
    """
    if steps < 1 or restarts < 1:
        raise ValueError(f"need steps >= 1 and restarts >= 1, got steps={steps}, restarts={restarts}")
    if not (0.0 < rho <= 1.0 and 0.0 < alpha <= 1.0):
        raise ValueError(f"need rho and alpha in (0, 1], got rho={rho}, alpha={alpha}")
    try:
        loss_fn = LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown APGD loss {loss!r}; known: {', '.join(sorted(LOSSES))}") from None
    x = x.detach()
    return _runs(
        model, x, y.detach(), eps, norm, steps, rho, alpha, [lambda idx: loss_fn] * restarts, generator
    )


def apgd_targeted(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Radius,
    norm: str = "linf",
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    rho: float = 0.75,
    alpha: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """APGD-T (Croce & Hein, 2020): APGD on the targeted DLR loss, once per target class.

    The targets are the clean images' most likely classes after the top one (the 2nd, 3rd, ...,
    ``n_target_classes + 1``-th logit), as in AutoAttack; each target's run (``restarts`` times
    ``steps`` gradient evaluations, the step-size schedule and checkpoints of :func:`apgd`) attacks
    only the samples no earlier target fooled. Success is any misclassification, not the target.

    Args:
        model, x, y, eps, norm, steps, restarts, rho, alpha, generator: as in :func:`apgd`.
        n_target_classes: how many target classes to try in turn (at most ``K - 1``).

    Returns:
        Adversarial images ``[N, C, H, W]`` in the ball and [0, 1], detached: per sample the first
        misclassified iterate found, else the point of highest targeted-DLR loss over all targets.
    """
    if steps < 1 or restarts < 1 or n_target_classes < 1:
        raise ValueError(
            f"need steps, restarts and n_target_classes >= 1, got {steps}, {restarts}, {n_target_classes}"
        )
    if not (0.0 < rho <= 1.0 and 0.0 < alpha <= 1.0):
        raise ValueError(f"need rho and alpha in (0, 1], got rho={rho}, alpha={alpha}")
    x = x.detach()
    with torch.no_grad():
        order = model(x).float().argsort(dim=1, descending=True)
    targets = order[:, 1 : min(n_target_classes, order.shape[1] - 1) + 1]

    def targeted(k: int) -> Callable[[torch.Tensor], LossFn]:
        """The targeted DLR loss against the k-th most likely other class, for the samples ``idx``."""

        def for_rows(idx: torch.Tensor) -> LossFn:
            t = targets[idx, k]
            return lambda logits, yy: dlr_targeted_loss(logits, yy, t)

        return for_rows

    losses = [targeted(k) for k in range(targets.shape[1]) for _ in range(restarts)]
    return _runs(model, x, y.detach(), eps, norm, steps, rho, alpha, losses, generator)


def _restarts(p: dict[str, object]) -> str:
    return f"x{p['restarts']}" if p["restarts"] != 1 else ""


APGD = register(
    AttackDef(
        name="apgd",
        fn=apgd,
        norms=("linf", "l2"),
        defaults={"steps": 100, "restarts": 1, "loss": "ce"},
        label=lambda p: f"APGD-{str(p['loss']).upper()}-{p['steps']}{_restarts(p)}",
        cost=lambda p: p["steps"] * p["restarts"],
        description="Auto-PGD (Croce & Hein 2020): momentum, step 2 eps halved at checkpoints; CE or DLR",
        choices={"loss": tuple(LOSSES)},
    )
)
APGD_T = register(
    AttackDef(
        name="apgd-t",
        fn=apgd_targeted,
        norms=("linf", "l2"),
        defaults={"steps": 100, "restarts": 1, "n_target_classes": 9},
        label=lambda p: f"APGD-T{p['n_target_classes']}-{p['steps']}{_restarts(p)}",
        cost=lambda p: p["steps"] * p["restarts"] * p["n_target_classes"],
        description="targeted APGD on the targeted DLR loss, the most likely other classes in turn",
    )
)

__all__ = ["LOSSES", "apgd", "apgd_checkpoints", "apgd_targeted", "dlr_loss", "dlr_targeted_loss"]
