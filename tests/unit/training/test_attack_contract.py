"""The contract every attack of ``training.attacks`` keeps (see ``training/attacks/pgd.py``), checked
once for all of them: a per-sample eps is honoured (eps 0 leaves the image alone, a wrong shape is
refused), a generator makes the result reproducible, and the model's mode, parameters and their
gradients are left as they were."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from training.attacks import apgd, cw_l2, fgsm, get_step, pgd, square_linf

Attack = Callable[..., torch.Tensor]

# name -> (attack called with eps, norm, largest eps, distance tolerance)
PER_SAMPLE: dict[str, tuple[Attack, str, float, float]] = {
    "pgd": (lambda m, x, y, eps: pgd(m, x, y, eps=eps, steps=5), "linf", 0.2, 1e-6),
    "apgd-linf": (lambda m, x, y, eps: apgd(m, x, y, eps=eps, norm="linf", steps=8), "linf", 0.3, 1e-5),
    "apgd-l2": (lambda m, x, y, eps: apgd(m, x, y, eps=eps, norm="l2", steps=8), "l2", 0.3, 1e-5),
    "square": (lambda m, x, y, eps: square_linf(m, x, y, eps=eps, queries=30), "linf", 0.2, 1e-6),
}


@pytest.mark.parametrize("name", sorted(PER_SAMPLE))
def test_per_sample_eps(tiny_cnn, batch, name: str) -> None:
    attack, norm, top, tol = PER_SAMPLE[name]
    model = tiny_cnn().eval()
    x, y = batch
    eps = torch.linspace(0.0, top, len(x))
    x_adv = attack(model, x, y, eps)
    assert (get_step(norm).distance(x_adv, x) <= eps + tol).all()
    assert torch.equal(x_adv[0], x[0]), "eps 0 must leave the image unchanged"
    with pytest.raises(ValueError, match="shape"):
        attack(model, x, y, torch.ones(3))


# name -> (attack called with a generator, the seeds compared)
SEEDED: dict[str, tuple[Attack, tuple[int, int]]] = {
    "pgd": (lambda m, x, y, g: pgd(m, x, y, eps=0.1, steps=3, generator=g), (5, 6)),
    "apgd": (lambda m, x, y, g: apgd(m, x, y, eps=0.1, steps=6, generator=g), (5, 6)),
    "square": (lambda m, x, y, g: square_linf(m, x, y, eps=0.05, queries=20, generator=g), (3, 4)),
}


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_reproducible_with_a_generator(tiny_cnn, batch, name: str) -> None:
    attack, (seed, other) = SEEDED[name]
    model = tiny_cnn().eval()
    x, y = batch

    def run(s: int) -> torch.Tensor:
        return attack(model, x, y, torch.Generator().manual_seed(s))

    assert torch.equal(run(seed), run(seed))
    assert not torch.equal(run(seed), run(other))


# name -> the calls made on the model (each attack's option paths that touch the model differently)
CALLS: dict[str, list[Attack]] = {
    "pgd+fgsm": [
        lambda m, x, y: pgd(m, x, y, eps=0.1, steps=3),
        lambda m, x, y: fgsm(m, x, y, eps=0.1),
    ],
    "apgd": [
        lambda m, x, y: apgd(m, x, y, eps=0.1, steps=5, restarts=2),
        lambda m, x, y: apgd(m, x, y, eps=0.5, norm="l2", steps=5, loss="dlr"),
    ],
    "square": [lambda m, x, y: square_linf(m, x, y, eps=0.1, queries=10, restarts=2)],
    "cw": [lambda m, x, y: cw_l2(m, x, y, steps=5, binary_steps=2)],
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_leaves_mode_and_parameters_untouched(tiny_cnn, untouched, batch, name: str, mode: str) -> None:
    model = tiny_cnn()
    model.train(mode == "train")
    x, y = batch
    with untouched(model):
        for call in CALLS[name]:
            call(model, x, y)
