"""Priors for the embedding (paper Section 4.3): the distribution the discriminator pushes the
encoder's codes toward. Each prior samples ``[n, k]`` codes and gives the log-density of codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from training.errors import UnknownName


@dataclass(frozen=True)
class Prior:
    name: str
    description: str
    sample: Callable[[int, int, torch.device, torch.Generator | None], torch.Tensor]
    log_prob: Callable[[torch.Tensor], torch.Tensor]  # [n, k] -> [n], summed over dimensions


def _gaussian_sample(n: int, k: int, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randn(n, k, device=device, generator=gen)


def _gaussian_log_prob(z: torch.Tensor) -> torch.Tensor:
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(dim=1)


def _uniform_sample(n: int, k: int, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, k, device=device, generator=gen) * 6.0 - 3.0


def _uniform_log_prob(z: torch.Tensor) -> torch.Tensor:
    inside = (z.abs() <= 3.0).all(dim=1)
    lp = torch.full((z.shape[0],), -z.shape[1] * math.log(6.0), dtype=z.dtype, device=z.device)
    return torch.where(inside, lp, torch.full_like(lp, -math.inf))


def _cauchy_sample(n: int, k: int, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    # Inverse CDF: x = tan(pi * (u - 1/2)); keep u away from 0 and 1 to avoid infinities.
    u = torch.rand(n, k, device=device, generator=gen).clamp(1e-6, 1 - 1e-6)
    return torch.tan(math.pi * (u - 0.5))


def _cauchy_log_prob(z: torch.Tensor) -> torch.Tensor:
    return (-math.log(math.pi) - torch.log1p(z.pow(2))).sum(dim=1)


PRIORS: dict[str, Prior] = {
    "gaussian": Prior("gaussian", "standard normal N(0, I)", _gaussian_sample, _gaussian_log_prob),
    "uniform": Prior("uniform", "uniform on [-3, 3]^k", _uniform_sample, _uniform_log_prob),
    "cauchy": Prior("cauchy", "standard Cauchy(0, 1) per dimension", _cauchy_sample, _cauchy_log_prob),
}


def get_prior(name: str) -> Prior:
    try:
        return PRIORS[name]
    except KeyError:
        raise UnknownName(f"unknown prior {name!r}; known: {', '.join(sorted(PRIORS))}") from None
