"""What one attack check computes, with no web framework: parameters, limits, quantisation, attack.

The returned adversarial image is an 8-bit image (a PNG on the wire), and the verdict must hold for
exactly those bytes: ``:predict`` on the returned PNG gives the adversarial label. Three rules make
that true by construction rather than by luck:

1. **Grid-aligned radius.** The attack runs at ``eps_units / 255`` with ``eps_units =
   floor(255 * eps)``: the largest radius of the 8-bit grid within the requested eps (a pixel can
   only move by whole steps of 1/255). The clean image is on that grid already (decoded from 8 bits).
2. **The attack sees quantised images.** The attacked model rounds its input to the grid in the
   forward pass and passes the gradient straight through (BPDA / straight-through estimator), so
   PGD's keep-best verdict ("this iterate fooled the model") is made on the rounded image.
3. **Rounding that cannot leave the ball.** The result is rounded to the nearest grid value, then
   clipped to ``[clean - eps_units, clean + eps_units]`` and ``[0, 255]`` in integer space. With
   rule 1 the clip never binds except for float noise; it is what guarantees
   ``max |adv - clean| <= eps_units / 255 <= eps`` and ``adv`` in [0, 1] for every returned pixel.

The smallest flipping eps is searched on the same grid (``k / 255``) by bisection: the attack at
``k`` flips the prediction and the attack at the grid point below the final bracket held. Attacks
are not monotone in eps, so this is the smallest eps *this search* found, an upper bound on the
true minimal perturbation for this PGD budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from service.errors import InvalidInput, LimitExceeded
from service.payloads import flag
from training.attacks import Model, build_attack

LEVELS = 255  # 8-bit images: one grid step is 1/255
SEED_MAX = 2**62 - 1  # torch.Generator.manual_seed takes 64 bits; the search adds small offsets
DEFAULT_STEPS = 40  # the registry's PGD default
DEFAULT_SEARCH_MAX = 0.5  # l_inf 0.5 can turn any image into uniform grey: nothing to find above it
PARAMETERS = (
    "eps",
    "steps",
    "restarts",
    "seed",
    "smallest_eps",
    "smallest_eps_max",
    "return_embedding",
    "return_probabilities",
)


class DeadlineExceeded(Exception):
    """The attack ran past its request's deadline (checked before every forward pass)."""


@dataclass(frozen=True)
class Limits:
    """A server's bounds on one request (``ERC_ATTACK_MAX_*``)."""

    max_steps: int
    max_restarts: int
    max_work: float


@dataclass(frozen=True)
class CheckParams:
    """A validated request: PGD-``steps`` x ``restarts`` at ``eps`` (l_inf, images in [0, 1])."""

    eps: float
    steps: int
    restarts: int
    seed: int
    smallest_eps: bool
    smallest_eps_max: float

    @property
    def eps_units(self) -> int:
        """The radius in grid steps: ``floor(255 * eps)`` (the small slack absorbs float noise, so
        that 0.2 = 51/255 counts as 51)."""
        return math.floor(self.eps * LEVELS + 1e-6)

    @property
    def search_units(self) -> int:
        return math.floor(self.smallest_eps_max * LEVELS + 1e-6)

    def runs(self) -> int:
        """Most attack runs one image can take: the check itself, and with the search one run at its
        upper end plus one per halving of the bracket (which starts at most this wide)."""
        if not self.smallest_eps:
            return 1
        return 2 + math.ceil(math.log2(max(self.search_units, self.eps_units, 2)))

    def work(self, n: int) -> float:
        """Upper bound of forward-backward passes for ``n`` images (the unit of ``ERC_ATTACK_MAX_WORK``)."""
        return float(n * self.steps * self.restarts * self.runs())

    def record(self) -> dict[str, Any]:
        """How the adversarial images were made, for the response."""
        attack = build_attack("pgd", {"steps": self.steps, "restarts": self.restarts})
        out: dict[str, Any] = {
            "name": "pgd",
            "label": attack.label,
            "norm": "linf",
            **asdict(self),
            "eps_units": self.eps_units,
            "eps_effective": self.eps_units / LEVELS,
            "alpha": 2.5 * self.eps_units / LEVELS / self.steps,
        }
        if not self.smallest_eps:
            out.pop("smallest_eps_max")
        return out


