"""Square Attack, l_inf version (Andriushchenko, Croce, Flammarion & Hein, 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search", ECCV 2020).

A score-based black-box attack: the model is only queried (forward passes under
``torch.no_grad()``), never differentiated, so it also evaluates models whose gradients are masked
or obfuscated. Random search over perturbations at the corners of the l_inf ball:

1. start from vertical stripes: every column of every channel moved by ``+eps`` or ``-eps``;
2. each iteration, pick a square window at a random position, with a side length that shrinks on
   the paper's schedule, and set the perturbation inside it to ``+eps`` or ``-eps`` per channel;
3. keep the proposal if it lowers the loss (the margin ``z_y - max_{i != y} z_i`` by default);
   a sample stops being queried as soon as it is misclassified.

The function keeps the attack contract of :mod:`training.attacks.pgd` (l_inf ball and [0, 1],
model mode and parameters untouched, per-sample ``eps``, randomness from ``generator``).

Beyond the paper's pseudocode: window position and signs are drawn per sample; a proposal that
would leave the image unchanged is redrawn (up to 16 times) rather than spending a query on it;
the clean image costs one query (a sample already misclassified is returned as is); and restarts
only attack samples that no earlier run fooled.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from training.attacks.catalog import AttackDef, Model, register
from training.attacks.pgd import margin_loss
from training.attacks.steps import Radius, per_sample

# Iterations (of a 10,000-iteration run) after which the fraction p of changed pixels halves.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# Proposals equal to the current image waste a query; redraw their signs up to this many times.
_REDRAWS = 16
_LOSSES = ("ce", "margin")


def square_p(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of pixels a square covers at iteration ``it`` of ``n_iters``.

    The paper halves ``p`` at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a
    10,000-iteration budget; other budgets rescale the iteration to that scale first.
    """
    scaled = int(it * 10000 / n_iters)
    return p_init / 2 ** sum(scaled > t for t in _HALVINGS)


def square_side(p: float, height: int, width: int) -> int:
    """Side of the square covering a fraction ``p`` of an ``height x width`` image (at least 1 pixel)."""
    return min(max(round(math.sqrt(p * height * width)), 1), height, width)


def _loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample loss to *minimize*, in float32: the margin ``z_y - max_{i != y} z_i`` or ``-CE``."""
    if name == "margin":
        return -margin_loss(logits.float(), y)
    if name == "ce":
        return -F.cross_entropy(logits.float(), y, reduction="none")
    raise ValueError(f"unknown Square loss {name!r}; known: {', '.join(_LOSSES)}")


def _signs(shape: tuple[int, ...], x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Uniform random signs in {-1, +1} of ``shape``, in x's dtype and device."""
    bits = torch.randint(0, 2, shape, generator=gen, device=x.device)
    return (bits * 2 - 1).to(x.dtype)


