"""Embedding typicality: the fit recovers class-conditional Gaussians, the threshold flags the
calibrated share of held-out clean points, AUROC is the Mann-Whitney statistic, the card round
trip keeps every score, and export / ``erc typicality fit`` store it without touching the weights."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.card import read_card, sha256_file
from training.config import load_config
from training.export import add_typicality, export_run
from training.train import run_training
from training.typicality import Typicality, calibration_split
from training.typicality.evaluate import auroc, tpr_at_fpr
from training.typicality.fit import fit


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian classes in 2-D with known means and (diagonal) covariances."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    means = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    scales = torch.tensor([[1.0, 0.5], [0.5, 2.0], [1.0, 1.0]])
    z = means[y] + torch.randn(n, 2, generator=gen) * scales[y]
    return z, y


def test_fit_recovers_the_classes_and_calibrates_the_threshold() -> None:
    z, y = _clusters(6000, 0)
    z_cal, _ = _clusters(4000, 1)
    typ = fit(z, y, z_cal, num_classes=3, prior="gaussian", fpr=0.05)
    assert np.allclose(typ.means, [[0, 0], [6, 0], [0, 6]], atol=0.1)
    assert np.allclose(
        np.diagonal(typ.covariances, axis1=1, axis2=2), [[1, 0.25], [0.25, 4], [1, 1]], rtol=0.1
    )
    assert typ.info["calibration_flagged"] == pytest.approx(0.05, abs=0.002)
    # Held-out points from the same distribution: about 5 % flagged.
    z_new, _ = _clusters(4000, 2)
    assert typ.scores(z_new)["atypical"].mean() == pytest.approx(0.05, abs=0.015)
    # The distance is the class-conditional one: (3, 0) is 3 sd from class 0 along x, 6 along x
    # from class 1 (sd 0.5), so min = 3; far away is atypical.
    s = typ.scores(torch.tensor([[3.0, 0.0], [30.0, 30.0]]))
    assert s["mahalanobis"][0] == pytest.approx(3.0, rel=0.05)
    assert s["atypical"][1]
    # Prior log-density of N(0, I) at the origin in 2-D: -log(2 pi).
    assert typ.scores(torch.zeros(1, 2))["prior_log_density"][0] == pytest.approx(-math.log(2 * math.pi))


def test_card_round_trip_keeps_every_score() -> None:
    z, y = _clusters(3000, 0)
    typ = fit(z, y, z[:500], num_classes=3, prior="cauchy", fpr=0.1, info={"seed": 0})
    back = Typicality.from_dict(typ.to_dict())
    probe = torch.randn(50, 2) * 4
    a, b = typ.scores(probe), back.scores(probe)
    assert np.allclose(a["mahalanobis"], b["mahalanobis"], rtol=1e-4, atol=1e-4)
    assert np.array_equal(a["atypical"], b["atypical"]) and back.prior == "cauchy" and back.fpr == 0.1
    assert back.info["seed"] == 0 and back.info["fit_n"] == 3000
    bad = typ.to_dict()
    bad["class_covariances"] = bad["class_covariances"][:2]
    with pytest.raises(ValueError, match="disagree"):
        Typicality.from_dict(bad)
    with pytest.raises(ValueError, match="fpr"):
        fit(z, y, z, num_classes=3, prior="gaussian", fpr=1.5)
    with pytest.raises(ValueError, match="class 3"):
        fit(z, y, z, num_classes=4, prior="gaussian")


def _degenerate(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings no plain covariance can be inverted for."""
    gen = torch.Generator().manual_seed(0)
    if kind == "constant dimension":  # one coordinate never moves (a dead unit)
        z = torch.randn(90, 4, generator=gen)
        z[:, 2] = 1.5
        return z, torch.arange(90) % 3
    if kind == "fewer samples than dimensions":  # 5 images a class, 8 dimensions
        return torch.randn(15, 8, generator=gen), torch.arange(15) % 3
    if kind == "all equal":  # the model that learned nothing (issue 25)
        return torch.full((60, 4), 0.25), torch.arange(60) % 3
    if kind == "one sample in a class":
        z = torch.randn(41, 3, generator=gen)
        return z, torch.cat([torch.arange(40) % 2, torch.tensor([2])])
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["constant dimension", "fewer samples than dimensions", "all equal", "one sample in a class"]
)
def test_degenerate_embeddings_give_finite_scores_and_the_card_round_trips(kind: str) -> None:
    z, y = _degenerate(kind)
    typ = fit(z, y, z, num_classes=3, prior="gaussian")
    assert np.isfinite(typ.threshold)
    for c in typ.covariances:
        assert np.linalg.eigvalsh(c.astype(np.float64)).min() > 0
    probe = torch.cat([z[:10], torch.randn(10, z.shape[1]) * 3])
    scores = typ.scores(probe)
    assert all(np.isfinite(scores[k]).all() for k in ("mahalanobis", "prior_log_density"))
    # What the card stores is what was fitted: read back, every score is the same number.
    back = Typicality.from_dict(json.loads(json.dumps(typ.to_dict())))
    again = back.scores(probe)
    assert np.array_equal(scores["mahalanobis"], again["mahalanobis"])
    assert np.array_equal(scores["atypical"], again["atypical"]) and back.threshold == typ.threshold
    assert "Ledoit-Wolf" in back.info["covariance"] and len(back.info["shrinkage"]) == 3


