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
    precisions: np.ndarray  # [m, k, k], inverses of the (shrunk) class covariances
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
    @classmethod
    def from_fit(
        cls,
        prior: str,
        means: np.ndarray,
        covariances: np.ndarray,
        threshold: float,
        fpr: float,
        info: dict[str, Any],
    ) -> Typicality:
        """The score exactly as the card will store it: means and covariances as float32 (the
        card's numbers), precisions inverted from those in float64, so that a card read back scores
        every input as the fitted object does."""
        means32 = np.asarray(means, dtype=np.float32)
        cov32 = np.asarray(covariances, dtype=np.float32)
        return cls(
            prior=prior,
            means=means32,
            precisions=_precisions(cov32),
            covariances=cov32,
            threshold=float(threshold),
            fpr=float(fpr),
            info=info,
        )

    def to_dict(self) -> dict[str, Any]:
        # float32 values written as the doubles that equal them: read back, they are the same numbers.
        return {
            "score": SCORE,
            "prior": self.prior,
            "class_means": np.asarray(self.means, dtype=np.float32).tolist(),
            "class_covariances": np.asarray(self.covariances, dtype=np.float32).tolist(),
            "threshold": float(self.threshold),
            "fpr": self.fpr,
            **self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Typicality:
        """The score a card stores; ``ValueError`` naming the problem for a section that cannot
        give finite scores (missing keys, shapes that disagree, covariances that are not symmetric
        positive definite, a threshold that is not a number)."""
        known = {"score", "prior", "class_means", "class_covariances", "threshold", "fpr"}
        missing = sorted(k for k in known - {"score"} if k not in d)
        if missing:
            raise ValueError(f"typicality: missing {', '.join(missing)}")
        try:
            means = np.asarray(d["class_means"], dtype=np.float64)
            cov = np.asarray(d["class_covariances"], dtype=np.float64)
            threshold, fpr = float(d["threshold"]), float(d["fpr"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"typicality: not numbers: {exc}") from None
        if means.ndim != 2 or cov.shape != (means.shape[0], means.shape[1], means.shape[1]):
            raise ValueError(f"typicality: class means {means.shape} and covariances {cov.shape} disagree")
        if not (np.isfinite(means).all() and np.isfinite(cov).all() and np.isfinite(threshold)):
            raise ValueError("typicality: class means, covariances and threshold must be finite")
        try:  # an unknown prior is refused here, not at the first request
            get_prior(str(d["prior"]))
        except KeyError as exc:
            raise ValueError(f"typicality: {exc}") from None
        return cls.from_fit(
            str(d["prior"]),
            means,
            cov,
            threshold,
            fpr,
            {k: v for k, v in d.items() if k not in known},
        )


def _precisions(cov: np.ndarray) -> np.ndarray:
    """Inverses (float32) of ``[m, k, k]`` covariances, computed in float64; each must be symmetric
    positive definite (a Cholesky factor exists), else ``ValueError`` naming the class."""
    out = np.empty(cov.shape, dtype=np.float32)
    for c, s in enumerate(np.asarray(cov, dtype=np.float64)):
        if not np.allclose(s, s.T, rtol=1e-5, atol=1e-12):
            raise ValueError(f"typicality: the covariance of class {c} is not symmetric")
        try:
            chol = np.linalg.cholesky(s)
        except np.linalg.LinAlgError:
            raise ValueError(f"typicality: the covariance of class {c} is not positive definite") from None
        inv_chol = np.linalg.inv(chol)
        out[c] = inv_chol.T @ inv_chol
    return out
