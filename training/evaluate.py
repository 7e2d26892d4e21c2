"""Accuracy under attack: robust-accuracy curves over eps (the paper's Figure 2 / Table 1), their
95 % confidence intervals, and plots.

Every figure produced here carries the attack settings that made it (attack, norm, steps,
restarts, step size, loss, random start), ``n`` and the seed, so it can be reproduced.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from training.attacks import Attack, Suite

if TYPE_CHECKING:
    from training.data import FolderOptions


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
class CurvePoint:
    eps: float
    accuracy: float
    correct: int
    n: int
    ci95: tuple[float, float]
    seconds: float


@dataclass
class RobustCurve:
    attack: dict[str, Any]  # Suite.record(): name, norm, label, description, every parameter
    n: int
    seed: int
    clean_accuracy: float
    points: list[CurvePoint] = field(default_factory=list)
    device: str = "cpu"
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def description(self) -> str:
        return str(self.attack["description"])

    def accuracy_at(self, eps: float) -> float:
        for p in self.points:
            if math.isclose(p.eps, eps, abs_tol=1e-9):
                return p.accuracy
        raise KeyError(f"no point at eps={eps}")


def as_suite(attack: Attack | Suite) -> Suite:
    return attack if isinstance(attack, Suite) else Suite((attack,))


def robust_flags(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    attack: Attack | Suite,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean ``[N]``: correctly classified and not broken by any attack of the suite at ``eps``.

    Each attack runs only on the samples every earlier one failed on: the per-sample worst case is
    the same as running each on all, for less work.
    """
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    if eps == 0:
        return robust
    for a in as_suite(attack).attacks:
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        x_adv = a(model, x[idx], y[idx], eps=eps, generator=generator)
        with torch.no_grad():
            robust[idx] = model(x_adv).argmax(1) == y[idx]
    return robust


def robust_curve(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps_list: Sequence[float],
    attack: Attack | Suite,
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
    suite = as_suite(attack)
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
                flags = robust_flags(model, x, y, float(e), suite, gen)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[float(e)] += time.perf_counter() - t0
                correct[float(e)] += int(flags.sum())
                bar.update(len(x))
        bar.close()
    finally:
        model.train(was_training)
    curve = RobustCurve(
        attack=suite.record(),
        n=n,
        seed=seed,
        clean_accuracy=clean / max(n, 1),
        device=str(device),
        model=model_name,
    )
    for e in eps_list:
        k = correct[float(e)]
        curve.points.append(
            CurvePoint(float(e), k / max(n, 1), k, n, wilson_interval(k, n), round(seconds[float(e)], 3))
        )
    return curve


def evaluate_on_test(
    model: nn.Module,
    dataset: str,
    eps_list: list[float],
    attack: Attack | Suite,
    *,
    n: int | None,
    seed: int = 0,
    data_dir: str | None = None,
    batch_size: int = 500,
    progress: bool = False,
    model_name: str = "",
    folder: FolderOptions | None = None,
) -> RobustCurve:
    """:func:`robust_curve` on ``n`` images of a seeded draw of ``dataset``'s test split (all if None);
    an image folder is read with ``folder`` (the model's :meth:`~training.card.ModelCard.folder_options`)."""
    from training.data import load_split

    test = load_split(dataset, "test", data_dir, n=n, seed=seed, folder=folder)
    device = next(model.parameters()).device
    return robust_curve(
        model,
        test.images,
        test.labels,
        eps_list,
        attack,
        batch_size=batch_size,
        device=device,
        seed=seed,
        progress=progress,
        model_name=model_name,
    )


def command_line() -> str:
    """How this process was invoked, for the provenance of measured figures."""
    argv = sys.argv[:]
    if argv and argv[0].endswith(("erc", "cli.py", "__main__.py")):
        argv[0] = "erc"
    return " ".join(shlex.quote(a) for a in argv)


def metric_entry(
    *,
    correct: int,
    n: int,
    eps: float,
    attack: dict[str, Any] | None,
    dataset: str,
    seed: int | None,
    device: str,
    measured_on: str,
    sha: str | None,
    command: str | None = None,
) -> dict[str, Any]:
    """One card metric: accuracy (eps 0) or robust accuracy under ``attack`` (its record), with its
    n, 95 % interval, data, seed, device, the weights it was measured on and the command that
    measured it (default: this process's)."""
    lo, hi = wilson_interval(correct, n)
    clean = eps == 0
    return {
        "metric": "accuracy" if clean else "robust_accuracy",
        "value": round(correct / n, 6) if n else 0.0,
        "correct": correct,
        "n": n,
        "ci95": [round(lo, 6), round(hi, 6)],
        "eps": eps,
        "norm": (attack or {}).get("norm", "linf"),
        "attack": None if clean else attack,
        "dataset": dataset,
        "split": "test",
        "seed": seed,
        "device": device,
        "measured_on": measured_on,
        "weights_sha256": sha,
        "command": command or command_line(),
    }


def curve_metrics(
    curve: RobustCurve, dataset: str, measured_on: str, sha: str | None
) -> list[dict[str, Any]]:
    """Card metric entries (one per eps) from a robust-accuracy curve."""
    return [
        metric_entry(
            correct=p.correct,
            n=p.n,
            eps=p.eps,
            attack=curve.attack,
            dataset=dataset,
            seed=curve.seed,
            device=curve.device,
            measured_on=measured_on,
            sha=sha,
        )
        for p in curve.points
    ]


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
        ax.set_title(title or f"{first.description}, n={first.n}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