def stripes_init(x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Vertical-stripes start: each column of each channel shifted by ``+-eps``, clipped to [0, 1].

    Args:
        x: images ``[N, C, H, W]`` in [0, 1].
        eps: radii broadcastable to ``[N, 1, 1, 1]``.
        gen: RNG; the first draw of :func:`square_linf` is this one.
    """
    n, c, _, w = x.shape
    return (x + eps * _signs((n, c, 1, w), x, gen)).clamp(0.0, 1.0)


def _window(n: int, side: int, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Masks ``[n, 1, H, W]`` of one ``side x side`` square per sample, at uniform random positions."""
    height, width = x.shape[-2:]
    top = torch.randint(0, height - side + 1, (n, 1), generator=gen, device=x.device)
    left = torch.randint(0, width - side + 1, (n, 1), generator=gen, device=x.device)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    in_rows = (rows >= top) & (rows < top + side)  # [n, H]
    in_cols = (cols >= left) & (cols < left + side)  # [n, W]
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


@torch.no_grad()
def square_linf(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Radius,
    queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    loss: str = "margin",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted l_inf Square Attack.

    Args:
        model: images in [0, 1] -> logits ``[N, K]``; only called, under ``torch.no_grad()``.
        x: clean images ``[N, C, H, W]`` in [0, 1].
        y: true labels ``[N]`` (int64).
        eps: radius, float or ``[N]``.
        queries: model evaluations allowed per sample and restart. The first restart spends one on
            the clean image (a misclassified sample is done) and one on the stripes start; every
            later restart one on its start; each iteration one per sample still robust.
        p_init: initial fraction of the pixels a square covers (the paper's 0.8 for l_inf).
        restarts: independent runs for the samples no earlier run has fooled.
        loss: ``"margin"`` (the paper's) or ``"ce"`` (cross-entropy, maximized).
        generator: RNG for the stripes, windows and signs (reproducible attacks).

    Returns:
        Adversarial images ``[N, C, H, W]`` in [0, 1], within ``eps`` of ``x`` in l_inf, detached:
        per sample the first point found that the model misclassifies (``x`` itself if it already
        is), else the point of lowest loss over all restarts.
    """
    if queries < 2 or restarts < 1:
        raise ValueError(f"need queries >= 2 and restarts >= 1, got queries={queries}, restarts={restarts}")
    if not 0.0 < p_init <= 1.0:
        raise ValueError(f"need p_init in (0, 1], got {p_init}")
    if loss not in _LOSSES:
        raise ValueError(f"unknown Square loss {loss!r}; known: {', '.join(_LOSSES)}")
    x = x.detach()
    y = y.detach()
    n, c, height, width = x.shape
    eps_t = per_sample(eps, x)

    logits = model(x)
    out = x.clone()
    fooled = logits.argmax(dim=1) != y
    best_loss = torch.full((n,), math.inf, device=x.device)

    for r in range(restarts):
        # A zero radius leaves nothing to search: such samples only get the clean query.
        idx = (~fooled & (eps_t.flatten() > 0)).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xs, ys, es = x[idx], y[idx], eps_t[idx]
        cur = stripes_init(xs, es, generator)
        logits = model(cur)
        cur_loss = _loss(loss, logits, ys)
        done = logits.argmax(dim=1) != ys
        n_iters = queries - (2 if r == 0 else 1)
        for it in range(n_iters):
            act = (~done).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            side = square_side(square_p(p_init, it, queries), height, width)
            base, clean, radius = cur[act], xs[act], es[act]
            mask = _window(act.numel(), side, xs, generator)
            signs = _signs((act.numel(), c, 1, 1), xs, generator)
            for attempt in range(_REDRAWS + 1):
                cand = torch.where(mask, (clean + radius * signs).clamp(0.0, 1.0), base)
                # A window already at these corners would cost a query for nothing (for one-channel
                # images that is half the proposals once squares overlap): redraw its signs.
                same = (cand - base).flatten(1).abs().amax(dim=1) < 1e-7
                if attempt == _REDRAWS or not same.any():
                    break
                fresh = _signs((act.numel(), c, 1, 1), xs, generator)
                signs = torch.where(same[:, None, None, None], fresh, signs)
            logits = model(cand)
            new_loss = _loss(loss, logits, ys[act])
            hit = logits.argmax(dim=1) != ys[act]
            # A misclassified proposal is kept even if (with the CE loss) it does not lower the loss.
            accept = (new_loss < cur_loss[act]) | hit
            take = act[accept]
            cur[take] = cand[accept]
            cur_loss[take] = new_loss[accept]
            done[act[hit]] = True

        out[idx[done]] = cur[done]
        fooled[idx[done]] = True
        keep = ~done & (cur_loss < best_loss[idx])
        out[idx[keep]] = cur[keep]
        best_loss[idx[keep]] = cur_loss[keep]
    return out.detach()


SQUARE = register(
    AttackDef(
        name="square",
        fn=square_linf,
        norms=("linf",),
        defaults={"queries": 1000, "restarts": 1},
        label=lambda p: f"Square-{p['queries']}" + (f"x{p['restarts']}" if p["restarts"] != 1 else ""),
        cost=lambda p: p["queries"] * p["restarts"] / 3.0,  # forward-only queries
        gradient=False,
        iterative=False,
        description="Square Attack (Andriushchenko et al. 2020): score-based random search, no gradients",
        choices={"loss": _LOSSES},
    )
)

__all__ = ["square_linf", "square_p", "square_side", "stripes_init"]
