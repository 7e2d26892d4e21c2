"""Carlini-Wagner l_2: near-minimal distances against the exact answer of a linear model, examples
that count are misclassified, the optional eps radius, box, per-sample eps and determinism (untouched
mode: test_attack_contract.py), and the RMS-to-l_2 conversion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.attacks import ATTACKS, cw_l2, fgsm, rms_to_l2
from training.attacks.pgd import margin_loss


def _two_class_linear() -> tuple[torch.Tensor, torch.Tensor, nn.Module, torch.Tensor]:
    """A 2-class linear model on 1x4x4 images, points well inside [0, 1] labelled by the model, and
    each point's exact l_2 distance to the decision boundary, ``|w.x + b| / ||w||`` for the logit
    difference. The boundary points lie inside the box too, so the box never binds."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 16, generator=gen))
        model[1].bias.zero_()
    x = 0.5 + 0.15 * (2 * torch.rand(400, 1, 4, 4, generator=gen) - 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    w = model[1].weight[1] - model[1].weight[0]
    b = model[1].bias[1] - model[1].bias[0]
    d_min = ((x.flatten(1) @ w + b).abs() / w.norm()).detach()
    # Keep points whose boundary point moves no pixel by more than 0.3 (it stays in [0.05, 0.95]).
    shift = d_min * (w.abs().max() / w.norm())
    keep = (d_min > 0.05) & (shift < 0.3)
    x, y, d_min = x[keep][:24], y[keep][:24], d_min[keep][:24]
    assert len(x) == 24
    return x, y, model.eval(), d_min


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def test_registered() -> None:
    assert ATTACKS["cw"].fn is cw_l2


def test_distances_are_near_the_exact_minimum_of_a_linear_model() -> None:
    x, y, model, d_min = _two_class_linear()
    x_adv = cw_l2(model, x, y, steps=100, binary_steps=8)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all(), "every sample of a linear model can be flipped"
    dist = _l2(x_adv, x)
    # No misclassified point can be closer than the boundary; CW should land just beyond it.
    assert (dist >= d_min * (1 - 1e-4)).all()
    assert (dist <= 1.1 * d_min).all(), (dist / d_min).max()


def test_kappa_demands_a_confident_margin() -> None:
    x, y, model, _ = _two_class_linear()
    x_adv = cw_l2(model, x, y, steps=100, binary_steps=6, kappa=1.0)
    changed = (x_adv != x).flatten(1).any(1)
    assert changed.all()
    with torch.no_grad():
        assert (margin_loss(model(x_adv), y)[changed] > 1.0).all()


def test_eps_returns_only_examples_within_the_radius() -> None:
    x, y, model, d_min = _two_class_linear()
    radius = d_min * torch.where(torch.arange(len(x)) % 2 == 0, 0.5, 1.5)
    radius[1] = 0.0
    x_adv = cw_l2(model, x, y, steps=100, binary_steps=6, eps=radius)
    dist = _l2(x_adv, x)
    assert (dist <= radius + 1e-6).all()
    # Below the boundary distance nothing exists: those samples come back unchanged, the others flip.
    inside = radius > d_min
    assert torch.equal(x_adv[~inside], x[~inside])
    assert torch.equal(x_adv[1], x[1]), "eps 0 leaves the image unchanged"
    with torch.no_grad():
        assert (model(x_adv[inside]).argmax(1) != y[inside]).all()
    with pytest.raises(ValueError, match="shape"):
        cw_l2(model, x, y, steps=2, binary_steps=1, eps=torch.ones(3))


def test_breaks_an_undefended_model_and_beats_fgsm_in_its_l2_ball(separable, robust) -> None:
    x, y, model = separable()
    assert robust(model, x, y) == 1.0
    # FGSM at l_inf 0.3 stays within l_2 0.3 * sqrt(36) = 1.8: CW at l_2 1.8 must do at least as well.
    robust_cw = robust(model, cw_l2(model, x, y, steps=100, binary_steps=5, lr=0.05, eps=1.8), y)
    assert robust_cw <= 0.1
    assert robust_cw <= robust(model, fgsm(model, x, y, eps=0.3), y)
    # A small radius leaves most predictions alone.
    assert robust(model, cw_l2(model, x, y, steps=100, binary_steps=5, lr=0.05, eps=0.05), y) >= 0.9


def test_box_unfooled_samples_and_determinism(tiny_cnn, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    kw = {"c": 1.0, "lr": 0.05, "steps": 20, "binary_steps": 3}
    a = cw_l2(model, x, y, **kw, generator=torch.Generator().manual_seed(0))
    b = cw_l2(model, x, y, **kw, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and not a.requires_grad
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b), "CW has no randomness: the generator does not change the result"
    with torch.no_grad():
        wrong = model(a).argmax(1) != y
    changed = (a != x).flatten(1).any(1)
    assert changed.any()
    assert (wrong[changed]).all(), "a changed image is an adversarial example"
    assert torch.equal(a[~changed], x[~changed])


def test_rms_to_l2() -> None:
    x = torch.zeros(2, 1, 28, 28)
    assert rms_to_l2(0.1, x) == pytest.approx(2.8)
    assert torch.allclose(torch.as_tensor(rms_to_l2(torch.tensor([0.0, 0.1]), x)), torch.tensor([0.0, 2.8]))
    d = torch.full((1, 3, 4, 4), 0.2)
    assert d.norm().item() == pytest.approx(rms_to_l2(0.2, d)), "a uniform 0.2 shift has RMS 0.2"
    assert math.isclose(rms_to_l2(1.0, torch.zeros(1, 3, 32, 32)), math.sqrt(3072))


def test_validation(tiny_cnn, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    with pytest.raises(ValueError, match="binary_steps"):
        cw_l2(model, x, y, binary_steps=0)
    with pytest.raises(ValueError, match="kappa"):
        cw_l2(model, x, y, steps=1, binary_steps=1, kappa=-1.0)


def test_runs_under_a_callers_autocast(tiny_cnn, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = cw_l2(model, x, y, c=1.0, lr=0.05, steps=10, binary_steps=2, eps=1.0)
    assert x_adv.dtype == torch.float32
    assert (_l2(x_adv, x) <= 1.0 + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
