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

This module is the serve-time score only (what the service imports); fitting lives in
:mod:`training.typicality.fit`, measuring the detector in :mod:`training.typicality.evaluate`, and the
adaptive attack on it in the attack registry (``adaptive-pgd``, :mod:`training.attacks.adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.priors import get_prior

SCORE = "mahalanobis"


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
