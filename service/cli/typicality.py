"""``erc typicality fit|eval``: fit the embedding typicality score into a store model's card, or
measure it (docs/typicality.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from service.cli._common import canonical_dataset, floats, out


def register(sub: Any) -> None:
    ty = sub.add_parser(
        "typicality", help="embedding typicality score: fit it into a store model's card, or measure it"
    )
    ty.add_argument("action", choices=["fit", "eval"])
    ty.add_argument("model", help="model name in the store or a model directory")
    ty.add_argument("--store", default="model_store")
    ty.add_argument("--data-dir")
    ty.add_argument("--device", default="auto")
    ty.add_argument("--fit-n", type=int, help="fit: training images (default: all)")
    ty.add_argument("--fpr", type=float, default=0.05, help="fit: false-positive rate of the threshold")
    ty.add_argument("--n", type=int, default=5000, help="eval: clean test images (the held-out half)")
    ty.add_argument("--adv-n", type=int, default=500, help="eval: images attacked per eps")
    ty.add_argument(
        "--eps",
        type=floats,
        help="eval: attack radii (default: a third, two thirds and all of the training eps)",
    )
    ty.add_argument("--steps", type=int, default=40, help="eval: attack steps")
    ty.add_argument("--lambdas", type=floats, default=[0.1, 1.0, 10.0], help="eval: adaptive attack weights")
    ty.add_argument(
        "--ood",
        help="eval: out-of-distribution test set, or folder:DIR ('' for none; default: fashion-mnist for "
        "1x28x28 models not trained on it, else none)",
    )
    ty.add_argument("--out", help="eval: write the JSON here")
    ty.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from training.card import read_card, resolve_model
    from training.evaluate import command_line
    from training.export import add_typicality
    from training.typicality import Typicality
    from training.typicality.evaluate import evaluate

    loaded = resolve_model(args.model, args.store, args.device)
    if loaded.source != "store":
        raise SystemExit("erc: typicality needs a store model (card.json)")
    if args.action == "fit":
        card = add_typicality(
            loaded.path, fit_n=args.fit_n, fpr=args.fpr, device=args.device, data_dir=args.data_dir
        )
        t = card.typicality
        out(
            f"{card.name}: typicality fitted on {t['fit_n']} training embeddings; threshold "
            f"{t['threshold']:.4f} on the Mahalanobis distance flags {100 * t['calibration_flagged']:.1f} % "
            f"of {t['calibration_n']} held-out clean images (target {100 * t['fpr']:.0f} %)"
        )
        return 0
    card = read_card(loaded.path)
    if not card.typicality:
        raise SystemExit(
            f"erc: {card.name} has no typicality entry; run `erc typicality fit {card.name}` first"
        )
    ood = args.ood
    if ood is None:  # the project's own OOD set fits only models of its geometry
        ood = "fashion-mnist" if card.input_shape == [1, 28, 28] and card.dataset != "fashion-mnist" else ""
    result = evaluate(
        loaded.model,
        Typicality.from_dict(card.typicality),
        card.dataset,
        ood=canonical_dataset(ood) or None,
        n=args.n,
        adv_n=args.adv_n,
        eps=args.eps or [round(card.train_eps * f, 6) for f in (1 / 3, 2 / 3, 1.0)],
        steps=args.steps,
        lambdas=args.lambdas,
        data_dir=args.data_dir,
        folder=card.folder_options(),
    )
    result["model"] = card.name
    result["weights_sha256"] = card.weights_sha256
    result["command"] = command_line()
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    out(text)
    return 0
