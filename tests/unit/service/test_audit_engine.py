"""The audit engine and its sanity checks on models whose robustness is known in closed form.

A linear classifier of the mean brightness ("bright" vs "dark" 4x4 images) has an exact l_inf
robust accuracy: a sample survives every attack at eps exactly when the distance of its mean to
0.5 exceeds eps. The same model behind a rounding of its input masks every gradient: gradient
attacks find nothing, and the sanity checks must say so.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from service.audit.engine import AuditCancelled, AuditSpec, Engine, Progress, embedding_view
from service.audit.runner import checks_cost, run_audit
from training.attacks import Suite, build_attack, build_attacks

N = 96


class Brightness(nn.Module):
    """Class 0 when the mean pixel is above 0.5, class 1 below; the logit gap is linear in it."""

    def __init__(self, mask_gradients: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 2)
        self.mask_gradients = mask_gradients
        with torch.no_grad():
            self.linear.weight.copy_(torch.stack([torch.ones(16), -torch.ones(16)]))
            self.linear.bias.copy_(torch.tensor([-8.0, 8.0]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The "embedding" of the report's 2-D view: the pixels."""
        if self.mask_gradients:
            x = torch.round(x * 8) / 8  # zero gradient almost everywhere, same predictions nearby
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat images whose mean is 0.5 +- margin; margins spread over (0.02, 0.4)."""
    g = torch.Generator().manual_seed(0)
    margin = 0.02 + 0.38 * torch.rand(N, generator=g)
    y = torch.randint(0, 2, (N,), generator=g)
    mean = torch.where(y == 0, 0.5 + margin, 0.5 - margin)
    x = mean.view(N, 1, 1, 1).expand(N, 1, 4, 4).clone()
    return x, y, margin


def _model_info() -> dict:
    return {"name": "brightness"}


def test_robust_accuracy_matches_the_closed_form() -> None:
    x, y, margin = _data()
    eps = [0.0, 0.1, 0.2, 0.3]
    spec = AuditSpec(
        eps=eps,
        suite=Suite(
            (
                build_attack("fgsm"),
                build_attack("pgd", {"steps": 10}),
            )
        ),
        batch_size=64,
    )
    result = run_audit(
        Brightness(), x, y, spec, device=torch.device("cpu"), model_info=_model_info(), data_info={}
    )
    assert result["clean"]["accuracy"] == 1.0
    for row in result["per_eps"]:
        expected = float((margin > row["eps"]).float().mean())
        # The bound is tight for a linear model; float error may flip a sample on the boundary.
        assert row["union"]["accuracy"] == pytest.approx(expected, abs=1.5 / N), row
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["zero_gradients"]["status"] == "pass"
    assert checks["eps_zero_is_clean"]["status"] == "pass"
    assert checks["inside_ball_and_box"]["status"] == "pass"
    assert checks["large_eps_breaks_everything"]["status"] == "pass"


def test_masked_gradients_are_flagged() -> None:
    x, y, _ = _data()
    spec = AuditSpec(
        eps=[0.0, 0.3],
        suite=Suite(
            (
                build_attack("pgd", {"steps": 10}),
                build_attack("square", {"queries": 200}),
            )
        ),
        batch_size=64,
    )
    result = run_audit(
        Brightness(mask_gradients=True),
        x,
        y,
        spec,
        device=torch.device("cpu"),
        model_info=_model_info(),
        data_info={},
    )
    row = next(r for r in result["per_eps"] if r["eps"] == 0.3)
    pgd = next(v for k, v in row["attacks"].items() if k.startswith("PGD"))
    square = next(v for k, v in row["attacks"].items() if k.startswith("Square"))
    # PGD is blind here; the black-box attack sees the true (breakable) decision rule.
    assert pgd["accuracy"] > square["accuracy"] + 0.3
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["zero_gradients"]["status"] != "pass"
    assert checks["black_box_not_stronger"]["status"] != "pass"
    assert "gradient attacks are blind" in checks["zero_gradients"]["message"]
    assert "masking" in checks["black_box_not_stronger"]["message"]


def test_the_autoattack_preset_catches_masked_gradients() -> None:
    """The standard suite as a cascade: the gradient attacks see nothing behind the rounding, Square
    (last, on what they missed) breaks what the closed form says is breakable, and the check says so."""
    x, y, margin = _data()
    spec = AuditSpec(eps=[0.0, 0.3], suite=build_attacks([("autoattack", {})]), batch_size=64)
    result = run_audit(
        Brightness(mask_gradients=True),
        x,
        y,
        spec,
        device=torch.device("cpu"),
        model_info=_model_info(),
        data_info={},
    )
    assert result["suite"] == {"label": "AutoAttack", "preset": "autoattack", "cascade": True}
    row = next(r for r in result["per_eps"] if r["eps"] == 0.3)
    columns = list(row["attacks"])
    assert columns == ["APGD-CE-100", "APGD-T9-100", "FAB-T9-100", "Square-5000"]
    cumulative = [row["attacks"][c]["accuracy"] for c in columns]
    assert cumulative == sorted(cumulative, reverse=True)  # a cascade's columns never go up
    assert cumulative[2] > 0.9  # the gradient attacks are blind
    assert (
        row["union"]["accuracy"]
        == cumulative[-1]
        == pytest.approx(float((margin > 0.3).float().mean()), abs=0.05)
    )
    # Later attacks only saw what the earlier ones missed.
    pairs = [a["attacked_pairs"] for a in result["attacks"]]
    assert pairs[0] == result["clean"]["robust"] and pairs == sorted(pairs, reverse=True)
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["black_box_not_stronger"]["status"] == "warn"
    assert "Square-5000 broke" in checks["black_box_not_stronger"]["message"]


def test_a_cascade_on_an_honest_model_matches_the_closed_form_and_reports_progress() -> None:
    x, y, margin = _data()
    spec = AuditSpec(eps=[0.1, 0.3], suite=build_attacks([("autoattack", {})]), batch_size=64, checks=False)
    progress = Progress(total=spec.work(N))
    fractions: list[float] = []
    stages: list[str] = []

    class Watched(Brightness):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            snap = progress.snapshot()
            fractions.append(snap["fraction"])
            stages.append(snap["stage"])
            return super().forward(x)

    result = Engine(Watched(), spec, device=torch.device("cpu"), progress=progress).run(x, y)
    for row in result["per_eps"]:
        expected = float((margin > row["eps"]).float().mean())
        assert row["union"]["accuracy"] == pytest.approx(expected, abs=1.5 / N), row
    assert fractions == sorted(fractions) and progress.snapshot()["fraction"] == 1.0
    # Progress named every stage of the cascade that had survivors to attack.
    assert {"APGD-CE-100", "APGD-T9-100", "FAB-T9-100", "Square-5000"} <= set(stages)


def test_progress_moves_within_a_batch_and_ends_at_the_plan() -> None:
    x, y, _ = _data()
    spec = AuditSpec(
        eps=[0.1, 0.2], suite=Suite((build_attack("pgd", {"steps": 20}),)), batch_size=256, checks=False
    )
    progress = Progress(total=spec.work(N))
    seen: list[float] = []

    class Watched(Brightness):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(progress.snapshot()["fraction"])
            return super().forward(x)

    engine = Engine(Watched(), spec, device=torch.device("cpu"), progress=progress)
    engine.run(x, y)
    during = [f for f in seen if 0 < f < 1]
    # One batch holds every (sample, eps) pair; progress still advanced step by step inside it.
    assert len(set(during)) >= 15
    assert during == sorted(during)
    assert progress.snapshot()["fraction"] == 1.0
    assert progress.snapshot()["stage"] == "PGD-20"


def test_cancel_interrupts_a_running_batch() -> None:
    x, y, _ = _data()
    spec = AuditSpec(
        eps=[0.3], suite=Suite((build_attack("pgd", {"steps": 1000}),)), batch_size=256, checks=False
    )
    cancel = threading.Event()
    calls = 0

    class Cancelling(Brightness):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 5:
                cancel.set()
            return super().forward(x)

    engine = Engine(Cancelling(), spec, device=torch.device("cpu"), cancel=cancel)
    with pytest.raises(AuditCancelled):
        engine.run(x, y)
    assert calls < 10


def test_the_served_model_is_left_alone() -> None:
    model = Brightness().train()
    x, y, _ = _data()
    spec = AuditSpec(eps=[0.1], suite=Suite((build_attack("pgd", {"steps": 3}),)), checks=False)
    Engine(model, spec, device=torch.device("cpu")).run(x, y)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert next(model.parameters()).is_contiguous()


def test_checks_cost_is_part_of_the_plan() -> None:
    spec = AuditSpec(eps=[0.0, 0.1], suite=Suite((build_attack("pgd", {"steps": 10}),)))
    assert checks_cost(spec, 1000) > 0
    assert checks_cost(AuditSpec(eps=[0.1], suite=spec.suite, checks=False), 1000) == 0


def test_compiled_attacks_agree_with_eager() -> None:
    """torch.compile (inductor, a C++ compiler on the CPU; on CUDA the default) gives the same
    audit; early stop changes the batch size at every step, which one dynamic graph serves."""
    x, y, _ = _data()
    results = {}
    for mode in ("off", "on"):
        spec = AuditSpec(
            eps=[0.1, 0.2], suite=Suite((build_attack("pgd", {"steps": 5}),)), compile=mode, checks=False
        )
        results[mode] = run_audit(
            Brightness(), x, y, spec, device=torch.device("cpu"), model_info=_model_info(), data_info={}
        )
    assert results["on"]["settings"]["compiled"] is True
    assert results["on"]["settings"]["compile_error"] is None
    assert results["off"]["settings"]["compiled"] is False
    assert [r["union"] for r in results["on"]["per_eps"]] == [r["union"] for r in results["off"]["per_eps"]]


def test_a_compiler_failure_falls_back_to_eager() -> None:
    x, y, _ = _data()
    spec = AuditSpec(eps=[0.1], suite=Suite((build_attack("pgd", {"steps": 3}),)), compile="on", checks=False)
    engine = Engine(Brightness(), spec, device=torch.device("cpu"))

    def broken(_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no C++ compiler on this host")

    engine._compiled = broken  # what a host without a working compiler does at the first call
    result = engine.run(x, y)
    assert not engine.compiled
    assert engine.compile_error == "RuntimeError: no C++ compiler on this host"
    assert result["per_eps"][-1]["union"]["n"] == N


@pytest.mark.parametrize("n", [1, 2, 5])
def test_the_embedding_view_is_two_dimensional_for_any_number_of_points(n: int) -> None:
    """Found by the API fuzzer (tests/security/test_fuzz.py): one attacked point gave a 1-d PCA
    projection, and the report's scatter plot an IndexError that failed the audit."""
    x = torch.rand(n, 1, 4, 4)
    view = embedding_view(Brightness(), x, x, torch.zeros(n, dtype=torch.long), torch.device("cpu"), 8)
    assert [len(p) for p in view["clean"]] == [2] * n and [len(p) for p in view["adversarial"]] == [2] * n
