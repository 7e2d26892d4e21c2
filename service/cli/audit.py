"""``erc audit``: a robustness audit of a model on its test split: attacks, sanity checks, JSON +
self-contained HTML report (the same runner as ``POST /admin/audits``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from service.cli._common import (
    add_attack_args,
    add_model_args,
    canonical_dataset,
    floats,
    out,
    suite_from_args,
)


def register(sub: Any) -> None:
    au = sub.add_parser(
        "audit", help="robustness audit of a model: attacks, sanity checks, JSON + HTML report"
    )
    add_model_args(au)
    au.add_argument(
        "--dataset",
        help="test split of this dataset, or folder:DIR (class folders named as the model's classes) "
        "[default: the model's]",
    )
    au.add_argument("--data-dir")
    au.add_argument("--n", type=int, default=500, help="samples drawn from the test split")
    au.add_argument("--data-seed", type=int, default=0)
    au.add_argument("--eps", type=floats, help="radii (default: 0, half and all of the training eps)")
    add_attack_args(
        au,
        default="fgsm, pgd:steps=40, apgd:steps=100 (those that implement --norm)",
        several="each attack's figure and their per-sample union are reported",
    )
    au.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="bf16 autocast, checked against fp32 on a subset (auto: bf16 on CUDA, fp32 on CPU)",
    )
    au.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile the attacked model (auto: on CUDA only)",
    )
    au.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    au.add_argument("--no-checks", action="store_true", help="skip the sanity checks")
    au.add_argument("--batch-size", type=int, default=256)
    au.add_argument(
        "--out", default="var/audit", help="folder for audit.json and report.html (var/ is git-ignored)"
    )
    au.add_argument(
        "--update-card",
        action="store_true",
        help="add the clean accuracy and each eps's worst case to the store model's card",
    )
    au.add_argument(
        "--fail-under",
        type=float,
        metavar="ACCURACY",
        help="release gate: exit with status 3 when the audit's worst case (at the training eps, else "
        "the largest eps; a fraction, e.g. 0.85) is below it; the compared figure is printed last",
    )
    au.add_argument("--no-progress", action="store_true")
    au.set_defaults(run=run)


GATE_FAILED = 3  # erc audit --fail-under: the worst case is below the bar (1: an error)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.audit.engine import AuditSpec
    from service.audit.report import headline, render
    from service.audit.runner import card_metrics, default_eps, run_audit
    from training.attacks import default_attacks
    from training.card import append_card_metrics, resolve_model
    from training.checkpoint import atomic_write_text
    from training.data import load_split
    from training.devices import resolve_device
    from training.formats import capabilities_of

    if args.fail_under is not None and not 0.0 <= args.fail_under <= 1.0:
        raise SystemExit(f"erc: --fail-under is an accuracy in [0, 1], got {args.fail_under}")
    device = resolve_device(args.device)
    loaded = resolve_model(args.model, args.store, args.device)
    caps = capabilities_of(loaded.model)
    # A black-box model (no input gradients) gets the query attacks; white-box ones are refused.
    default = default_attacks(args.norm, gradients=caps.gradients)
    suite = suite_from_args(args, default=[(a.name, dict(a.params)) for a in default.attacks])
    spec = AuditSpec(
        eps=sorted(set(args.eps)) if args.eps else default_eps(loaded.train_eps),
        suite=suite,
        precision=args.precision,
        compile=args.compile,
        seed=args.seed,
        checks=not args.no_checks,
        batch_size=args.batch_size,
    )
    dataset = canonical_dataset(args.dataset) or loaded.dataset
    if args.update_card and (loaded.source != "store" or dataset != loaded.dataset):
        raise SystemExit("erc: --update-card needs a store model audited on its own dataset")
    data = load_split(dataset, "test", args.data_dir, n=args.n, seed=args.data_seed, folder=loaded.folder)
    x, y = data.as_float(), data.labels
    info = {
        "name": loaded.name,
        "weights_sha256": loaded.weights_sha256,
        "source": loaded.source,
        "path": str(loaded.path),
        "dataset": loaded.dataset,
        "train_eps": loaded.train_eps,
        "label_names": loaded.label_names,
        "model_format": loaded.card.model_format if loaded.card else "er",
    }
    with tqdm(total=100, desc="audit", unit="%", disable=args.no_progress, dynamic_ncols=True) as bar:

        def show(snapshot: dict[str, Any]) -> None:
            bar.n = int(100 * snapshot["fraction"])
            bar.set_postfix_str(snapshot["stage"])
            bar.refresh()

        result = run_audit(
            loaded.model,
            x,
            y,
            spec,
            device=device,
            model_info=info,
            data_info={"source": "test", "dataset": dataset, "n": len(x), "seed": args.data_seed},
            on_progress=show,
        )
        bar.n = 100
        bar.refresh()
    folder = Path(args.out)
    atomic_write_text(folder / "audit.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(folder / "report.html", render(result))
    if args.update_card:
        append_card_metrics(loaded.path, card_metrics(result, f"{loaded.source} {loaded.path}"))
    where = result["environment"]["device"]
    out(f"{loaded.name} ({loaded.source}), {dataset} test n={len(x)}, {spec.norm}, {where}")
    out(f"clean accuracy {100 * result['clean']['accuracy']:.2f}%")
    lead = headline(result)
    if lead is not None:
        where = "the training eps" if lead["training_eps"] else "the largest eps"
        lo, hi = 100 * lead["ci95"][0], 100 * lead["ci95"][1]
        figure = f"{100 * lead['accuracy']:.2f}% [{lo:.2f}, {hi:.2f}] (n={lead['n']})"
        out(f"worst case at {where} {lead['eps']:g}: {figure}")
    labels = [a["label"] for a in result["attacks"]]
    if result["suite"]["cascade"]:
        suite = result["suite"]["label"]
        out(f"{suite} runs as a cascade: a column is the worst case of its attack and those before")
    out(f"{'eps':>8} {'worst':>8} " + " ".join(f"{lb:>12}" for lb in labels))
    for row in result["per_eps"]:
        cells = " ".join(f"{100 * row['attacks'][lb]['accuracy']:11.2f}%" for lb in labels)
        out(f"{row['eps']:8.4f} {100 * row['union']['accuracy']:7.2f}% {cells}")
    for c in result["checks"]:
        out(f"  [{c['status'].upper():4}] {c['name']}: {c['message']}")
    out(f"wrote {folder / 'audit.json'} and {folder / 'report.html'} ({result['timings_s']['total']:.1f} s)")
    if caps.threat_note:
        out(f"{loaded.name}: {caps.threat_note}")
    if args.fail_under is not None:
        return release_gate(lead, args.fail_under)
    return 0


def release_gate(lead: dict[str, Any] | None, bar: float) -> int:
    """``--fail-under``: the compared figure as the last line; :data:`GATE_FAILED` when below."""
    if lead is None:
        out(f"fail-under {bar:g}: FAIL: no robust figure measured (no eps above 0)")
        return GATE_FAILED
    value = float(lead["accuracy"])
    verdict = "PASS" if value >= bar else "FAIL"
    out(f"fail-under {bar:g}: {verdict}: worst case {value:.4f} at eps {lead['eps']:g} (n={lead['n']})")
    return 0 if value >= bar else GATE_FAILED
