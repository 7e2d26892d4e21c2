"""``erc export``: a training run -> ``model_store/NAME`` (encoder + classifier, safetensors + card)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from service.cli._common import attack_arg, out


def register(sub: Any) -> None:
    x = sub.add_parser(
        "export", help="write model_store/NAME (encoder + classifier, safetensors + card.json)"
    )
    x.add_argument("run_dir")
    x.add_argument("--name", required=True)
    x.add_argument("--store", default="model_store")
    x.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    x.add_argument("--eval-n", type=int, help="test images for the card's figures (default: all)")
    x.add_argument(
        "--robust-attack",
        type=attack_arg,
        action="append",
        default=[],
        metavar="NAME[:KEY=VALUE,...]",
        help="repeatable: also robust accuracy under this attack or preset (e.g. autoattack), one card "
        "figure each",
    )
    x.add_argument(
        "--robust-steps", type=int, default=0, help="shorthand: also PGD robust accuracy with this many steps"
    )
    x.add_argument("--robust-restarts", type=int, default=1, help="restarts of that PGD")
    x.add_argument("--robust-eps", type=float, help="eps of the robust figures (default: the training eps)")
    x.add_argument("--data-dir")
    x.add_argument("--device", default="auto")
    x.add_argument("--notes", default="", help="free text for the card")
    x.add_argument(
        "--typicality-fit-n",
        type=int,
        default=10000,
        help="training images for the embedding typicality score (0: none; see erc typicality)",
    )
    x.add_argument(
        "--allow-degenerate",
        action="store_true",
        help="export even a model whose held-out embeddings are all the same point",
    )
    x.add_argument("--no-progress", action="store_true")
    x.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from service.servable import check_servable
    from training.attacks import build_attacks
    from training.export import export_run

    requests = list(args.robust_attack)
    if args.robust_steps > 0:
        requests.append(("pgd", {"steps": args.robust_steps, "restarts": args.robust_restarts}))
    robust = [build_attacks([r]) for r in requests]  # refused before anything is written
    path = export_run(
        args.run_dir,
        args.name,
        args.store,
        dtype=args.dtype,
        eval_n=args.eval_n,
        robust=robust,
        robust_eps=args.robust_eps,
        device=args.device,
        data_dir=args.data_dir,
        notes=args.notes,
        progress=not args.no_progress,
        typicality_fit_n=args.typicality_fit_n,
        allow_degenerate=args.allow_degenerate,
        verify=check_servable,  # loaded through the server's and the TorchServe handler's code first
    )
    card = json.loads((path / "card.json").read_text())
    out(f"exported {path} (sha256 {card['weights_sha256'][:16]}..., {card['weights_dtype']})")
    for m in card["metrics"]:
        label = (m.get("attack") or {}).get("label", "clean")
        out(f"  {m['metric']} eps={m['eps']} {label}: {100 * m['value']:.2f}% (n={m['n']})")
    for w in card.get("warnings") or []:
        out(f"  warning: {w}")
    return 0
