"""Figures a reproduction run measured on the exported model's stored weights, added to a store
model's card when the weights are the same (sha256), so that no figure measured on the shipped
weights is missing from its card; each keeps the command and device that measured it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.attacks import ATTACKS, build_attack
from training.card import append_card_metrics, read_card
from training.evaluate import metric_entry

# Evaluations of a job that did not run on the stored weights (the float32 checkpoint).
NOT_STORED = ("fp32-checkpoint",)


def _label(record: dict[str, Any]) -> str:
    """The registry's label of an attack record written before records carried one."""
    defn = ATTACKS[record["name"]]
    params = {k: v for k, v in record.items() if k in defn.parameters() and v is not None}
    return build_attack(record["name"], params, record.get("norm", "linf")).label


def stored_weight_figures(result_dir: Path, model_dir: Path) -> list[dict[str, Any]]:
    """Card metric entries for every finished evaluation of the exported job in ``result_dir``
    whose export has the weights of ``model_dir`` (the run's card sha256 must match)."""
    card = read_card(model_dir)
    run_card = result_dir / f"card-{card.name}.json"
    if not run_card.is_file():
        raise FileNotFoundError(f"{run_card}: the run's card of {card.name} is not in {result_dir}")
    sha = json.loads(run_card.read_text())["weights_sha256"]
    if sha != card.weights_sha256:
        raise ValueError(
            f"{result_dir} exported weights {sha[:12]}, not {card.name}'s {card.weights_sha256[:12]}"
        )
    out: list[dict[str, Any]] = []
    clean_seen: set[int] = set()  # every curve repeats the clean accuracy: keep one per n
    for job_file in sorted((result_dir / "jobs").glob("*/job.json")):
        rec = json.loads(job_file.read_text())
        if rec.get("job", {}).get("export") != card.name:
            continue
        for tag, ev in rec.get("evals", {}).items():
            if ev.get("status") != "done" or tag in NOT_STORED:
                continue
            attack = {**ev["attack"], "label": _label(ev["attack"])}
            for point in ev["points"]:
                if point["eps"] == 0:
                    if point["n"] in clean_seen:
                        continue
                    clean_seen.add(point["n"])
                out.append(
                    metric_entry(
                        correct=point["correct"],
                        n=point["n"],
                        eps=point["eps"],
                        attack=attack,
                        dataset=card.dataset,
                        seed=ev.get("seed"),
                        device=ev.get("device", "unknown"),
                        measured_on=f"stored weights ({card.weights_dtype}), {job_file}",
                        sha=card.weights_sha256,
                        command=ev.get("command"),
                    )
                )
    return out


def import_figures(result_dir: Path, model_dir: Path) -> int:
    """Append :func:`stored_weight_figures` to the card (a figure already there with the same
    metric, eps, n and attack settings is replaced); returns how many."""
    figures = stored_weight_figures(result_dir, model_dir)
    append_card_metrics(model_dir, figures)
    return len(figures)
