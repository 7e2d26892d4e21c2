"""Sanity checks reported with every audit (after AutoAttack's ``checks.py`` and the advice of
Carlini et al. 2019, "On Evaluating Adversarial Robustness"): each says pass, warn or fail with
its numbers, and what a warn or fail suggests.

Extra attack runs use a subset of the correctly classified samples (``subset``) to stay cheap.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from service.audit.engine import Engine, RunState, predict_labels, zero_gradient_share
from training.attacks import build_attack
from training.formats import BLACK_BOX_NOTE, capabilities_of


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail
    value: Any
    threshold: Any
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _acc(engine: Engine, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = predict_labels(engine.model, x.to(engine.device), engine.spec.batch_size).cpu()
    return float((pred == y).float().mean()) if len(y) else float("nan")


def _large_eps(norm: str, x: torch.Tensor) -> float:
    """A radius at which every [0, 1] image can be turned into the uniform grey one."""
    return 0.5 if norm == "linf" else 0.5 * math.sqrt(x[0].numel())


def run_checks(
    engine: Engine, x: torch.Tensor, y: torch.Tensor, result: dict[str, Any], *, subset: int = 200
) -> list[Check]:
    spec = engine.spec
    st: RunState = engine.state
    checks: list[Check] = []
    idx = st.idx[:subset]
    xs, ys = x[idx], y[idx]
    eps_pos = [e for e in result["eps"] if e > 0]
    labels = [a.label for a in spec.attacks]
    gradient = [a for a in spec.attacks if a.spec.gradient]
    black_box = [a for a in spec.attacks if not a.spec.gradient]
    iterative = [a for a in spec.attacks if a.spec.iterative]
    strongest = iterative[0] if iterative else (gradient[0] if gradient else None)
    caps = capabilities_of(engine.model)
    if not caps.gradients:  # a black-box model: what its figures mean, and no gradient checks
        checks.append(
            Check(
                "black_box",
                "warn",
                None,
                None,
                f"{BLACK_BOX_NOTE}: the model gives no input gradients, so only query attacks ran",
            )
        )

    # 1. An attack at eps 0 changes nothing and leaves the clean accuracy.
    if strongest is not None and len(idx):
        adv0 = engine.attack_stacked(strongest, xs, ys, [0.0], spec.seed + 7)[0]
        moved = float((adv0 - xs).abs().max())
        acc0 = _acc(engine, adv0, ys)
        ok = moved == 0.0 and acc0 == 1.0
        checks.append(
            Check(
                "eps_zero_is_clean",
                "pass" if ok else "fail",
                {"max_change": moved, "accuracy": acc0},
                {"max_change": 0.0, "accuracy": 1.0},
                "at eps 0 the attack returned the clean images and accuracy"
                if ok
                else "an attack at eps 0 changed images or predictions: the attack or the model is broken "
                "(a stochastic model also shows this)",
            )
        )

    # 2. Adversarial examples inside the eps ball and the image box.
    v = st.ball_violation
    checks.append(
        Check(
            "inside_ball_and_box",
            "pass" if v <= 1e-5 else "fail",
            v,
            1e-5,
            "every adversarial example lies within eps and in [0, 1]"
            if v <= 1e-5
            else "some adversarial examples leave the eps ball or [0, 1]: the figures are invalid",
        )
    )

    # 3. Iterative attacks at least as strong as FGSM.
    if "FGSM" in labels and iterative:
        worst = 0.0
        for row in result["per_eps"]:
            if row["eps"] == 0:
                continue
            f = row["attacks"]["FGSM"]["accuracy"]
            for a in iterative:
                worst = max(worst, row["attacks"][a.label]["accuracy"] - f)
        tol = 1.0 / max(result["clean"]["n"], 1) + 0.005
        checks.append(
            Check(
                "iterative_beats_fgsm",
                "pass" if worst <= tol else "warn",
                round(worst, 6),
                round(tol, 6),
                "iterative attacks are at least as strong as FGSM at every eps"
                if worst <= tol
                else "an iterative attack is weaker than one FGSM step: its step size or loss is off, or the "
                "model masks gradients locally",
            )
        )

    # 4. Accuracy does not increase with eps.
    accs = [row["union"]["accuracy"] for row in result["per_eps"]]
    rises = [round(b - a, 6) for a, b in itertools.pairwise(accs) if b > a]
    checks.append(
        Check(
            "non_increasing_in_eps",
            "pass" if not rises else "warn",
            rises,
            [],
            "robust accuracy never increases with eps"
            if not rises
            else "robust accuracy increases with eps somewhere: the attack fails at larger radii, a classic "
            "sign of gradient masking",
        )
    )

    # 5. At a very large eps accuracy must collapse (any image can become uniform grey).
    pgd = build_attack("pgd", {"steps": 20, "restarts": 1}, spec.norm)
    if len(idx) and caps.gradients:
        big = _large_eps(spec.norm, xs)
        adv = engine.attack_stacked(pgd, xs, ys, [big], spec.seed + 11)[0]
        acc = _acc(engine, adv, ys)
        with torch.no_grad():
            num_classes = int(engine.model(xs[:1].to(engine.device)).shape[1])
        limit = 1.0 / num_classes + 0.05
        checks.append(
            Check(
                "large_eps_breaks_everything",
                "pass" if acc <= limit else "warn",
                {"eps": round(big, 4), "accuracy": round(acc, 4)},
                round(limit, 4),
                f"PGD-20 at eps {big:.3g} leaves {acc:.1%} accuracy, as expected"
                if acc <= limit
                else f"PGD-20 at eps {big:.3g} (where every image can be made uniform grey) still leaves "
                f"{acc:.1%} accuracy: gradients are masked or the attack is broken",
            )
        )

    # 6. More steps and more restarts do not change the result much (the attack has converged).
    if iterative and eps_pos and len(idx):
        a = iterative[0]
        p = a.kwargs
        stronger = a.with_params(steps=2 * p["steps"], restarts=2 * p.get("restarts", 1))
        e = eps_pos[-1]
        base = engine.state.flags[a.label][e][idx].float().mean().item()
        adv = engine.attack_stacked(stronger, xs, ys, [e], spec.seed + 13)[0]
        acc = _acc(engine, adv, ys)
        delta = base - acc
        checks.append(
            Check(
                "converged",
                "pass" if delta <= 0.01 else "warn",
                {
                    "attack": a.label,
                    "stronger": stronger.label,
                    "eps": e,
                    "base": round(base, 4),
                    "stronger_accuracy": round(acc, 4),
                },
                0.01,
                f"{stronger.label} changes robust accuracy by {delta:.1%} on {len(idx)} samples"
                if delta <= 0.01
                else f"{stronger.label} lowers robust accuracy by {delta:.1%} on {len(idx)} samples: the "
                "reported figures overstate robustness; audit with more steps and restarts",
            )
        )

    # 7. A black-box attack breaks nothing that every gradient attack missed. (In a cascade the
    # black-box attack runs last, on what the gradient attacks missed, and the flags are cumulative:
    # the same count.)
    if black_box and gradient:
        count = 0
        for e in eps_pos:
            robust_grad = torch.ones_like(st.clean)
            for a in gradient:
                robust_grad &= st.flags[a.label][e]
            for b in black_box:
                count += int((robust_grad & ~st.flags[b.label][e]).sum())
        names = " and ".join(b.label for b in black_box)
        checks.append(
            Check(
                "black_box_not_stronger",
                "pass" if count == 0 else "warn",
                count,
                0,
                f"{names} found no sample that all gradient attacks missed"
                if count == 0
                else f"{names} broke {count} (sample, eps) pairs that every gradient attack missed: gradient "
                "masking; trust the union, not the gradient attacks",
            )
        )

    # 8. Share of samples with an exactly zero input gradient.
    if len(idx) and caps.gradients:
        share = zero_gradient_share(engine.model, xs, ys, engine.device, spec.batch_size)
        checks.append(
            Check(
                "zero_gradients",
                "pass" if share <= 0.01 else "warn",
                round(share, 4),
                0.01,
                f"{share:.1%} of samples have an all-zero input gradient"
                if share <= 0.01
                else f"{share:.1%} of samples have an all-zero input gradient: shattered or saturated "
                "gradients; gradient attacks are blind there",
            )
        )

    # 9. bf16 autocast agrees with fp32.
    if engine.bf16 and iterative and eps_pos and len(idx):
        a, e = iterative[0], eps_pos[-1]
        acc32 = _acc(engine, engine.attack_stacked(a, xs, ys, [e], spec.seed + 17, bf16=False)[0], ys)
        acc16 = _acc(engine, engine.attack_stacked(a, xs, ys, [e], spec.seed + 17, bf16=True)[0], ys)
        d = abs(acc32 - acc16)
        checks.append(
            Check(
                "bf16_matches_fp32",
                "pass" if d <= 0.005 else "warn",
                {"fp32": round(acc32, 4), "bf16": round(acc16, 4)},
                0.005,
                f"bf16 and fp32 {a.label} agree within {d:.2%}"
                if d <= 0.005
                else f"bf16 and fp32 {a.label} differ by {d:.2%}: report the fp32 audit",
            )
        )
    return checks
