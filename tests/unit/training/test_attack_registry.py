"""The attack registry: validation of names, norms, parameters and their types in one factory;
labels and costs; presets as suites; records that say what ran."""

from __future__ import annotations

import pytest

from training.attacks import PRESETS, AttackError, build_attack, build_attacks, default_attacks


def test_parameters_are_validated_once_for_every_front_end() -> None:
    assert build_attack("pgd", {"steps": 3}, "l2").kwargs == {
        "steps": 3,
        "restarts": 1,
        "loss": "ce",
        "keep_best": True,
        "norm": "l2",
    }
    # Ints count as floats; the right types pass.
    build_attack("pgd", {"alpha": 1, "keep_best": False, "loss": "margin"}, "linf")
    build_attack("cw", {"c": 1, "lr": 0.05, "abort_early": False}, "l2")
    for name, params, norm, match in [
        ("pgd", {"step": 3}, "linf", "no parameter.*step"),
        ("fgsm", {}, "l2", "works in linf, not l2"),
        ("square", {}, "l2", "works in linf, not l2"),
        ("cw", {}, "linf", "works in l2, not linf"),
        ("nope", {}, "linf", "unknown attack"),
        ("pgd", {"steps": -1}, "linf", "positive"),
        ("apgd-t", {"n_target_classes": 0}, "linf", "positive"),
        ("pgd", {"alpha": "x"}, "linf", "alpha must be a finite number"),
        ("pgd", {"alpha": float("nan")}, "linf", "finite number"),
        ("pgd", {"keep_best": 1}, "linf", "keep_best must be true or false"),
        ("pgd", {"loss": 3}, "linf", "loss must be a string"),
        ("pgd", {"loss": "dlr"}, "linf", "loss must be one of ce, margin"),
        ("apgd", {"loss": "margin"}, "linf", "loss must be one of ce, dlr"),
        ("apgd", {"rho": True}, "linf", "rho must be a finite number"),
        ("cw", {"abort_early": "yes"}, "l2", "abort_early"),
        ("square", {"p_init": [0.8]}, "linf", "p_init"),
        ("adaptive-pgd", {}, "linf", "needs typicality"),
    ]:
        with pytest.raises(AttackError, match=match):
            build_attack(name, params, norm)


def test_labels_and_costs() -> None:
    assert build_attack("pgd", {"steps": 100, "restarts": 5}).label == "PGD-100x5"
    assert build_attack("pgd", {"keep_best": False}).label == "PGD-40 last-iterate"
    assert build_attack("apgd", {"loss": "dlr"}).label == "APGD-DLR-100"
    assert build_attack("apgd-t").label == "APGD-T9-100"
    assert build_attack("apgd-t").cost == 900
    assert build_attack("fab-t").label == "FAB-T9-100"
    assert build_attack("square", {"queries": 5000}).cost == pytest.approx(5000 / 3)
    assert build_attack("fgsm").cost == 1


def test_the_autoattack_preset_is_the_standard_suite() -> None:
    suite = build_attacks([("autoattack", {})])
    assert suite.cascade and suite.preset == "autoattack" and suite.label == "AutoAttack"
    assert [a.label for a in suite.attacks] == ["APGD-CE-100", "APGD-T9-100", "FAB-T9-100", "Square-5000"]
    assert suite.attacks[3].kwargs["p_init"] == 0.8
    assert suite.requests() == [{"name": "autoattack", "params": {}}]
    assert build_attacks([(r["name"], r["params"]) for r in suite.requests()]) == suite
    record = suite.record()
    assert record["name"] == "autoattack" and record["attacks"][0]["label"] == "APGD-CE-100"
    with pytest.raises(AttackError, match="runs alone"):
        build_attacks([("autoattack", {}), ("pgd", {})])
    with pytest.raises(AttackError, match="takes no parameters"):
        build_attacks([("autoattack", {"steps": 3})])
    with pytest.raises(AttackError, match="linf, not l2"):
        build_attacks([("autoattack", {})], "l2")
    assert set(PRESETS) == {"autoattack"}


def test_named_attacks_form_a_suite_of_distinct_labels() -> None:
    suite = build_attacks([("fgsm", {}), ("pgd", {"steps": 10})])
    assert not suite.cascade and suite.label == "FGSM + PGD-10" and suite.cost == 11
    with pytest.raises(AttackError, match="same label PGD-10"):
        build_attacks([("pgd", {"steps": 10}), ("pgd", {"steps": 10, "alpha": 0.01})])


def test_default_attacks_follow_the_norm() -> None:
    assert [a.label for a in default_attacks("linf").attacks] == ["FGSM", "PGD-40", "APGD-CE-100"]
    assert [a.label for a in default_attacks("l2").attacks] == ["PGD-40", "APGD-CE-100"]
