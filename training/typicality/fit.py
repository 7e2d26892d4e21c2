"""Fitting the embedding-typicality score (:class:`training.typicality.Typicality`): class-conditional
Gaussians of the training embeddings and a threshold calibrated on held-out clean test images."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from training.data import FolderOptions
from training.errors import ErcError
from training.typicality import Typicality, calibration_split


class TypicalityFitError(ErcError, ValueError):
    """No training embeddings of a class: its Gaussian has no mean."""


# Eigenvalue floor of every fitted covariance, relative to the mean variance of all the training
# embeddings (pooled over classes); the absolute floor covers embeddings that never vary at all.
FLOOR_REL = 1e-6
FLOOR_ABS = 1e-12


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


def ledoit_wolf(z: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf (2004) shrinkage of the covariance of ``z`` ``[n, k]`` (float64) toward a
    scaled identity: ``(1 - s) S + s (tr S / k) I`` with the shrinkage ``s`` in [0, 1] that
    minimizes the expected Frobenius loss. ``S`` is the maximum-likelihood covariance (divided by
    n). Well conditioned whenever any dimension varies, also with fewer samples than dimensions or
    a constant dimension; returns ``(covariance, s)``."""
    n, k = z.shape
    x = z - z.mean(0)
    s = x.T @ x / n
    mu = float(torch.trace(s)) / k
    target = mu * torch.eye(k, dtype=z.dtype)
    d2 = float(((s - target) ** 2).sum()) / k  # ||S - mu I||^2 with <A, B> = tr(A B^T) / k
    if d2 <= 0.0:  # S is already a multiple of I (or 0): nothing to shrink
        return s, 0.0
    # b^2 = (1 / n^2) sum_i ||x_i x_i^T - S||^2, computed without the n outer products.
    sq = x.pow(2).sum(1)
    b2_sum = float((sq**2).sum()) - 2.0 * float(torch.einsum("ni,ij,nj->", x, s, x)) + n * float((s**2).sum())
    b2 = min(max(b2_sum / k / n**2, 0.0), d2)
    shrink = b2 / d2
    return (1.0 - shrink) * s + shrink * target, shrink


def floor_eigenvalues(cov: torch.Tensor, floor: float) -> torch.Tensor:
    """``cov`` with every eigenvalue raised to at least ``floor`` (symmetric, float64)."""
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    return (vecs * vals.clamp_min(floor)) @ vecs.T


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
    """Class-conditional Gaussians from training embeddings, threshold from held-out clean ones.

    Each class covariance is the Ledoit-Wolf shrinkage estimate (a class with a single embedding
    takes the pooled within-class estimate), its eigenvalues floored at ``FLOOR_REL`` times the
    pooled mean variance (at least ``FLOOR_ABS``): finite scores for any embeddings, degenerate
    ones (a constant dimension, fewer samples than dimensions, all equal) included. The threshold
    is calibrated on the score exactly as the card stores it (:meth:`Typicality.from_fit`).
    """
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    z = z_train.double()
    k = z.shape[1]
    means = torch.zeros(num_classes, k, dtype=torch.float64)
    counts = []
    for c in range(num_classes):
        zc = z[y_train == c]
        if len(zc) == 0:
            raise TypicalityFitError(f"class {c} has no training embeddings: its Gaussian has no mean")
        counts.append(len(zc))
        means[c] = zc.mean(0)
    centred = z - means[y_train]
    pooled, pooled_shrink = ledoit_wolf(centred)
    floor = max(FLOOR_REL * float(z.var(0, unbiased=False).mean()), FLOOR_ABS)
    covs = torch.zeros(num_classes, k, k, dtype=torch.float64)
    shrinkage = []
    for c in range(num_classes):
        zc = z[y_train == c]
        cov, s = ledoit_wolf(zc) if len(zc) > 1 else (pooled, pooled_shrink)
        covs[c] = floor_eigenvalues(cov, floor)
        shrinkage.append(round(s, 6))
    typ = Typicality.from_fit(prior, means.numpy(), covs.numpy(), math.inf, fpr, dict(info or {}))
    maha = typ.scores(z_calib)["mahalanobis"]
    typ.threshold = float(np.quantile(maha, 1 - fpr, method="higher")) if len(maha) else math.inf
    if not math.isfinite(typ.threshold):
        raise TypicalityFitError(f"no finite threshold from {len(maha)} calibration embeddings")
    typ.info.update(
        {
            "fit_n": len(z),
            "fit_class_counts": counts,
            "covariance": "Ledoit-Wolf shrinkage toward a scaled identity, eigenvalues floored at "
            f"{floor:.3g}",
            "shrinkage": shrinkage,
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
    folder: FolderOptions | None = None,
) -> Typicality:
    """Fit on ``fit_n`` training images (all when None) and calibrate on the calibration half of
    the test split (at most ``calibration_n`` of it); an image folder is read with ``folder``."""
    from training.data import load_split

    train = load_split(dataset, "train", data_dir, n=fit_n, seed=seed, folder=folder)
    test = load_split(dataset, "test", data_dir, folder=folder)
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
