"""Threat models as small step objects (after MadryLab's ``robustness.attack_steps``).

A step knows how to draw a random start inside its ball, take one ascent step from a gradient,
and project back onto the ball around the clean input. ``eps`` and ``alpha`` may be Python floats
or tensors of shape ``[N]`` (one radius per sample); everything broadcasts over ``[N, C, H, W]``.
Projections also clip to the image box [0, 1].
"""

from __future__ import annotations

from typing import Protocol

import torch

Radius = float | torch.Tensor


def per_sample(value: Radius, x: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor broadcastable to ``x`` (``[N, 1, 1, 1]`` for a 4-D batch)."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))
    if t.shape != (x.shape[0],):
        raise ValueError(f"per-sample value must have shape [{x.shape[0]}], got {list(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))


class Step(Protocol):
    name: str

    def random_start(
        self, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator | None
    ) -> torch.Tensor: ...

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor: ...

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor: ...

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class LinfStep:
    """l_inf ball: sign-gradient steps, coordinate-wise clipping."""

    name = "linf"

    def random_start(self, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        noise = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=gen) * 2 - 1
        return (x + noise * eps).clamp(0.0, 1.0)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return x_adv + alpha * grad.sign()

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        delta = torch.clamp(x_adv - x, -eps, eps)
        return (x + delta).clamp(0.0, 1.0)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x_adv - x).flatten(1).abs().amax(dim=1)


class L2Step:
    """l_2 ball: normalized-gradient steps, radial projection."""

    name = "l2"

    def random_start(self, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        # Uniform in the ball: direction uniform on the sphere, radius eps * u^(1/d).
        d = x[0].numel()
        direction = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)
        direction = direction / _flat_norm(direction).clamp_min(1e-12)
        u = torch.rand((x.shape[0],), dtype=x.dtype, device=x.device, generator=gen)
        radius = u.pow(1.0 / d).reshape(-1, *([1] * (x.ndim - 1))) * eps
        return (x + direction * radius).clamp(0.0, 1.0)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return x_adv + alpha * grad / _flat_norm(grad).clamp_min(1e-12)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        delta = x_adv - x
        factor = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta * factor).clamp(0.0, 1.0)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x_adv - x).flatten(1).norm(dim=1)


STEPS: dict[str, type[LinfStep] | type[L2Step]] = {"linf": LinfStep, "l2": L2Step}


def get_step(norm: str) -> LinfStep | L2Step:
    try:
        return STEPS[norm]()
    except KeyError:
        raise KeyError(f"unknown norm {norm!r}; known: {', '.join(sorted(STEPS))}") from None
