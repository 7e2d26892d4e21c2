"""PGD / FGSM: inside the ball and the image box, and effective on an undefended model (per-sample
eps, seeds and untouched mode: test_attack_contract.py, for every attack)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.attacks import fgsm, get_step, margin_loss, pgd


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("restarts", [1, 3])
def test_pgd_stays_in_ball_and_box(tiny_cnn, norm: str, eps: float, restarts: int, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    x_adv = pgd(model, x, y, eps=eps, steps=7, norm=norm, restarts=restarts)
    assert x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    dist = get_step(norm).distance(x_adv, x)
    assert (dist <= eps + 1e-5).all()


def _fit_linear(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_attacks_break_an_undefended_model() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (60,), generator=gen)
    # Separable classes: a bright patch in a class-dependent row.
    x = torch.rand(60, 1, 6, 6, generator=gen) * 0.3
    for i, label in enumerate(y):
        x[i, 0, 2 * label, :] += 0.6
    model = _fit_linear(x, y)
    clean = (model(x).argmax(1) == y).float().mean()
    assert clean == 1.0
    robust_pgd = (model(pgd(model, x, y, eps=0.3, steps=20)).argmax(1) == y).float().mean()
    robust_fgsm = (model(fgsm(model, x, y, eps=0.3)).argmax(1) == y).float().mean()
    assert robust_pgd <= 0.1
    assert robust_pgd <= robust_fgsm
    # Small eps leaves most predictions alone: the attack is not just noise that always wins.
    assert (model(pgd(model, x, y, eps=0.01, steps=20)).argmax(1) == y).float().mean() >= 0.9


def test_restarts_and_keep_best_never_weaken_the_attack(tiny_cnn, batch) -> None:
    model = tiny_cnn(3).eval()
    x, y = batch

    def robust(**kw) -> torch.Tensor:
        x_adv = pgd(model, x, y, eps=0.05, steps=5, generator=torch.Generator().manual_seed(0), **kw)
        return model(x_adv).argmax(1) == y

    last = robust(keep_best=False)
    best = robust(keep_best=True)
    assert (best <= last).all(), "a sample fooled by the last iterate is also fooled with keep_best"
    many = robust(keep_best=True, restarts=4)
    assert (many <= best).all(), "restart 1 is shared, so more restarts can only fool more samples"


@pytest.mark.parametrize("restarts", [1, 3])
def test_early_stop_saves_work_and_changes_no_verdict(tiny_cnn, restarts: int, batch) -> None:
    model = tiny_cnn(3).eval()
    x, y = batch
    rows_seen = []

    def counting(inp: torch.Tensor) -> torch.Tensor:
        rows_seen.append(len(inp))
        return model(inp)

    def attack(early_stop: bool) -> tuple[torch.Tensor, int]:
        rows_seen.clear()
        x_adv = pgd(
            counting,
            x,
            y,
            eps=0.05,
            steps=10,
            restarts=restarts,
            early_stop=early_stop,
            generator=torch.Generator().manual_seed(0),
        )
        return x_adv, sum(rows_seen)

    full, work_full = attack(False)
    pruned, work_pruned = attack(True)
    fooled_full = model(full).argmax(1) != y
    fooled_pruned = model(pruned).argmax(1) != y
    assert 0 < int(fooled_full.sum()) < len(y), "the test needs some fooled and some robust samples"
    assert work_pruned < work_full
    assert (get_step("linf").distance(pruned, x) <= 0.05 + 1e-6).all()
    if restarts == 1:
        # Same random start, same steps: the same samples fall, at the same iterate.
        assert torch.equal(fooled_full, fooled_pruned)
        torch.testing.assert_close(pruned[fooled_full], full[fooled_full])
    else:
        # Later restarts start from other random points (drawn for the survivors only).
        assert (fooled_pruned | ~fooled_full).float().mean() >= 0.9


def test_margin_loss_sign() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    y = torch.tensor([0, 1])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([-2.0, 3.0]))


def test_pgd_margin_loss_and_validation(tiny_cnn, batch) -> None:
    model = tiny_cnn().eval()
    x, y = batch
    x_adv = pgd(model, x, y, eps=0.1, steps=3, loss="margin")
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="loss"):
        pgd(model, x, y, eps=0.1, steps=1, loss="hinge")
    with pytest.raises(KeyError, match="linf"):
        pgd(model, x, y, eps=0.1, steps=1, norm="l1")
    with pytest.raises(ValueError, match="shape"):
        pgd(model, x, y, eps=torch.ones(3), steps=1)
