"""Embedding typicality: how usual an input's embedding is, as a per-request signal of
out-of-distribution or attacked inputs.

The ER-Classifier pushes the embeddings of real data toward a known prior, so two scores are cheap
at serving time (an MLP-free computation on ``k`` numbers):

- ``prior_log_density``: log-density of the embedding under the model's prior (low = atypical);
- ``mahalanobis``: the smallest Mahalanobis distance of the embedding to the class-conditional
  Gaussians fitted to the training embeddings (per-class mean and covariance; Lee et al., 2018,
  without their input preprocessing; high = atypical).

``atypical`` is ``mahalanobis > threshold``, the threshold being the ``1 - fpr`` quantile of the
scores of held-out clean images: by construction about ``fpr`` of clean images are flagged.

Held-out data: the first half of a seeded permutation of the test split calibrates the threshold
(:func:`calibration_split`); the second half is left for measuring the detector
(``erc typicality eval``), so the false-positive rate it reports is measured, not assumed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from training.attacks.steps import LinfStep, per_sample
from training.priors import get_prior

SCORE = "mahalanobis"
RIDGE = 1e-4  # added to each covariance's diagonal, times its mean variance: keeps it invertible


def calibration_split(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) indices of a test split of ``n`` images: two seeded halves."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2 :]


@dataclass
class Typicality:
    prior: str
    means: np.ndarray  # [m, k]
    precisions: np.ndarray  # [m, k, k], inverses of the (ridged) class covariances
    covariances: np.ndarray  # [m, k, k]
    threshold: float  # on the minimum Mahalanobis distance
    fpr: float  # the false-positive rate the threshold was calibrated to
    info: dict[str, Any]  # how it was fitted and calibrated (data, n, seed, measured rates)

    # -- scores ----------------------------------------------------------------------------------
    def mahalanobis_torch(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable ``[N]`` minimum class-conditional Mahalanobis distance of ``z`` ``[N, k]``."""
        mu = torch.as_tensor(self.means, dtype=z.dtype, device=z.device)
        prec = torch.as_tensor(self.precisions, dtype=z.dtype, device=z.device)
        d = z[:, None, :] - mu[None]  # [N, m, k]
        sq = torch.einsum("nmi,mij,nmj->nm", d, prec, d).clamp_min(0)
        return sq.min(dim=1).values.sqrt()

    def scores_torch(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        z = z.float()
        maha = self.mahalanobis_torch(z)
        return {
            "prior_log_density": get_prior(self.prior).log_prob(z),
            "mahalanobis": maha,
            "atypical": maha > self.threshold,
        }

    def scores(self, z: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        t = torch.as_tensor(z)
        with torch.no_grad():
            return {k: v.cpu().numpy() for k, v in self.scores_torch(t).items()}

    # -- the card --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "score": SCORE,
            "prior": self.prior,
            "class_means": self.means.round(7).tolist(),
            "class_covariances": self.covariances.round(9).tolist(),
            "threshold": round(float(self.threshold), 6),
            "fpr": self.fpr,
            **self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Typicality:
        means = np.asarray(d["class_means"], dtype=np.float64)
        cov = np.asarray(d["class_covariances"], dtype=np.float64)
        if means.ndim != 2 or cov.shape != (means.shape[0], means.shape[1], means.shape[1]):
            raise ValueError(f"typicality: class means {means.shape} and covariances {cov.shape} disagree")
        known = {"score", "prior", "class_means", "class_covariances", "threshold", "fpr"}
        return cls(
            prior=str(d["prior"]),
            means=means.astype(np.float32),
            precisions=np.linalg.inv(cov).astype(np.float32),
            covariances=cov.astype(np.float32),
            threshold=float(d["threshold"]),
            fpr=float(d["fpr"]),
            info={k: v for k, v in d.items() if k not in known},
        )


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Embeddings ``[N, k]`` (float32, CPU) of uint8 or [0, 1] float images."""
    from training.evaluate import to_unit

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        out = [
            model.forward_features(to_unit(images[s : s + batch_size], device)).float().cpu()  # type: ignore[operator]
            for s in range(0, len(images), batch_size)
        ]
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def fit(
    z_train: torch.Tensor,
    y_train: torch.Tensor,
    z_calib: torch.Tensor,
    *,
    num_classes: int,
    prior: str,
    fpr: float = 0.05,
    info: dict[str, Any] | None = None,
) -> Typicality:
    """Class-conditional Gaussians from training embeddings, threshold from held-out clean ones."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    z = z_train.double()
    k = z.shape[1]
    means = torch.zeros(num_classes, k, dtype=torch.float64)
    covs = torch.zeros(num_classes, k, k, dtype=torch.float64)
    counts = []
    for c in range(num_classes):
        zc = z[y_train == c]
        if len(zc) < k + 1:
            raise ValueError(f"class {c} has {len(zc)} training embeddings; need at least {k + 1}")
        counts.append(len(zc))
        means[c] = zc.mean(0)
        cov = torch.cov(zc.T).reshape(k, k)
        covs[c] = cov + RIDGE * cov.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    typ = Typicality(
        prior=prior,
        means=means.float().numpy(),
        precisions=torch.linalg.inv(covs).float().numpy(),
        covariances=covs.float().numpy(),
        threshold=math.inf,
        fpr=fpr,
        info=dict(info or {}),
    )
    maha = typ.scores(z_calib)["mahalanobis"]
    typ.threshold = float(np.quantile(maha, 1 - fpr, method="higher"))
    typ.info.update(
        {
            "fit_n": len(z),
            "fit_class_counts": counts,
            "calibration_n": len(z_calib),
            "calibration_flagged": round(float((maha > typ.threshold).mean()), 6),
        }
    )
    return typ


def fit_for_model(
    model: torch.nn.Module,
    dataset: str,
    prior: str,
    num_classes: int,
    *,
    fit_n: int | None = None,
    calibration_n: int | None = None,
    fpr: float = 0.05,
    data_dir: str | None = None,
    seed: int = 0,
) -> Typicality:
    """Fit on ``fit_n`` training images (all when None) and calibrate on the calibration half of
    the test split (at most ``calibration_n`` of it)."""
    from training.data import load_split

    train = load_split(dataset, "train", data_dir, n=fit_n, seed=seed)
    test = load_split(dataset, "test", data_dir)
    calib_idx, _ = calibration_split(len(test), seed)
    if calibration_n is not None:
        calib_idx = calib_idx[:calibration_n]
    t0 = time.perf_counter()
    z_train = embed(model, train.images)
    z_calib = embed(model, test.images[calib_idx])
    info = {
        "fit_data": f"{dataset} train, {len(train)} images"
        + (f" (seeded subset, seed {seed})" if fit_n else ""),
        "calibration_data": (
            f"{dataset} test, the first half of randperm({len(test)}, seed {seed}): {len(calib_idx)} images; "
            "the other half is held out for evaluation"
        ),
        "seed": seed,
    }
    typ = fit(z_train, train.labels, z_calib, num_classes=num_classes, prior=prior, fpr=fpr, info=info)
    typ.info["fit_seconds"] = round(time.perf_counter() - t0, 2)
    return typ


# -- measuring the detector ------------------------------------------------------------------------
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


def adaptive_pgd(
    model: torch.nn.Module,
    typ: Typicality,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 40,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """l_inf PGD that maximises ``CE(C(Q(x')), y) - lam * mahalanobis(Q(x'))``: misclassify while
    keeping the embedding typical (the attack that knows the detector). Random start, step
    ``2.5 eps / steps``; returns the last iterate."""
    step = LinfStep()
    eps_t = per_sample(eps, x)
    alpha = 2.5 * eps_t / steps
    x_adv = step.random_start(x, eps_t, generator).detach()
    was = model.training
    model.eval()
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            z = model.forward_features(x_adv)  # type: ignore[operator]
            logits = model.forward_head(z)  # type: ignore[operator]
            loss = (
                F.cross_entropy(logits.float(), y, reduction="sum")
                - lam * typ.mahalanobis_torch(z.float()).sum()
            )
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = step.project(step.step(x_adv.detach(), grad, alpha), x, eps_t)
    finally:
        model.train(was)
    return x_adv.detach()


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
) -> dict[str, Any]:
    """Detection figures on the evaluation half of the test split (never used in calibration):
    (a) against ``ood`` test images, (b) against PGD images, (c) against the adaptive attack."""
    from training.attacks import pgd
    from training.data import load_split
    from training.evaluate import to_unit

    device = next(model.parameters()).device
    test = load_split(dataset, "test", data_dir)
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
        other = load_split(ood, "test", None, n=n, seed=seed)
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

    Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def plain(e: float) -> Attack:
        return lambda x, y: pgd(model, x, y, eps=e, steps=steps, keep_best=False, generator=gen)

    def adaptive(e: float, lam: float) -> Attack:
        return lambda x, y: adaptive_pgd(model, typ, x, y, eps=e, steps=steps, lam=lam, generator=gen)

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
