"""The Fast Adaptive Boundary attack, targeted, for l_inf (Croce & Hein, 2020, "Minimally distorted
adversarial examples with a fast adaptive boundary attack", ICML 2020).

FAB searches the *smallest* perturbation that changes the prediction. At each iterate ``x_i`` it
linearizes the decision function between the true class ``y`` and a target class ``t``,
``g(z) = f_t(z) - f_y(z) ~ g(x_i) + w . (z - x_i)``, and projects both ``x_i`` and the original
image ``x_0`` onto that hyperplane within the image box (:func:`project_linf`, the minimal l_inf
step). The next iterate is a convex combination of the two projected points, biased toward
the original one so that the perturbation stays small, with an overshoot ``eta``:

    x_{i+1} = clip_[0,1]( (1 - a) (x_i + eta d_i) + a (x_0 + eta d_0) ),
    a = min( ||d_i|| / (||d_i|| + ||d_0||), alpha_max ).

Whenever ``x_{i+1}`` is misclassified, it is recorded if it is the closest found so far and the
iterate moves back toward the original image, ``x_{i+1} <- x_0 + beta (x_{i+1} - x_0)``. The
paper's parameters are the defaults: ``alpha_max = 0.1``, ``eta = 1.05``, ``beta = 0.9``.

FAB-T (as in AutoAttack's standard suite) runs this with each of the clean images' most likely
other classes as the target in turn; success is any misclassification. The function keeps the
attack contract of :mod:`training.attacks.pgd`; as a minimum-norm attack, given ``eps`` it returns
the closest example found when it lies within ``eps`` and the clean image otherwise, and stops
refining a sample once an example within its ``eps`` is found (the verdict cannot change). With
``eps=None`` it returns the closest example found at any distance (the clean image if none).
"""

from __future__ import annotations

import torch

from training.attacks.catalog import AttackDef, Model, register
from training.attacks.steps import Radius, per_sample


