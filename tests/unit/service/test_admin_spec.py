"""The admin API builds audits through the attack registry: for every attack or preset and every
norm, a request either becomes a spec that runs that norm or is refused with the reason, exactly
as ``erc audit`` does (tests/unit/service/test_cli_errors.py)."""

from __future__ import annotations

import pytest

from service.errors import InvalidInput
from service.routes.admin import ATTACK_NAMES, AuditRequest, _spec
from training.attacks import ATTACKS, PRESETS, list_attacks, list_presets
from training.attacks.catalog import NORMS


def test_the_api_offers_every_public_attack_and_preset() -> None:
    assert set(ATTACK_NAMES) == set(list_attacks()) | set(list_presets())
    assert "adaptive-pgd" not in ATTACK_NAMES  # needs a typicality score, not a request


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", sorted(ATTACK_NAMES))
def test_every_pair_runs_its_norm_or_is_refused(name: str, norm: str) -> None:
    req = AuditRequest(model="m", attacks=[{"name": name}], norm=norm)
    norms = PRESETS[name].norms if name in PRESETS else ATTACKS[name].norms
    if norm not in norms:
        with pytest.raises(InvalidInput, match=f"not {norm}"):
            _spec(req, 0.3, 784)
        return
    spec = _spec(req, 0.3, 784)
    assert spec.norm == norm and all(a.norm == norm for a in spec.attacks)
    assert spec.suite.cascade == (name in PRESETS)
    assert spec.eps == [0.0, 0.15, 0.3]


def test_default_attacks_follow_the_norm() -> None:
    assert [a.label for a in _spec(AuditRequest(model="m"), 0.3, 784).attacks] == [
        "FGSM",
        "PGD-40",
        "APGD-CE-100",
    ]
    l2 = _spec(AuditRequest(model="m", norm="l2"), 0.3, 784)
    assert [a.label for a in l2.attacks] == ["PGD-40", "APGD-CE-100"]