def _number(value: Any, name: str) -> float:
    """A finite number, from JSON or from a query / form string."""
    if isinstance(value, bool):
        raise InvalidInput(f"parameter {name!r} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidInput(f"parameter {name!r} must be a number, got {value!r}") from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"parameter {name!r} must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"parameter {name!r} must be an integer, got {value!r}")
    return value


def parse_params(params: dict[str, Any], *, default_eps: float, limits: Limits, n: int) -> CheckParams:
    """Validate a request's parameters (JSON ``parameters``, query string or form fields).

    Unknown names, values of the wrong type or outside their range are 422; a budget above the
    server's limits (steps, restarts, total work) is 413 naming the limit.
    """
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise InvalidInput(
            f"unknown parameter(s) {', '.join(map(repr, unknown))}; :attack takes {', '.join(PARAMETERS)}"
        )
    eps = _number(params.get("eps", default_eps), "eps")
    if not 0 <= eps <= 1:
        raise InvalidInput(f"parameter 'eps' = {eps:g} is outside [0, 1] (l_inf radius on [0, 1] images)")
    steps = _integer(params.get("steps", DEFAULT_STEPS), "steps")
    restarts = _integer(params.get("restarts", 1), "restarts")
    seed = _integer(params.get("seed", 0), "seed")
    for name, value in (("steps", steps), ("restarts", restarts)):
        if value < 1:
            raise InvalidInput(f"parameter {name!r} must be at least 1, got {value}")
    if steps > limits.max_steps:
        raise LimitExceeded(f"steps = {steps}; the limit is {limits.max_steps} (ERC_ATTACK_MAX_STEPS)")
    if restarts > limits.max_restarts:
        raise LimitExceeded(
            f"restarts = {restarts}; the limit is {limits.max_restarts} (ERC_ATTACK_MAX_RESTARTS)"
        )
    if not 0 <= seed <= SEED_MAX:
        raise InvalidInput(f"parameter 'seed' must lie in [0, 2^62), got {seed}")
    search = flag(params.get("smallest_eps"), "smallest_eps", False)
    search_max = _number(params.get("smallest_eps_max", DEFAULT_SEARCH_MAX), "smallest_eps_max")
    if not 1 / LEVELS <= search_max <= 1:
        raise InvalidInput(
            f"parameter 'smallest_eps_max' = {search_max:g} is outside [1/255, 1] (the search grid is k/255)"
        )
    out = CheckParams(eps, steps, restarts, seed, search, search_max)
    work = out.work(n)
    if work > limits.max_work:
        raise LimitExceeded(
            f"this request costs up to {work:.3g} forward-backward passes ({n} image(s) x {steps} steps x "
            f"{restarts} restart(s) x {out.runs()} attack run(s)); the limit is {limits.max_work:.3g} "
            "(ERC_ATTACK_MAX_WORK): fewer images, steps or restarts, or no smallest_eps search"
        )
    return out


# -- quantisation ----------------------------------------------------------------------------------


class _RoundToGrid(torch.autograd.Function):
    """Forward: round to the 8-bit grid. Backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * LEVELS) / LEVELS

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def to_grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to multiples of 1/255 (differentiable as the identity)."""
    out: torch.Tensor = _RoundToGrid.apply(x)
    return out


