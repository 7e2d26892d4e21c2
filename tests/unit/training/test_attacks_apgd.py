"""APGD (Croce & Hein, 2020): the paper's checkpoint schedule, ball, box and autocast (per-sample eps,
seeds and untouched mode: test_attack_contract.py), the DLR loss, and strength against PGD and
FGSM on undefended models."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from training.attacks import ATTACKS, apgd, apgd_checkpoints, dlr_loss, fgsm, get_step, pgd


def test_registered() -> None:
    assert ATTACKS["apgd"].fn is apgd


def test_checkpoints_follow_the_paper() -> None:
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    # The formula in exact arithmetic: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    for steps in (10, 37, 250, 1000):
        p = [Fraction(0), Fraction(22, 100)]
        while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) < 1:
            p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
        expected = sorted({math.ceil(q * steps) for q in p} - {steps})
        assert apgd_checkpoints(steps) == expected
    assert apgd_checkpoints(1) == [0]


def test_dlr_loss_sign_and_invariance() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    loss = dlr_loss(logits, y)
    # Correct with margin 2 over top-3 spread 3; wrong by 3 over spread 5; a tie gives 0.
    assert torch.allclose(loss, torch.tensor([-2 / 3, 3 / 5, 0.0]), atol=1e-6)
    assert torch.allclose(dlr_loss(4 * logits - 7, y), loss, atol=1e-6), "DLR ignores shift and scale"
    with pytest.raises(ValueError, match="3 classes"):
        dlr_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("restarts", [1, 2])
def test_stays_in_ball_and_box(tiny_cnn, norm: str, eps: float, loss: str, restarts: int, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    x_adv = apgd(model, x, y, eps=eps, norm=norm, steps=12, restarts=restarts, loss=loss)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (get_step(norm).distance(x_adv, x) <= eps + 1e-5).all()


def test_runs_under_a_callers_autocast(tiny_cnn, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = apgd(model, x, y, eps=0.1, steps=5, loss="dlr")
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_breaks_an_undefended_model(separable, robust) -> None:
    x, y, model = separable()
    assert robust(model, x, y) == 1.0
    robust_apgd = robust(model, apgd(model, x, y, eps=0.3, steps=20), y)
    assert robust_apgd <= 0.1
    assert robust_apgd <= robust(model, fgsm(model, x, y, eps=0.3), y)
    assert robust(model, apgd(model, x, y, eps=0.3, steps=20, loss="dlr"), y) <= 0.1
    # Small eps leaves most predictions alone: the attack is not just noise that always wins.
    assert robust(model, apgd(model, x, y, eps=0.01, steps=20), y) >= 0.9


def test_returned_points_that_fool_are_misclassified_and_restarts_never_weaken(tiny_cnn, batch) -> None:
    model = tiny_cnn(3).eval()
    x, y = batch

    def fooled(restarts: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        x_adv = apgd(model, x, y, eps=0.05, steps=5, restarts=restarts, generator=gen)
        with torch.no_grad():
            return model(x_adv).argmax(1) != y

    one, three = fooled(1), fooled(3)
    assert one.any() and not one.all(), "the setting should fool some samples but not all"
    assert (three >= one).all(), "restart 1 is shared, so more restarts can only fool more samples"


def test_validation(tiny_cnn, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    with pytest.raises(ValueError, match="loss"):
        apgd(model, x, y, eps=0.1, steps=2, loss="margin")
    with pytest.raises(ValueError, match="steps"):
        apgd(model, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="rho"):
        apgd(model, x, y, eps=0.1, steps=2, rho=0.0)
    with pytest.raises(KeyError, match="linf"):
        apgd(model, x, y, eps=0.1, steps=2, norm="l1")


@pytest.mark.parametrize("steps", [10, 25])
def test_at_least_as_strong_as_pgd_with_the_same_steps(robust, steps: int, mnist_cnn) -> None:
    model, x, y = mnist_cnn
    assert robust(model, x, y) >= 0.9
    gen = torch.Generator().manual_seed(0)
    robust_pgd = robust(model, pgd(model, x, y, eps=0.1, steps=steps, generator=gen), y)
    gen = torch.Generator().manual_seed(0)
    robust_apgd = robust(model, apgd(model, x, y, eps=0.1, steps=steps, generator=gen), y)
    assert robust_pgd < 0.6, "the eps should matter for this model"
    assert robust_apgd <= robust_pgd + 2 / len(y)
