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
    """Too few training embeddings of a class to fit its Gaussian."""


RIDGE = 1e-4  # added to each covariance's diagonal, times its mean variance: keeps it invertible


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
            raise TypicalityFitError(
                f"class {c} has {len(zc)} training embeddings; a {k}-d Gaussian needs at least {k + 1}"
            )
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
