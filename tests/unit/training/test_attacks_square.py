"""Square Attack (l_inf): black-box (no gradients, ever), the query budget, the paper's p schedule and
stripes start, a margin that only goes down, ball and box (per-sample eps, seeds and untouched
mode: test_attack_contract.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.attacks import ATTACKS, fgsm, margin_loss, square_linf
from training.attacks.square import square_p, square_side, stripes_init


class QueryOnly:
    """Wraps a model: refuses any call that autograd could differentiate, counts calls and rows."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls = 0
        self.rows = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.requires_grad:
            raise AssertionError("a black-box attack must not build an autograd graph")
        self.calls += 1
        self.rows += x.shape[0]
        return self.model(x)


def test_registered() -> None:
    assert ATTACKS["square"].fn is square_linf


def test_p_schedule_and_side() -> None:
    # 10,000 iterations: p halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000.
    expected = {0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 201: 0.1, 1001: 0.8 / 32, 9999: 0.8 / 512}
    for it, p in expected.items():
        assert square_p(0.8, it, 10000) == pytest.approx(p)
    # Other budgets are rescaled to that scale: iteration 2 of 1,000 is iteration 20 of 10,000.
    assert square_p(0.8, 1, 1000) == pytest.approx(0.8)
    assert square_p(0.8, 2, 1000) == pytest.approx(0.4)
    assert square_side(0.8, 28, 28) == 25
    assert square_side(1e-6, 28, 28) == 1
    assert square_side(1.0, 8, 6) == 6


def test_stripes_init() -> None:
    x = torch.full((4, 3, 5, 7), 0.5)
    eps = torch.tensor([0.1, 0.2, 0.0, 0.3]).reshape(-1, 1, 1, 1)
    delta = stripes_init(x, eps, torch.Generator().manual_seed(0)) - x
    assert torch.allclose(delta.abs(), eps.expand_as(delta))
    assert (delta == delta[:, :, :1, :]).all(), "each column of each channel is shifted as one"
    assert (delta[:1] > 0).any() and (delta[:1] < 0).any()


@pytest.mark.parametrize("restarts", [1, 2])
def test_stays_in_ball_and_box_and_uses_no_gradients(tiny_cnn, restarts: int, batch) -> None:
    model = QueryOnly(tiny_cnn().eval())
    x, y = batch
    x_adv = square_linf(model, x, y, eps=0.1, queries=40, restarts=restarts)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - x).abs().amax(dim=(1, 2, 3)) <= 0.1 + 1e-6).all()


def test_query_budget(separable) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 6, 6, generator=gen)
    y = torch.zeros(5, dtype=torch.long)

    # Never fooled: every sample spends its whole budget, and not one query more.
    never = QueryOnly(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))
    with torch.no_grad():
        never.model[1].weight.zero_()
        never.model[1].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    square_linf(never, x, y, eps=0.2, queries=30)
    assert never.rows == 5 * 30 and never.calls == 30
    never.rows = never.calls = 0
    square_linf(never, x, y, eps=0.2, queries=30, restarts=3)
    assert never.rows == 3 * 5 * 30

    # Already fooled: one query each (the clean image), returned unchanged.
    always = QueryOnly(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))
    with torch.no_grad():
        always.model[1].weight.zero_()
        always.model[1].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    assert torch.equal(square_linf(always, x, y, eps=0.2, queries=30, restarts=2), x)
    assert always.rows == 5

    # Fooled on the way: samples stop being queried once misclassified.
    x_sep, y_sep, model = separable()
    counted = QueryOnly(model)
    square_linf(counted, x_sep, y_sep, eps=0.3, queries=200)
    assert counted.rows < 0.5 * len(x_sep) * 200


def test_margin_only_goes_down(tiny_cnn, batch) -> None:
    model = tiny_cnn(2).eval()
    x, y = batch
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    # Only correctly classified samples, so the attack's first draw is the stripes of the whole batch.
    x, y, eps = x[ok], y[ok], 0.03
    assert len(x) >= 4
    start = stripes_init(x, torch.tensor(eps), torch.Generator().manual_seed(0))
    x_adv = square_linf(model, x, y, eps=eps, queries=100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # margin_loss is positive once fooled; the attack minimizes its negative, z_y - max_{i != y} z_i.
        before, after = -margin_loss(model(start), y), -margin_loss(model(x_adv), y)
    assert (after <= before + 1e-6).all()
    assert (after < before - 1e-3).float().mean() >= 0.8


def test_breaks_an_undefended_model(separable, robust) -> None:
    x, y, model = separable()
    assert robust(model, x, y) == 1.0
    gen = torch.Generator().manual_seed(0)
    robust_square = robust(model, square_linf(model, x, y, eps=0.3, queries=200, generator=gen), y)
    assert robust_square <= 0.1
    assert robust_square <= robust(model, fgsm(model, x, y, eps=0.3), y)
    assert robust(model, square_linf(model, x, y, eps=0.3, queries=200, loss="ce"), y) <= 0.1
    # Small eps leaves most predictions alone.
    assert robust(model, square_linf(model, x, y, eps=0.01, queries=200), y) >= 0.9


def test_validation(tiny_cnn, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    with pytest.raises(ValueError, match="loss"):
        square_linf(model, x, y, eps=0.1, queries=10, loss="dlr")
    with pytest.raises(ValueError, match="queries"):
        square_linf(model, x, y, eps=0.1, queries=1)
    with pytest.raises(ValueError, match="p_init"):
        square_linf(model, x, y, eps=0.1, queries=10, p_init=0.0)


def test_runs_under_a_callers_autocast(tiny_cnn, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = square_linf(model, x, y, eps=0.1, queries=20)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
