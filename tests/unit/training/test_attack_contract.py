"""The contract every registered attack keeps (see ``training/attacks/pgd.py``), checked once for all
of them by parametrizing over the registry (as timm's tests do over ``list_models()``): in the ball
of its norm and in [0, 1], a per-sample eps honoured (eps 0 leaves the image alone, a wrong shape is
refused), seeded randomness reproducible, the model's mode, parameters and gradients left as they
were; and every (attack, norm) pair either runs in that norm or is refused by the factory.

A new attack is one file in training/attacks plus an entry in CHEAP below (the test that the
registry and CHEAP agree fails until it has one) plus its own tests of what it computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.attacks import ATTACKS, AttackError, build_attack, get_step, list_attacks
from training.attacks.catalog import NORMS
from training.models import EmbeddingClassifier
from training.typicality.fit import fit

# Cheap parameters per attack for these tests, and whether it draws random numbers.
CHEAP: dict[str, tuple[dict[str, object], bool]] = {
    "pgd": ({"steps": 3}, True),
    "fgsm": ({}, False),
    "apgd": ({"steps": 6}, True),
    "apgd-t": ({"steps": 4, "n_target_classes": 2}, True),
    "fab-t": ({"steps": 5, "n_target_classes": 2}, False),
    "square": ({"queries": 20}, True),
    "cw": ({"steps": 5, "binary_steps": 2}, False),
    "adaptive-pgd": ({"steps": 3}, True),
}
EPS = {"linf": 0.2, "l2": 1.0}
PAIRS = [(name, norm) for name in sorted(ATTACKS) for norm in ATTACKS[name].norms]


def _model(seed: int = 0) -> EmbeddingClassifier:
    """A 10-class embedding classifier on 1x8x8 images, with BatchNorm and Dropout (so that a change
    of mode would show)."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Flatten(),
        nn.Linear(256, 4),
    )
    return EmbeddingClassifier(encoder, nn.Linear(4, 10), embed_dim=4, num_classes=10)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def _inputs(name: str, model: EmbeddingClassifier) -> dict[str, object]:
    """The extra inputs an attack needs (``AttackDef.needs``)."""
    if "typicality" not in ATTACKS[name].needs:
        return {}
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(400, 4, generator=gen)
    y = torch.arange(400) % 10
    return {"typicality": fit(z, y, z[:100], num_classes=10, prior="gaussian")}


def _build(name: str, norm: str, model: EmbeddingClassifier, **params: object):  # type: ignore[no-untyped-def]
    return build_attack(name, {**CHEAP[name][0], **params}, norm, **_inputs(name, model))


def test_every_registered_attack_has_contract_parameters() -> None:
    assert set(CHEAP) == set(ATTACKS)
    assert set(list_attacks()) == {n for n, d in ATTACKS.items() if not d.needs}


@pytest.mark.parametrize(("name", "norm"), PAIRS)
def test_in_ball_and_box_with_per_sample_eps(data, name: str, norm: str) -> None:
    model = _model().eval()
    x, y = data
    eps = torch.linspace(0.0, EPS[norm], len(x))
    x_adv = _build(name, norm, model)(model, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (get_step(norm).distance(x_adv, x) <= eps + 1e-5).all()
    assert torch.equal(x_adv[0], x[0]), "eps 0 must leave the image unchanged"
    with pytest.raises(ValueError, match="shape"):
        _build(name, norm, model)(model, x, y, eps=torch.ones(3))


@pytest.mark.parametrize(("name", "norm"), PAIRS)
def test_reproducible_with_a_generator(data, name: str, norm: str) -> None:
    model = _model().eval()
    x, y = data
    attack = _build(name, norm, model)

    def run(seed: int) -> torch.Tensor:
        return attack(model, x, y, eps=EPS[norm], generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    random = CHEAP[name][1]
    assert torch.equal(run(5), run(6)) is not random, "random draws come from the generator, and only there"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "norm"), PAIRS)
def test_leaves_mode_and_parameters_untouched(untouched, data, name: str, norm: str, mode: str) -> None:
    model = _model()
    model.train(mode == "train")
    x, y = data
    with untouched(model):
        _build(name, norm, model, **({"restarts": 2} if "restarts" in ATTACKS[name].parameters() else {}))(
            model, x, y, eps=EPS[norm]
        )


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_either_runs_or_is_refused(data, name: str, norm: str) -> None:
    model = _model().eval()
    x, y = data
    if norm not in ATTACKS[name].norms:
        with pytest.raises(AttackError, match=f"works in .*not {norm}"):
            _build(name, norm, model)
        return
    attack = _build(name, norm, model)
    assert attack.record()["norm"] == norm and norm in attack.description
    x_adv = attack(model, x, y, eps=EPS[norm])
    assert (get_step(norm).distance(x_adv, x) <= EPS[norm] + 1e-5).all()
