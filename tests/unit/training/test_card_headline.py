"""The card's headline: the worst robust accuracy measured at the training eps, over every attack
and every n, recomputed whenever the card is written."""

from __future__ import annotations

from training.card import headline


def _m(value: float, eps: float, n: int, label: str, metric: str = "robust_accuracy") -> dict:
    return {
        "metric": metric,
        "value": value,
        "eps": eps,
        "n": n,
        "ci95": [value - 0.01, value + 0.01],
        "attack": {"label": label, "norm": "linf"},
        "measured_on": "x",
    }


def test_the_worst_figure_at_the_training_eps_leads() -> None:
    metrics = [
        _m(0.99, 0.0, 10000, "clean", metric="accuracy"),
        _m(0.905, 0.3, 10000, "PGD-100x5"),
        _m(0.894, 0.3, 1000, "APGD-DLR-100"),
        _m(0.8847, 0.3, 10000, "APGD-CE-100"),
        _m(0.10, 0.4, 10000, "PGD-40"),  # another eps: not the headline
    ]
    h = headline(metrics, 0.3)
    assert h is not None
    assert (h["value"], h["n"], h["attack"], h["worst_of"]) == (0.8847, 10000, "APGD-CE-100", 3)
    assert h["ci95"] == [0.8747, 0.8947]
    # A smaller n that measured lower still leads: the headline never picks the flattering figure.
    h2 = headline([*metrics, _m(0.87, 0.3, 1000, "AutoAttack")], 0.3)
    assert h2 is not None and (h2["value"], h2["attack"], h2["worst_of"]) == (0.87, "AutoAttack", 4)
    assert headline(metrics, 0.2) is None