def project_linf(p: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest l_inf step from each point onto its hyperplane, within the unit box.

    Solves ``min ||d||_inf`` subject to ``w . (p + d) + b = 0`` and ``0 <= p + d <= 1`` per row.
    Moving coordinate ``i`` by ``s_i r`` (``s_i`` the sign that moves ``w . (p + d)`` toward the
    hyperplane) changes it by ``|w_i| min(u_i, r)``, where ``u_i`` is the room left in the box; the
    total ``S(r) = sum_i |w_i| min(u_i, r)`` is piecewise linear in ``r``, so the smallest ``r`` with
    ``S(r) = |c|`` comes from one sort of the ``u_i``. When even the whole box cannot reach the
    hyperplane, every coordinate moves as far as the box allows (the closest the box gets to it).

    Args:
        p: points ``[N, D]`` in [0, 1].
        w: hyperplane normals ``[N, D]``.
        b: offsets ``[N]``.

    Returns:
        Steps ``d`` ``[N, D]`` (``p + d`` lies in the box).
    """
    c = -(w * p).sum(dim=1) - b  # w . d must equal c
    direction = torch.sign(w) * torch.where(c >= 0, 1.0, -1.0)[:, None]
    room = torch.where(direction > 0, 1.0 - p, p).clamp_min(0.0)
    weight = w.abs()
    target = c.abs()
    u, order = room.sort(dim=1)
    a = weight.gather(1, order)
    # For r in [u_{k-1}, u_k]: S(r) = prefix_k + r * suffix_k.
    prefix = torch.cumsum(a * u, dim=1) - a * u  # sum over j < k of a_j u_j
    suffix = a.flip(1).cumsum(1).flip(1)  # sum over j >= k of a_j
    at_breakpoints = prefix + u * suffix  # S(u_k), non-decreasing in k
    k = (at_breakpoints < target[:, None]).sum(dim=1, keepdim=True)
    feasible = k.squeeze(1) < u.shape[1]
    k = k.clamp(max=u.shape[1] - 1)
    r = (target - prefix.gather(1, k).squeeze(1)) / suffix.gather(1, k).squeeze(1).clamp_min(1e-12)
    r = torch.where(feasible, r, torch.full_like(r, float("inf")))
    return direction * torch.minimum(room, r[:, None])


def _linf(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).abs().amax(dim=1)


def fab_targeted(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Radius | None = None,
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Targeted l_inf FAB (FAB-T): the smallest perturbation found that misclassifies each image.

    Args:
        model: images in [0, 1] -> logits ``[N, K]``.
        x: clean images ``[N, C, H, W]`` in [0, 1].
        y: true labels ``[N]`` (int64).
        eps: radius, float or ``[N]`` (see the module docstring), or None for a pure minimum-norm
            search.
        steps: iterations per target and restart (one gradient and one extra forward pass each).
        n_target_classes: target classes tried in turn: the clean images' 2nd, 3rd, ... most likely
            (at most ``K - 1``); each target attacks only the samples not yet broken within eps.
        restarts: runs per target; the first starts at ``x``, later ones at a random point of the
            l_inf ball of half the best distance found so far (or of ``eps``), as in the paper.
        alpha_max: largest weight of the projection of the original image.
        eta: overshoot of the projection step (> 1 crosses the boundary).
        beta: backward step toward the original image after a success (< 1).
        generator: RNG of the random starts of restarts after the first.

    Returns:
        Images ``[N, C, H, W]`` in [0, 1], detached: the closest misclassified point found (within
        ``eps`` when given), else ``x``.
    """
    if steps < 1 or restarts < 1 or n_target_classes < 1:
        raise ValueError(
            f"need steps, restarts and n_target_classes >= 1, got {steps}, {restarts}, {n_target_classes}"
        )
    if not (0.0 <= alpha_max <= 1.0 and eta > 0 and 0.0 < beta < 1.0):
        raise ValueError(f"need alpha_max in [0, 1], eta > 0, beta in (0, 1); got {alpha_max}, {eta}, {beta}")
    x = x.detach()
    y = y.detach()
    n = x.shape[0]
    limit = (
        per_sample(eps, x).reshape(n) if eps is not None else torch.full((n,), float("inf"), device=x.device)
    )
    with torch.no_grad():
        logits0 = model(x).float()
    order = logits0.argsort(dim=1, descending=True)
    targets = min(n_target_classes, order.shape[1] - 1)

    best = x.clone()
    best_d = torch.full((n,), float("inf"), device=x.device)
    misclassified = logits0.argmax(dim=1) != y
    best_d[misclassified] = 0.0  # already adversarial at distance 0
    rows = torch.arange(n, device=x.device)
    for k in range(1, targets + 1):
        for r in range(restarts):
            # Still to attack: with eps, those not yet broken within it; without, every sample not
            # misclassified to begin with (the search refines the smallest distance over targets).
            act = rows[~misclassified] if eps is None else rows[best_d > limit]
            if act.numel() == 0:
                break
            x0, y0, t0 = x[act], y[act], order[act, k]
            xi = x0.clone()
            if r > 0:
                radius = torch.minimum(best_d[act], limit[act]).clamp(max=1.0).reshape(-1, 1, 1, 1)
                noise = torch.rand(x0.shape, dtype=x.dtype, device=x.device, generator=generator) * 2 - 1
                noise = noise / _linf(noise).clamp_min(1e-12).reshape(-1, 1, 1, 1)
                xi = (x0 + 0.5 * radius * noise).clamp(0.0, 1.0)
            for _ in range(steps):
                xi.requires_grad_(True)
                z = model(xi).float()
                g = z.gather(1, t0[:, None]).squeeze(1) - z.gather(1, y0[:, None]).squeeze(1)
                (w,) = torch.autograd.grad(g.sum(), xi)
                with torch.no_grad():
                    xi = xi.detach()
                    flat_w = w.flatten(1).float()
                    offset = g.detach() - (flat_w * xi.flatten(1)).sum(dim=1)
                    d = project_linf(
                        torch.cat([xi.flatten(1), x0.flatten(1)]), flat_w.repeat(2, 1), offset.repeat(2)
                    )
                    d_i, d_0 = d[: len(act)].view_as(xi), d[len(act) :].view_as(xi)
                    a_i, a_0 = _linf(d_i).clamp_min(1e-8), _linf(d_0).clamp_min(1e-8)
                    weight = (a_i / (a_i + a_0)).clamp(0.0, alpha_max).reshape(-1, 1, 1, 1)
                    xi = ((xi + eta * d_i) * (1 - weight) + (x0 + eta * d_0) * weight).clamp(0.0, 1.0)
                    hit = model(xi).argmax(dim=1) != y0
                    dist = _linf(xi - x0)
                    closer = hit & (dist < best_d[act])
                    best[act[closer]] = xi[closer]
                    best_d[act[closer]] = dist[closer]
                    xi = torch.where(hit.reshape(-1, 1, 1, 1), x0 + beta * (xi - x0), xi)
                    # A sample broken within its eps is decided: stop refining it (eps=None: never).
                    done = best_d[act] <= limit[act]
                    if eps is not None and bool(done.any()):
                        keep = ~done
                        act, x0, y0, t0, xi = act[keep], x0[keep], y0[keep], t0[keep], xi[keep]
                        if act.numel() == 0:
                            break
    found = torch.isfinite(best_d) & (best_d <= limit)
    return torch.where(found.reshape(-1, 1, 1, 1), best, x).detach()


FAB_T = register(
    AttackDef(
        name="fab-t",
        fn=fab_targeted,
        norms=("linf",),
        defaults={"steps": 100, "restarts": 1, "n_target_classes": 9},
        label=lambda p: (
            f"FAB-T{p['n_target_classes']}-{p['steps']}" + (f"x{p['restarts']}" if p["restarts"] != 1 else "")
        ),
        # per iteration: one forward-backward pass and one forward pass (a third)
        cost=lambda p: p["steps"] * p["restarts"] * p["n_target_classes"] * 4 / 3,
        minimum_norm=True,
        description="targeted Fast Adaptive Boundary attack (Croce & Hein 2020): minimal l_inf perturbation",
    )
)

__all__ = ["fab_targeted", "project_linf"]