def quantize(adv: torch.Tensor, clean: torch.Tensor, eps_units: torch.Tensor) -> torch.Tensor:
    """Adversarial images ``[N, C, H, W]`` in [0, 1] -> uint8, rounded to the nearest grid value and
    clipped in integer space to ``clean +- eps_units`` (``[N]``) and [0, 255]: every pixel of the
    result is within ``eps_units / 255`` of the clean one."""
    c = torch.round(clean * LEVELS)
    u = eps_units.to(c.dtype).reshape(-1, *([1] * (c.ndim - 1)))
    a = torch.round(adv * LEVELS)
    return torch.maximum(torch.minimum(a, c + u), c - u).clamp(0, LEVELS).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float in [0, 1], the same arithmetic as the image decoder."""
    return images.float().div_(LEVELS)


# -- the attack ------------------------------------------------------------------------------------


@dataclass
class CheckOutput:
    adversarial: torch.Tensor  # [N, C, H, W] uint8, on the grid, within eps_units of the clean image
    flipped: list[bool]  # this process's verdict on ``adversarial`` (the service re-classifies it)
    smallest_units: list[int | None] | None  # per image, the smallest flipping eps in 1/255 units
    runs: int  # attack runs made (the check and the search's probes, batched over images)


def _guarded(model: Model, deadline: float | None) -> Model:
    """The model the attack sees: the deadline checked before every forward pass, inputs rounded to
    the 8-bit grid (straight-through gradient)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("the attack ran past its time limit (ERC_ATTACK_TIMEOUT_S)")
        return model(to_grid(x))

    return forward


def run_check(
    model: Model, x: torch.Tensor, y: torch.Tensor, params: CheckParams, *, deadline: float | None = None
) -> CheckOutput:
    """Attack ``x`` (``[N, C, H, W]`` on the 1/255 grid) away from the labels ``y`` (``[N]``, the
    clean predictions) with PGD in the l_inf ball of ``params.eps_units / 255``.

    Deterministic for a given ``params.seed`` (and torch thread count): run ``r`` of the check and of
    the search draws its random starts from ``torch.Generator().manual_seed(seed + r)``.
    """
    attack = build_attack("pgd", {"steps": params.steps, "restarts": params.restarts})
    target = _guarded(model, deadline)
    n = len(x)
    runs = 0

    def attempt(rows: torch.Tensor, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attack the images ``rows`` at radii ``units`` (``[len(rows)]``); returns their quantised
        adversarial images and whether each flips the prediction."""
        nonlocal runs
        xs, ys = x[rows], y[rows]
        adv = xs.clone()
        live = units > 0  # a radius below one grid step cannot change a pixel
        if bool(live.any()):
            gen = torch.Generator().manual_seed(params.seed + runs)
            adv[live] = attack(target, xs[live], ys[live], eps=units[live].float() / LEVELS, generator=gen)
        runs += 1
        q = quantize(adv, xs, units)
        with torch.no_grad():
            flipped = target(from_uint8(q)).argmax(1) != ys
        return q, flipped

    every = torch.arange(n)
    units = torch.full((n,), params.eps_units, dtype=torch.long)
    adversarial, flipped = attempt(every, units)
    smallest: list[int | None] | None = None
    if params.smallest_eps:
        smallest = _search(attempt, flipped, params.eps_units, params.search_units)
    return CheckOutput(adversarial, [bool(f) for f in flipped], smallest, runs)


def _search(
    attempt: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    flipped: torch.Tensor,
    eps_units: int,
    upper: int,
) -> list[int | None]:
    """Bisection on the grid, all images at once with per-image radii: ``hi`` is a radius at which the
    attack flipped the image, ``lo`` one at which it held (0 holds by definition)."""
    n = len(flipped)
    lo = torch.zeros(n, dtype=torch.long)
    hi = torch.full((n,), -1, dtype=torch.long)  # -1: no flipping radius known
    hi[flipped] = eps_units
    lo[~flipped] = eps_units
    probe = (~flipped & (upper > eps_units)).nonzero().squeeze(1)
    if len(probe):
        _, hit = attempt(probe, torch.full((len(probe),), upper, dtype=torch.long))
        hi[probe[hit]] = upper
        lo[probe[~hit]] = upper
    while True:
        active = ((hi >= 0) & (hi - lo > 1)).nonzero().squeeze(1)
        if not len(active):
            break
        mid = (lo[active] + hi[active]) // 2
        _, hit = attempt(active, mid)
        hi[active[hit]] = mid[hit]
        lo[active[~hit]] = mid[~hit]
    return [int(h) if h >= 0 else None for h in hi]
