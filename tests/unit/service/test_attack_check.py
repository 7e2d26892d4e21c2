"""The attack check's computation (service.attack_check.check), on a fixed linear classifier whose
smallest flipping l_inf perturbation is known in closed form: parameters and limits, quantisation
inside the ball and the box, determinism, the verdict on the returned 8-bit images, the search."""

from __future__ import annotations

import math

import pytest
import torch

from service.attack_check.check import (
    LEVELS,
    CheckParams,
    DeadlineExceeded,
    Limits,
    from_uint8,
    parse_params,
    quantize,
    run_check,
)
from service.errors import InvalidInput, LimitExceeded

LIMITS = Limits(max_steps=100, max_restarts=5, max_work=5000)


def linear_model(seed: int = 0) -> torch.nn.Module:
    """Logits = W x + b on 1x8x8 images, 3 classes: gradients and margins are exact."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        model[1].weight.mul_(4)
    return model.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    """``n`` images 1x8x8 on the 8-bit grid, mid-grey-ish so the box rarely binds."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(60, 196, (n, 1, 8, 8), generator=g).float() / LEVELS


def params(**kw: object) -> CheckParams:
    base = {"eps": 0.1, "steps": 20, "restarts": 1, "seed": 0, "smallest_eps": False, "smallest_eps_max": 0.5}
    return CheckParams(**{**base, **kw})  # type: ignore[arg-type]


