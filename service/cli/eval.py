"""``erc eval``: robust accuracy under attack at several eps, JSON + PNG plot (Figure 2 style)."""

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
    e = sub.add_parser("eval", help="robust accuracy under attack, JSON + PNG plot")
    add_model_args(e)
    e.add_argument(
        "--dataset", help="evaluate on this dataset's test split, or folder:DIR (default: the model's)"
    )
    e.add_argument("--data-dir")
    add_attack_args(e, default="pgd", several="the figure is their worst case per sample")
    e.add_argument("--eps", type=floats, help="comma-separated radii (default: 0 and the training eps)")
    e.add_argument("--n", type=int, help="number of test images (default: all)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--out", help="folder for eval.json and accuracy_vs_eps.png")
    e.add_argument("--update-card", action="store_true", help="add the figures to the store model's card")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from training.card import append_card_metrics, resolve_model
    from training.evaluate import curve_metrics, evaluate_on_test, plot_curves

    suite = suite_from_args(args)  # refuses a bad attack before any model or data is loaded
    loaded = resolve_model(args.model, args.store, args.device)
    dataset = canonical_dataset(args.dataset) or loaded.dataset
    if args.update_card and (loaded.source != "store" or dataset != loaded.dataset):
        raise SystemExit("erc: --update-card needs a store model evaluated on its own dataset")
    eps = args.eps if args.eps is not None else [0.0, loaded.train_eps]
    curve = evaluate_on_test(
        loaded.model,
        dataset,
        eps,
        suite,
        n=args.n,
        seed=args.seed,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        model_name=loaded.name,
        folder=loaded.folder,
    )
    measured_on = f"{loaded.source} {loaded.path}"
    result = {
        "model": loaded.name,
        "source": loaded.source,
        "path": str(loaded.path),
        "weights_sha256": loaded.weights_sha256,
        "dataset": dataset,
        **curve.to_dict(),
        "metrics": curve_metrics(curve, dataset, measured_on, loaded.weights_sha256),
    }
    folder = Path(args.out) if args.out else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_curves([(loaded.name, curve)], folder / "accuracy_vs_eps.png")
    if args.update_card:
        append_card_metrics(loaded.path, result["metrics"])
    out(f"{loaded.name} on {dataset} test, n={curve.n}, {curve.description}")
    out(f"seed {curve.seed}, {curve.device}")
    out(f"{'eps':>8} {'accuracy':>9} {'95% CI':>17} {'seconds':>8}")
    for p in curve.points:
        lo, hi = 100 * p.ci95[0], 100 * p.ci95[1]
        out(f"{p.eps:8.4f} {100 * p.accuracy:8.2f}% [{lo:6.2f}, {hi:6.2f}] {p.seconds:8.1f}")
    if folder is not None:
        out(f"wrote {folder / 'eval.json'} and {folder / 'accuracy_vs_eps.png'}")
    return 0
