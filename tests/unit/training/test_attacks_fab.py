"""FAB-T (targeted Fast Adaptive Boundary, l_inf): its projection onto a hyperplane within the image
box against a linear program, the exact minimal distance on linear models (closed form), the eps
contract of a minimum-norm attack, and parity with torchattacks' FAB on a trained CNN. (Ball, box,
per-sample eps, seeds and untouched mode: test_attack_contract.py, for every attack.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from training.attacks import ATTACKS, fab_targeted, project_linf


def _lp_radius(p: np.ndarray, w: np.ndarray, b: float) -> float | None:
    """min ||d||_inf s.t. w.(p + d) + b = 0, 0 <= p + d <= 1, by linear programming (None: infeasible).
    Variables [d_1..d_n, t]; minimise t with -t <= d_i <= t."""
    n = len(p)
    cost = np.r_[np.zeros(n), 1.0]
    a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
    res = linprog(
        cost,
        A_ub=a_ub,
        b_ub=np.zeros(2 * n),
        A_eq=np.r_[w, 0.0][None],
        b_eq=[-(w @ p) - b],
        bounds=[(-pi, 1 - pi) for pi in p] + [(0, None)],
    )
    return float(res.x[-1]) if res.status == 0 else None


def test_projection_is_the_minimal_linf_step_within_the_box() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(40, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    b = torch.randn(40, generator=gen, dtype=torch.float64) * 2
    d = project_linf(p, w, b)
    assert ((p + d) >= -1e-12).all() and ((p + d) <= 1 + 1e-12).all()
    feasible = 0
    for i in range(len(p)):
        radius = _lp_radius(p[i].numpy(), w[i].numpy(), float(b[i]))
        if radius is None:
            # Out of reach of the box: every coordinate goes as far as it can toward the plane.
            gap = float((w[i] @ (p[i] + d[i])) + b[i])
            assert abs(gap) > 0 and abs(gap) < abs(float(w[i] @ p[i] + b[i]))
            continue
        feasible += 1
        assert float((w[i] @ (p[i] + d[i])) + b[i]) == pytest.approx(0.0, abs=1e-9)
        assert float(d[i].abs().max()) == pytest.approx(radius, rel=1e-6, abs=1e-9)
    assert 10 <= feasible < len(p), "both cases should occur in this draw"


def _linear_problem(
    classes: int = 10, n: int = 50, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, classes)).eval()
    x = 0.35 + 0.3 * torch.rand(n, 1, 6, 6)  # far enough from 0 and 1 that the box does not bind
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _closed_form(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Minimal l_inf distance to misclassification of a linear model (without the box):
    min over j != y of (f_y - f_j) / ||w_y - w_j||_1."""
    weight = model[1].weight
    with torch.no_grad():
        f = model(x)
        best = torch.full((len(x),), float("inf"))
        for j in range(weight.shape[0]):
            gap = (f.gather(1, y[:, None]).squeeze(1) - f[:, j]) / (weight[y] - weight[j]).abs().sum(1)
            best = torch.where(y == j, best, torch.minimum(best, gap))
    return best


def test_finds_the_minimal_distance_of_a_linear_model() -> None:
    model, x, y = _linear_problem()
    exact = _closed_form(model, x, y)
    assert exact.max() < 0.3  # the box never binds
    adv = fab_targeted(model, x, y, eps=None, steps=100, n_target_classes=9)
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).all()
    found = (adv - x).flatten(1).abs().amax(1)
    ratio = found / exact
    # Never below the minimum (that would contradict the closed form); above it only by what the
    # overshoot eta = 1.05 and the backward step beta = 0.9 leave at their fixed point.
    assert (ratio >= 1 - 1e-4).all() and (ratio <= 1.01).all(), (ratio.min(), ratio.max())


def test_with_eps_only_what_lies_within_it_counts() -> None:
    model, x, y = _linear_problem(seed=1)
    exact = _closed_form(model, x, y)
    eps = float(exact.median())
    adv = fab_targeted(model, x, y, eps=eps, steps=100)
    dist = (adv - x).flatten(1).abs().amax(1)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert (dist <= eps + 1e-6).all()
    assert torch.equal(fooled, dist > 0)  # a sample not broken within eps comes back unchanged
    assert fooled[exact < 0.98 * eps].all() and not fooled[exact > eps].any()


def test_one_target_reaches_only_its_own_boundary() -> None:
    model, x, y = _linear_problem(seed=2)
    exact = _closed_form(model, x, y)
    one = fab_targeted(model, x, y, eps=None, steps=100, n_target_classes=1)
    all_targets = fab_targeted(model, x, y, eps=None, steps=100, n_target_classes=9)
    d_one = (one - x).flatten(1).abs().amax(1)
    d_all = (all_targets - x).flatten(1).abs().amax(1)
    assert (d_all <= d_one + 1e-6).all() and (d_all < d_one - 1e-3).any()
    assert (d_one >= exact * (1 - 1e-4)).all()


def test_registered_as_fab_t() -> None:
    d = ATTACKS["fab-t"]
    assert d.fn is fab_targeted and d.norms == ("linf",) and d.minimum_norm


def test_parity_with_torchattacks_fab(robust, mnist_cnn) -> None:
    import torchattacks

    model, x, y = mnist_cnn
    eps, steps = 0.1, 30
    ours = fab_targeted(model, x, y, eps=eps, steps=steps, n_target_classes=9)
    ref = torchattacks.FAB(
        model, norm="Linf", eps=eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=10, seed=0
    )(x, y)
    robust_ours, robust_ref = robust(model, ours, y), robust(model, ref, y)
    assert (ours - x).abs().max() <= eps + 1e-6
    n = len(y)
    assert abs(robust_ours - robust_ref) * n <= 0.015 * n + 1, (robust_ours, robust_ref)
    assert robust_ours < robust(model, x, y) - 0.1, "the attack must matter at this eps"
