"""Accuracy under attack: robust-accuracy curves over eps (the paper's Figure 2 / Table 1), their
95 % confidence intervals, and plots.

Every figure produced here carries the attack settings that made it (attack, norm, steps,
restarts, step size, loss, random start), ``n`` and the seed, so it can be reproduced.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from training.attacks import apgd, pgd, square_linf


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial proportion k/n (well-behaved near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def to_unit(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images (or floats already in [0, 1]) -> float32 in [0, 1] on ``device``."""
    images = images.to(device, non_blocking=True)
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 500, device: torch.device | None = None
) -> torch.Tensor:
    """Predicted labels ``[N]`` for images ``[N, C, H, W]`` (uint8, or float in [0, 1])."""
    device = device or next(model.parameters()).device
    out = [model(to_unit(images[s], device)).argmax(1).cpu() for s in _batches(len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@dataclass
class AttackSpec:
    """How adversarial examples were made; stored next to every robust-accuracy figure."""

    name: str = "pgd"
    norm: str = "linf"
    steps: int = 40
    restarts: int = 1
    alpha: float | None = None  # None: 2.5 * eps / steps
    loss: str = "ce"
    random_start: bool = True
    keep_best: bool = True  # a sample counts as broken if any iterate of any restart fooled the model

    def describe(self) -> str:
        if self.name == "apgd":
            return (
                f"APGD-{self.loss.upper()}-{self.steps} {self.norm}, {self.restarts} restart(s), "
                "step 2*eps halved at Croce & Hein's checkpoints"
            )
        if self.name == "square":
            return (
                f"Square Attack {self.norm}, {self.steps} queries, {self.restarts} restart(s), "
                f"{self.loss} loss (score-based, no gradients)"
            )
        step = "2.5*eps/steps" if self.alpha is None else f"{self.alpha:g}"
        return (
            f"{self.name.upper()}-{self.steps} {self.norm}, {self.restarts} restart(s), step {step}, "
            f"{self.loss} loss, {'random' if self.random_start else 'zero'} start"
        )


@dataclass
class CurvePoint:
    eps: float
    accuracy: float
    correct: int
    n: int
    ci95: tuple[float, float]
    seconds: float


@dataclass
class RobustCurve:
    attack: AttackSpec
    n: int
    seed: int
    clean_accuracy: float
    points: list[CurvePoint] = field(default_factory=list)
    device: str = "cpu"
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attack"]["description"] = self.attack.describe()
        return d

    def accuracy_at(self, eps: float) -> float:
        for p in self.points:
            if math.isclose(p.eps, eps, abs_tol=1e-9):
                return p.accuracy
        raise KeyError(f"no point at eps={eps}")


def robust_flags(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    spec: AttackSpec,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean ``[N]``: correctly classified and not broken by the attack at ``eps``."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    if eps == 0 or not bool(correct.any()):
        return correct
    idx = correct.nonzero().squeeze(1)
    if spec.name == "fgsm":
        x_adv = pgd(
            model,
            x[idx],
            y[idx],
            eps=eps,
            alpha=eps,
            steps=1,
            random_start=False,
            loss=spec.loss,
            keep_best=False,
        )
    elif spec.name == "pgd":
        x_adv = pgd(
            model,
            x[idx],
            y[idx],
            eps=eps,
            alpha=spec.alpha,
            steps=spec.steps,
            norm=spec.norm,
            restarts=spec.restarts,
            random_start=spec.random_start,
            loss=spec.loss,
            keep_best=spec.keep_best,
            generator=generator,
        )
    elif spec.name == "apgd":
        x_adv = apgd(
            model,
            x[idx],
            y[idx],
            eps=eps,
            norm=spec.norm,
            steps=spec.steps,
            restarts=spec.restarts,
            loss=spec.loss,
            generator=generator,
        )
    elif spec.name == "square":
        x_adv = square_linf(
            model,
            x[idx],
            y[idx],
            eps=eps,
            queries=spec.steps,
            restarts=spec.restarts,
            loss=spec.loss,
            generator=generator,
        )
    else:
        raise KeyError(f"unknown attack {spec.name!r} for robust_flags; known: pgd, fgsm, apgd, square")
    with torch.no_grad():
        survived = model(x_adv).argmax(1) == y[idx]
    out = torch.zeros_like(correct)
    out[idx] = survived
    return out


def robust_curve(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps_list: Sequence[float],
    spec: AttackSpec,
    *,
    batch_size: int = 500,
    device: torch.device | None = None,
    seed: int = 0,
    progress: bool = False,
    model_name: str = "",
) -> RobustCurve:
    """Robust accuracy at each eps, attacking each correctly classified test image.

    The model is put in eval mode for the evaluation and restored afterwards.
    """
    device = device or next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    was_training = model.training
    model.eval()
    n = len(images)
    correct = {float(e): 0 for e in eps_list}
    seconds = {float(e): 0.0 for e in eps_list}
    clean = 0
    try:
        bar = tqdm(
            total=n * len(eps_list), disable=not progress, desc="attack", unit="img", dynamic_ncols=True
        )
        for s in _batches(n, batch_size):
            x = to_unit(images[s], device)
            y = labels[s].to(device)
            with torch.no_grad():
                clean += int((model(x).argmax(1) == y).sum())
            for e in eps_list:
                t0 = time.perf_counter()
                flags = robust_flags(model, x, y, float(e), spec, gen)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[float(e)] += time.perf_counter() - t0
                correct[float(e)] += int(flags.sum())
                bar.update(len(x))
        bar.close()
    finally:
        model.train(was_training)
    curve = RobustCurve(
        attack=spec, n=n, seed=seed, clean_accuracy=clean / max(n, 1), device=str(device), model=model_name
    )
    for e in eps_list:
        k = correct[float(e)]
        curve.points.append(
            CurvePoint(float(e), k / max(n, 1), k, n, wilson_interval(k, n), round(seconds[float(e)], 3))
        )
    return curve


def plot_curves(curves: Sequence[tuple[str, RobustCurve]], path: str | Path, title: str = "") -> Path:
    """Accuracy (%) against eps, one line per labelled curve, with 95 % CI bands (Figure 2 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for label, curve in curves:
        eps = [p.eps for p in curve.points]
        acc = [100 * p.accuracy for p in curve.points]
        lo = [100 * p.ci95[0] for p in curve.points]
        hi = [100 * p.ci95[1] for p in curve.points]
        (line,) = ax.plot(eps, acc, marker="o", markersize=3, label=label)
        ax.fill_between(eps, lo, hi, alpha=0.2, color=line.get_color())
    ax.set_xlabel("eps (l_inf, images in [0, 1])")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if curves:
        first = curves[0][1]
        ax.set_title(title or f"{first.attack.describe()}, n={first.n}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
