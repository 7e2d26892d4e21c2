"""Measuring the typicality detector (docs/typicality.md): AUROC and TPR at a fixed FPR against
out-of-distribution images, PGD images and the adaptive attack that knows the detector."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from training.typicality import Typicality, calibration_split

if TYPE_CHECKING:
    from training.data import FolderOptions


def auroc(negatives: Sequence[float] | np.ndarray, positives: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of ``score``: P(positive > negative), ties counted half
    (the Mann-Whitney statistic)."""
    neg = np.asarray(negatives, dtype=np.float64)
    pos = np.asarray(positives, dtype=np.float64)
    if len(neg) == 0 or len(pos) == 0:
        return math.nan
    both = np.concatenate([neg, pos])
    # Average rank of each distinct value (1-based), so that ties count half.
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]
    r_pos = ranks[len(neg) :].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(negatives: np.ndarray, positives: np.ndarray, fpr: float = 0.05) -> tuple[float, float]:
    """(TPR, threshold) with the threshold at the ``1 - fpr`` quantile of the negatives' scores."""
    t = float(np.quantile(np.asarray(negatives, dtype=np.float64), 1 - fpr, method="higher"))
    return float((np.asarray(positives) > t).mean()) if len(positives) else math.nan, t


def detector_scores(model: torch.nn.Module, typ: Typicality, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The three scores compared in docs/typicality.md, each oriented so that higher = more
    suspicious: Mahalanobis distance, minus the prior log-density, minus the max softmax probability."""
    with torch.no_grad():
        z = model.forward_features(x).float()  # type: ignore[operator]
        probs = torch.softmax(model.forward_head(z).float(), dim=1)  # type: ignore[operator]
        s = typ.scores_torch(z)
    return {
        "mahalanobis": s["mahalanobis"].cpu().numpy(),
        "neg_prior_log_density": (-s["prior_log_density"]).cpu().numpy(),
        "neg_max_softmax": (-probs.max(dim=1).values).cpu().numpy(),
        "pred": probs.argmax(1).cpu().numpy(),
    }


def _rates(
    neg: dict[str, np.ndarray], pos: dict[str, np.ndarray], threshold: float, fpr: float
) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(pos["mahalanobis"])}
    for score in ("mahalanobis", "neg_prior_log_density", "neg_max_softmax"):
        tpr, _ = tpr_at_fpr(neg[score], pos[score], fpr)
        out[score] = {"auroc": round(auroc(neg[score], pos[score]), 4), f"tpr_at_{fpr:g}_fpr": round(tpr, 4)}
    out["flagged_by_served_threshold"] = round(float((pos["mahalanobis"] > threshold).mean()), 4)
    return out


def _subset(scores: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in scores.items()}


def evaluate(
    model: torch.nn.Module,
    typ: Typicality,
    dataset: str,
    *,
    ood: str | None = "fashion-mnist",
    n: int = 5000,
    adv_n: int = 500,
    eps: Sequence[float] = (0.1, 0.2, 0.3),
    steps: int = 40,
    lambdas: Sequence[float] = (0.1, 1.0, 10.0),
    fpr: float = 0.05,
    data_dir: str | None = None,
    seed: int = 0,
    batch_size: int = 250,
    folder: FolderOptions | None = None,
) -> dict[str, Any]:
    """Detection figures on the evaluation half of the test split (never used in calibration):
    (a) against ``ood`` test images, (b) against PGD images, (c) against the adaptive attack.
    Image folders are read with ``folder`` (the model's size and channels); an ``ood`` folder keeps
    its own classes (only its images count)."""
    from training.attacks import build_attack
    from training.data import load_split
    from training.evaluate import to_unit

    device = next(model.parameters()).device
    test = load_split(dataset, "test", data_dir, folder=folder)
    _, eval_idx = calibration_split(len(test), int(typ.info.get("seed", seed)))
    eval_idx = eval_idx[:n]
    x_all = test.images[eval_idx]
    y_all = test.labels[eval_idx]

    def scores_of(images: torch.Tensor) -> dict[str, np.ndarray]:
        parts = [
            detector_scores(model, typ, to_unit(images[s : s + batch_size], device))
            for s in range(0, len(images), batch_size)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    clean = scores_of(x_all)
    result: dict[str, Any] = {
        "dataset": dataset,
        "in_distribution": f"{dataset} test, evaluation half (not used to calibrate), n={len(eval_idx)}",
        "threshold": typ.threshold,
        "fpr_target": typ.fpr,
        "measured_fpr_of_served_threshold": round(float((clean["mahalanobis"] > typ.threshold).mean()), 4),
        "clean_accuracy": round(float((clean["pred"] == y_all.numpy()).mean()), 4),
        "scores": "higher = more suspicious: mahalanobis; neg_prior_log_density; neg_max_softmax (baseline)",
        "rates_fpr": fpr,
    }
    t0 = time.perf_counter()
    if ood:
        ood_folder = dataclasses.replace(folder, classes=None) if folder is not None else None
        other = load_split(ood, "test", None, n=n, seed=seed, folder=ood_folder)
        result["ood"] = {
            "dataset": f"{ood} test",
            **_rates(clean, scores_of(other.images), typ.threshold, fpr),
        }
    gen = torch.Generator(device=device).manual_seed(seed)
    x_adv_src = to_unit(x_all[:adv_n], device)
    y_adv = y_all[:adv_n].to(device)

    def attacked(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], **about: Any) -> dict[str, Any]:
        """Scores of the attacked images (in batches) against the clean ones, with ``about``."""
        adv = torch.cat(
            [
                run(x_adv_src[s : s + batch_size], y_adv[s : s + batch_size])
                for s in range(0, adv_n, batch_size)
            ]
        )
        sc = scores_of(adv)
        fooled = sc["pred"] != y_adv.cpu().numpy()
        unflagged = sc["mahalanobis"] <= typ.threshold
        return {
            **about,
            "fooled": round(float(fooled.mean()), 4),
            "fooled_and_not_flagged": round(float((fooled & unflagged).mean()), 4),
            "all_attacked": _rates(clean, sc, typ.threshold, fpr),
            "fooled_only": _rates(clean, _subset(sc, fooled), typ.threshold, fpr) if fooled.any() else None,
        }

    Run = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    last_iterate_pgd = build_attack("pgd", {"steps": steps, "keep_best": False})

    def plain(e: float) -> Run:
        return lambda x, y: last_iterate_pgd(model, x, y, eps=e, generator=gen)

    def adaptive(e: float, lam: float) -> Run:
        attack = build_attack("adaptive-pgd", {"steps": steps, "lam": lam}, typicality=typ)
        return lambda x, y: attack(model, x, y, eps=e, generator=gen)

    result["pgd"] = [
        attacked(plain(e), eps=e, attack=f"PGD-{steps} l_inf CE, random start, last iterate") for e in eps
    ]
    result["adaptive"] = [
        attacked(
            adaptive(e, lam),
            eps=e,
            attack=f"PGD-{steps} l_inf on CE - lambda * mahalanobis, random start, last iterate",
            **{"lambda": lam},
        )
        for e in eps
        for lam in lambdas
    ]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["adv_n"] = int(min(adv_n, len(eval_idx)))
    return result