def test_shrinkage_is_small_with_plenty_of_data_and_large_with_little() -> None:
    """Classes 0 and 1 are far from a multiple of the identity: thousands of samples need almost
    no shrinkage, eight need more. Class 2's covariance is the identity: shrinking toward it is
    right at any size (Ledoit-Wolf gives 1)."""
    z, y = _clusters(6000, 0)
    plenty = fit(z, y, z[:100], num_classes=3, prior="gaussian").info["shrinkage"]
    few = fit(z[:24], y[:24], z[:24], num_classes=3, prior="gaussian").info["shrinkage"]
    assert max(plenty[:2]) < 0.01 and min(few[:2]) > max(plenty[:2]) and plenty[2] > 0.5


def test_a_card_that_cannot_give_finite_scores_is_refused_with_its_reason() -> None:
    z, y = _clusters(600, 0)
    good = fit(z, y, z[:100], num_classes=3, prior="gaussian").to_dict()
    cases = {
        "not positive definite": {"class_covariances": [[[0.0, 0.0], [0.0, 0.0]]] * 3},
        "not symmetric": {"class_covariances": [[[1.0, 0.5], [0.0, 1.0]]] * 3},
        "finite": {"threshold": float("nan")},
        "missing class_means": {"class_means": None},
        "unknown prior": {"prior": "laplace"},
    }
    for why, change in cases.items():
        bad = {**good, **change}
        if change.get("class_means", 0) is None:
            del bad["class_means"]
        with pytest.raises(ValueError, match=why.split()[-1] if why != "unknown prior" else "prior"):
            Typicality.from_dict(bad)


def test_auroc_is_the_mann_whitney_statistic() -> None:
    assert auroc([0, 1, 2], [3, 4]) == 1.0 and auroc([3, 4], [0, 1, 2]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(0)
    neg, pos = rng.integers(0, 10, 40), rng.integers(3, 13, 30)  # many ties
    pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for p, q in itertools.product(pos, neg)]
    assert auroc(neg, pos) == pytest.approx(float(np.mean(pairs)))
    assert math.isnan(auroc([], [1.0]))
    tpr, t = tpr_at_fpr(np.arange(100.0), np.array([50.0, 96.0, 99.5]), fpr=0.05)
    assert t == 95.0 and tpr == pytest.approx(2 / 3)


def test_calibration_split_is_two_disjoint_seeded_halves() -> None:
    a, b = calibration_split(10, seed=3)
    assert len(a) == len(b) == 5 and not set(a.tolist()) & set(b.tolist())
    assert torch.equal(calibration_split(10, seed=3)[0], a)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "m"
    overrides = {
        "method.name": "er-minus",
        "model.width": 0.125,
        "data.train_subset": 1000,
        "data.eval_subset": 100,
        "data.batch_size": 50,
        "run.epochs": 1,
        "run.progress": False,
        "run.out_dir": str(out),
    }
    run_training(load_config(overrides=overrides))
    return out


def test_export_fits_it_and_refit_leaves_the_weights_alone(run_dir: Path, tmp_path: Path) -> None:
    path = export_run(run_dir, "m", tmp_path, eval_n=100, device="cpu", typicality_fit_n=1000)
    card = read_card(path)
    t = card.typicality
    assert t["fit_n"] == 1000 and t["calibration_n"] == 5000 and t["prior"] == "gaussian"
    assert len(t["class_means"]) == 10 and len(t["class_means"][0]) == card.embed_dim
    assert 0.04 <= t["calibration_flagged"] <= 0.06
    assert "other half is held out" in t["calibration_data"]
    sha = sha256_file(path / "weights.safetensors")
    refit = add_typicality(path, fit_n=500, fpr=0.2, device="cpu")
    assert refit.typicality["fit_n"] == 500 and refit.typicality["fpr"] == 0.2
    assert sha256_file(path / "weights.safetensors") == sha == read_card(path).weights_sha256
    none = export_run(run_dir, "n", tmp_path, eval_n=100, device="cpu", typicality_fit_n=0)
    assert read_card(none).typicality == {}
