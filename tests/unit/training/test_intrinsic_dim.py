from __future__ import annotations

import pytest
import torch

from training.intrinsic_dim import levina_bickel


def _subspace(n: int, d: int, ambient: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(ambient, d, generator=gen, dtype=torch.float64))[0]
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ basis.T


@pytest.mark.parametrize("d", [2, 5, 10])
@pytest.mark.parametrize("averaging", ["levina", "mackay"])
def test_recovers_the_dimension_of_a_linear_manifold(d: int, averaging: str) -> None:
    x = _subspace(2000, d, 50)
    est = levina_bickel(x, 10, 20, averaging=averaging).estimate
    # Gaussian data on a d-dim subspace: no boundary; the MLE still underestimates a little as d grows.
    assert abs(est - d) <= 0.15 * d + 0.3, est


def test_higher_dimension_gives_higher_estimate() -> None:
    low = levina_bickel(_subspace(1000, 3, 30)).estimate
    high = levina_bickel(_subspace(1000, 12, 30)).estimate
    assert high > 2 * low


def test_duplicates_are_removed_and_reported() -> None:
    x = _subspace(500, 3, 10)
    res = levina_bickel(torch.cat([x, x[:100]]), 6, 12)
    assert res.n == 500 and res.ambient_dim == 10
    assert set(res.per_k) == set(range(6, 13))


def test_k_minus_1_normalization_is_larger() -> None:
    x = _subspace(800, 4, 20)
    a = levina_bickel(x, 6, 12, normalization="k-2").estimate
    b = levina_bickel(x, 6, 12, normalization="k-1").estimate
    assert b > a


@pytest.mark.parametrize("k1,k2", [(1, 5), (8, 6), (5, 600)])
def test_invalid_k(k1: int, k2: int) -> None:
    with pytest.raises(ValueError, match="k1"):
        levina_bickel(_subspace(500, 3, 10), k1, k2)