def linf_to_flip(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Smallest l_inf perturbation that makes another class win, ignoring the [0, 1] box (so a lower
    bound of the true one): min over j != y of (z_y - z_j) / ||w_y - w_j||_1."""
    w = model[1].weight
    with torch.no_grad():
        z = model(x)
    out = []
    for i in range(len(x)):
        gaps = [(z[i, y[i]] - z[i, j]) / (w[y[i]] - w[j]).abs().sum() for j in range(w.shape[0]) if j != y[i]]
        out.append(min(gaps))
    return torch.stack(out)


# -- parameters ----------------------------------------------------------------------------------------
def test_defaults_take_the_models_training_eps() -> None:
    p = parse_params({}, default_eps=0.3, limits=LIMITS, n=1)
    assert (p.eps, p.steps, p.restarts, p.seed, p.smallest_eps) == (0.3, 40, 1, 0, False)
    assert p.eps_units == 76 and math.isclose(p.record()["eps_effective"], 76 / 255)


def test_query_strings_are_parsed() -> None:
    raw = {"eps": "0.2", "steps": "10", "restarts": "2", "seed": "7", "smallest_eps": "true"}
    p = parse_params(raw, default_eps=0.3, limits=LIMITS, n=1)
    assert (p.eps, p.steps, p.restarts, p.seed, p.smallest_eps) == (0.2, 10, 2, 7, True)
    assert p.eps_units == 51  # 0.2 * 255 = 51 despite float noise


@pytest.mark.parametrize(
    "raw,error,fragment",
    [
        ({"steps": 101}, LimitExceeded, "ERC_ATTACK_MAX_STEPS"),
        ({"restarts": 6}, LimitExceeded, "ERC_ATTACK_MAX_RESTARTS"),
        ({"steps": 100, "restarts": 5, "smallest_eps": True}, LimitExceeded, "ERC_ATTACK_MAX_WORK"),
        ({"steps": 0}, InvalidInput, "at least 1"),
        ({"steps": 2.5}, InvalidInput, "integer"),
        ({"steps": True}, InvalidInput, "integer"),
        ({"eps": 1.5}, InvalidInput, "outside [0, 1]"),
        ({"eps": -0.1}, InvalidInput, "outside [0, 1]"),
        ({"eps": "nan"}, InvalidInput, "finite"),
        ({"eps": "x"}, InvalidInput, "number"),
        ({"seed": -1}, InvalidInput, "seed"),
        ({"seed": 2**62}, InvalidInput, "seed"),
        ({"smallest_eps": "maybe"}, InvalidInput, "boolean"),
        ({"smallest_eps_max": 0.001}, InvalidInput, "smallest_eps_max"),
        ({"stepz": 3}, InvalidInput, "unknown parameter(s) 'stepz'"),
    ],
)
def test_bad_parameters_are_refused_with_their_name(raw: dict, error: type, fragment: str) -> None:
    with pytest.raises(error, match=None) as info:
        parse_params(raw, default_eps=0.3, limits=LIMITS, n=2)
    assert fragment in info.value.message


def test_work_counts_images_steps_restarts_and_search_runs() -> None:
    p = parse_params({"steps": 10, "restarts": 2, "smallest_eps": True}, default_eps=0.3, limits=LIMITS, n=3)
    # the check, one run at the search's upper end (0.5 -> 127/255), ceil(log2(127)) = 7 halvings
    assert p.runs() == 9 and p.work(3) == 3 * 10 * 2 * 9


# -- quantisation ----------------------------------------------------------------------------------------
def test_quantize_stays_in_the_ball_and_the_box() -> None:
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 256, (64, 1, 8, 8), generator=g).float() / LEVELS
    units = torch.randint(0, 80, (64,), generator=g)
    # adversarial floats anywhere, including past the ball by less than half a step and outside [0, 1]
    adv = clean + (torch.rand(clean.shape, generator=g) * 2 - 1) * (units.view(-1, 1, 1, 1) + 0.49) / LEVELS
    adv[:8] += 0.3
    q = quantize(adv, clean, units)
    assert q.dtype == torch.uint8
    delta = q.to(torch.int16) - torch.round(clean * LEVELS).to(torch.int16)
    assert bool((delta.abs().flatten(1).amax(1) <= units).all())
    # nearest rounding where the ball does not bind: at most half a step from the float
    inside = (adv * LEVELS - torch.round(clean * LEVELS)).abs() <= units.view(-1, 1, 1, 1)
    inside &= (adv >= 0) & (adv <= 1)
    assert float((from_uint8(q) - adv)[inside].abs().max()) <= 0.5 / LEVELS + 1e-6


# -- the attack ----------------------------------------------------------------------------------------
def test_adversarial_images_are_8_bit_inside_eps_and_flipped_is_their_verdict() -> None:
    model, x = linear_model(), images(16)
    with torch.no_grad():
        y = model(x).argmax(1)
    p = params(eps=0.024)  # 6/255: about half of these images are within reach
    out = run_check(model, x, y, p)
    assert out.adversarial.dtype == torch.uint8 and out.adversarial.shape == x.shape
    delta = out.adversarial.to(torch.int16) - torch.round(x * LEVELS).to(torch.int16)
    assert int(delta.abs().max()) <= p.eps_units <= 0.024 * LEVELS
    with torch.no_grad():
        verdict = model(from_uint8(out.adversarial)).argmax(1) != y
    assert out.flipped == verdict.tolist()
    # a linear model is flipped exactly where the closed-form radius is within the grid radius
    bound = linf_to_flip(model, x, y)
    reachable, beyond = bound <= p.eps_units / LEVELS - 1e-3, bound > p.eps_units / LEVELS
    assert bool(reachable.any()) and bool(beyond.any()), "the sample should hold both kinds"
    assert bool(verdict[reachable].all()), "PGD misses flips a linear model allows"
    assert not bool(verdict[beyond].any()), "a flip beyond the true minimum: the image left the ball"


def test_same_seed_same_images_other_seed_other_start() -> None:
    model, x = linear_model(), images(6)
    with torch.no_grad():
        y = model(x).argmax(1)
    a = run_check(model, x, y, params(seed=5, steps=3))
    b = run_check(model, x, y, params(seed=5, steps=3))
    c = run_check(model, x, y, params(seed=6, steps=3))
    assert torch.equal(a.adversarial, b.adversarial) and a.flipped == b.flipped
    assert not torch.equal(a.adversarial, c.adversarial)


def test_the_smallest_flipping_eps_brackets_the_true_one() -> None:
    model, x = linear_model(), images(12)
    with torch.no_grad():
        y = model(x).argmax(1)
    out = run_check(model, x, y, params(eps=0.05, steps=30, smallest_eps=True, smallest_eps_max=0.5))
    assert out.smallest_units is not None and out.runs <= params(smallest_eps=True).runs()
    bound = linf_to_flip(model, x, y)
    for i, units in enumerate(out.smallest_units):
        if out.flipped[i]:
            assert units is not None and units <= 12  # 0.05 -> 12/255
        if units is None:
            assert bound[i] > 0.5 - 1e-3
            continue
        # never below the true minimum (a flip there would have left the ball), and PGD on a linear
        # model finds it to within the grid step and the box's effect
        assert units / LEVELS >= bound[i] - 1e-6, (i, units, bound[i])
        assert units / LEVELS <= bound[i] + 3 / LEVELS, (i, units, bound[i])


def test_eps_below_one_step_changes_nothing() -> None:
    model, x = linear_model(), images(3)
    with torch.no_grad():
        y = model(x).argmax(1)
    out = run_check(model, x, y, params(eps=0.003))
    assert torch.equal(from_uint8(out.adversarial), x) and out.flipped == [False] * 3


def test_a_passed_deadline_stops_the_attack() -> None:
    model, x = linear_model(), images(2)
    with pytest.raises(DeadlineExceeded, match="ERC_ATTACK_TIMEOUT_S"):
        run_check(model, x, torch.zeros(2, dtype=torch.long), params(), deadline=0.0)
